"""The life of a run as a user meets it, through the CLI (issue 28): resuming a run folder however
`out=` is spelled, a failed first attempt that does not block the corrected command, Ctrl-C, options
that do nothing, weights others can read, eval beside (not inside) a model, a run's checkpoints as
models, recipe files. Each: the exit code, one `supra: error:` line or the documented behaviour, no
traceback, nothing left behind or lost."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from supra.cli import main

FAST = ["recipe=tiny", "train.eval_baselines=false", "train.sample_tokens=0", "train.logger=none",
        "eval.max_tokens=128"]
ONE_STAGE = "train.stages=[{name: full, tokens: 768, lr: 1e-3}]"  # 3 steps of 256 tokens


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("supra: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------- 1. resume by run folder

def test_a_run_resumes_however_out_is_spelled_and_after_a_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*FAST, ONE_STAGE, "train.checkpoint_every=1"]
    assert main(["uptrain", *args]) == 0  # default out: runs/tiny
    run = tmp_path / "runs" / "tiny"
    done = steps(run)
    for out in ("out=./runs/tiny/", "overwrite=true"):
        shutil.rmtree(run / "model")  # stopped after its last checkpoint: the rerun resumes, trains nothing
        assert main(["uptrain", *args, out]) == 0, out
        assert steps(run) == done and (run / "model" / "config.json").exists()
    moved = tmp_path / "elsewhere"
    run.rename(moved)
    shutil.rmtree(moved / "model")
    assert main(["uptrain", *args, f"out={moved}"]) == 0
    assert steps(moved) == done


# ------------------------------------------------------------- 2. a failed attempt does not block

def test_a_converted_model_is_refused_before_the_run_is_written(tmp_path, capsys):
    converted = tmp_path / "converted"
    assert main(["convert", "recipe=tiny", f"out={converted}"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["uptrain", *FAST, f"model={converted}", f"out={run}"]) == 2
    line = one_error_line(capsys)
    assert "already converted" in line and "method=softmax" in line, line
    assert not run.exists()


def test_an_attempt_that_trained_nothing_is_replaced_by_the_corrected_command(tmp_path, monkeypatch, capsys):
    import supra.commands.uptrain as uptrain

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the first attempt stops after its baselines, before any step

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(uptrain, "train", stopped)
        assert main(["uptrain", *FAST, ONE_STAGE, "train.eval_baselines=true", f"out={run}"]) == 130
    assert "supra: error: interrupted" in capsys.readouterr().err
    first = json.loads((run / "eval.json").read_text())["ppl_original"]
    assert main(["uptrain", *FAST, ONE_STAGE, "train.eval_baselines=true", "seed=1", f"out={run}"]) == 0
    second = json.loads((run / "eval.json").read_text())["ppl_original"]
    assert second != first  # the baselines are those of the corrected run, not kept from the other
    assert yaml.safe_load((run / "uptrain.config.yaml").read_text())["seed"] == 1
    # Once it has trained, a run is protected.
    capsys.readouterr()
    assert main(["uptrain", *FAST, ONE_STAGE, "seed=2", f"out={run}"]) == 2
    assert "different settings (seed)" in one_error_line(capsys)


def test_a_run_that_another_uptrain_is_running_is_refused_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".uptrain.lock", "a+") as held:  # what the live process holds (flock: per open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1234 on node7")
        held.flush()
        for settings in ([], ["seed=1"]):  # the same command twice, or another one, before a checkpoint
            assert main(["uptrain", *FAST, ONE_STAGE, *settings, f"out={run}"]) == 2
            assert "is in use by a supra uptrain that is still running (pid 1234 on node7)" in one_error_line(capsys)
            assert [p.name for p in run.iterdir()] == [".uptrain.lock"]
    # The lock ends with its process; a folder holding only the lock file is a new run.
    assert main(["uptrain", *FAST, ONE_STAGE, f"out={run}"]) == 0
    assert (run / "model" / "config.json").exists()


def test_a_filesystem_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    import supra.commands.uptrain as uptrain

    def no_locks(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(uptrain.fcntl, "flock", no_locks)
    assert main(["uptrain", *FAST, ONE_STAGE, f"out={tmp_path / 'run'}"]) == 0
    assert "this filesystem takes no lock (Function not implemented)" in " ".join(capsys.readouterr().out.split())


def test_uptrain_into_a_model_folder_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["convert", "recipe=tiny", f"out={model}"]) == 0
    before = sorted(p.name for p in model.iterdir())
    capsys.readouterr()
    assert main(["uptrain", *FAST, f"out={model}"]) == 2
    assert "is a model directory" in one_error_line(capsys)
    assert sorted(p.name for p in model.iterdir()) == before


# ------------------------------------------------------------------------------------- 3. Ctrl-C

def test_ctrl_c_during_a_save_leaves_no_hidden_copy(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerBase

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "converted"
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
        assert main(["convert", "recipe=tiny", f"out={out}"]) == 130
        assert main(["export", "recipe=tiny", "model=random", f"out={tmp_path / 'export'}"]) == 130
    assert "supra: error: interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_later_save_removes_what_a_killed_one_left(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".converted.tmp-{dead.pid}", f".converted.export-{dead.pid}", f".other.tmp-{dead.pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    alive = f".converted.tmp-{os.getppid()}"  # a save still running in another process is left alone
    (tmp_path / alive).mkdir()
    assert main(["convert", "recipe=tiny", f"out={tmp_path / 'converted'}"]) == 0
    assert hidden(tmp_path) == sorted([f".other.tmp-{dead.pid}", alive])


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys):
    import supra.cli as cli

    def interrupted(name):
        raise KeyboardInterrupt  # as in the seconds torch takes to import

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert main(["eval", "recipe=tiny"]) == 130
    assert one_error_line(capsys) == "supra: error: interrupted"


def test_ctrl_c_during_uptrain_writes_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch, caplog):
    from supra.train.progress import ProgressLog

    real = ProgressLog.log

    def log(self, record):
        real(self, record)
        if record.get("step") == 2:
            signal.raise_signal(signal.SIGINT)

    run = tmp_path / "run"
    # A process started in the background (`cmd &`, nohup) inherits Ctrl-C ignored, and training keeps it
    # so; this test is about an interactive one.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch, caplog.at_level(logging.INFO):
            patch.setattr(ProgressLog, "log", log)
            assert main(["uptrain", *FAST, ONE_STAGE, "train.checkpoint_every=100", f"out={run}"]) == 130
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    assert (run / "checkpoints" / "step-00000002").exists() and not (run / "model").exists()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("interrupted:")]
    assert len(said) == 1 and "rerun the same command" in said[0], said
    assert restored is signal.default_int_handler  # Ctrl-C works as usual again
    assert main(["uptrain", *FAST, ONE_STAGE, "train.checkpoint_every=100", f"out={run}"]) == 0
    assert steps(run) == [1, 2, 3]


# -------------------------------------------------------------------------------------- 4. memory

@pytest.mark.parametrize("command, args, message", [
    ("eval", ["seq_len=1000000", "eval.max_tokens=1000000"],
     "held-out perplexity needs about 552.2 GiB for the activations of 1 x 1,000,000 tokens"),
    ("eval", ["tasks=[passkey]", "eval.passkey_lengths=[2000000]"], "lower eval.passkey_lengths"),
    ("uptrain", ["seq_len=1000000", "train.batch_tokens=2000000"], "training needs about"),
])
def test_a_job_that_cannot_fit_is_refused_before_it_starts(tmp_path, capsys, command, args, message):
    out = tmp_path / "out"
    assert main([command, *FAST, *args, f"out={out}"]) == 2
    line = one_error_line(capsys)
    assert message in line and "train.batch_tokens" not in line, line
    assert not out.exists()


def test_a_sequence_past_the_trained_positions_is_said_in_one_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["eval", *FAST, "seq_len=2100", "eval.max_tokens=2100", f"out={tmp_path / 'eval'}"]) == 0
    said = [r.getMessage() for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert said == ["warning: 2,100 tokens is past the model's max_position_embeddings (2,048); positions beyond "
                    "it were never trained, so expect quality to fall there"]


# ------------------------------------------------------------------------ 5. checkpoints as models

def test_an_unfinished_run_is_evaluated_and_exported_from_its_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["uptrain", *FAST, ONE_STAGE, "train.checkpoint_every=1", "train.keep_checkpoints=5",
                 f"out={run}"]) == 0
    shutil.rmtree(run / "model")  # as if stopped after step 3
    exported = tmp_path / "step2"
    assert main(["export", f"model={run}", "step=2", "dtype=float32", f"out={exported}"]) == 0
    assert main(["eval", f"model={run}", "eval.max_tokens=128", f"out={tmp_path / 'eval'}"]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["ppl"]["tokens"] == 128
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True) is not None
    capsys.readouterr()
    assert main(["export", f"model={run}", "step=7", f"out={tmp_path / 'none'}"]) == 2
    assert "has no checkpoint of step 7; its checkpoints: 1, 2, 3" in one_error_line(capsys)
    assert main(["export", "recipe=tiny", "model=random", "step=1", f"out={tmp_path / 'none'}"]) == 2
    assert "step=1 picks a checkpoint of a supra run directory" in one_error_line(capsys)
    shutil.rmtree(run / "checkpoints")
    assert main(["eval", f"model={run}", f"out={tmp_path / 'none'}"]) == 2
    assert "is a supra run that has no checkpoint yet" in one_error_line(capsys)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("make, what", [
    (lambda d: (d / "eval.json").write_text("{}"), "a supra eval output folder"),
    (lambda d: None, "an empty directory"),
])
def test_a_directory_without_a_model_says_what_it_is(tmp_path, capsys, make, what):
    folder = tmp_path / "folder"
    folder.mkdir()
    make(folder)
    assert main(["eval", f"model={folder}", f"out={tmp_path / 'eval'}"]) == 2
    assert what in one_error_line(capsys)


# --------------------------------------------------------------------- 6. options that do nothing

@pytest.mark.parametrize("args, message", [
    (["method=t2r", "sinks=4"], "sinks=4 does nothing with method=t2r; it is for method=lolcats, gla, gdn"),
    (["method=supra", "window_kind=terrace"], "window_kind=terrace does nothing with method=supra"),
    (["method=lolcats", "gate=learned"], "gate=learned does nothing with method=lolcats"),
    (["method=gla", "window=0", "window_mix=token"], "window_mix=token does nothing with method=gla and window=0"),
])
def test_options_that_do_nothing_are_refused(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["convert", "recipe=tiny", *args, f"out={out}"]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_a_recipes_own_options_do_not_follow_a_method_override(capsys):
    assert main(["convert", "recipe=demo", "method=supra", "--help"]) == 0  # demo: terrace window, 4 sinks
    text = capsys.readouterr().out
    assert re.search(r"^sinks: 0  # ", text, re.M) and re.search(r"^window_kind: sliding  # ", text, re.M)
    assert re.search(r"^cache_budget: null  # ", text, re.M) and re.search(r"^state_decay: none  # ", text, re.M)
    assert main(["convert", "recipe=demo", "window_kind=sliding", "--help"]) == 0  # the cache serves either window
    text = capsys.readouterr().out
    assert re.search(r"^cache_budget: 384  # ", text, re.M) and re.search(r"^sinks: 4  # ", text, re.M)


# ------------------------------------------------------------------- 7. weights others can read

def test_weights_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["convert", "recipe=tiny", f"out={tmp_path / 'converted'}"]) == 0
        assert main(["export", f"model={tmp_path / 'converted'}", f"out={tmp_path / 'export'}"]) == 0
    finally:
        os.umask(old)
    for folder in ("converted", "export"):
        for path in (tmp_path / folder).iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ------------------------------------------------------------------------------ 9. recipe files

def test_a_recipe_prints_as_valid_yaml_and_runs_from_a_path(tmp_path, capsys):
    assert main(["recipes", "recipe=llama7b"]) == 0
    printed = capsys.readouterr().out
    shipped = Path(__file__).parents[1] / "recipes" / "llama7b.yaml"
    assert yaml.safe_load(printed) == yaml.safe_load(shipped.read_text())
    mine = tmp_path / "my.yaml"
    mine.write_text(printed.replace("seq_len: ", "seq_len: 77 #", 1) if "seq_len: " in printed
                    else printed + "seq_len: 77\n")
    assert main(["convert", f"recipe={mine}", "--help"]) == 0
    assert re.search(r"^seq_len: 77  # ", capsys.readouterr().out, re.M)
    assert main(["convert", f"recipe={tmp_path / 'missing.yaml'}"]) == 2
    assert "recipe file" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------ 10. help

def test_help_describes_every_key_and_puts_the_commands_own_first(capsys):
    from supra.config import key_help
    from supra.layers.specs import METHOD_NAMES

    assert all(len(text) > 8 for text in key_help().values())
    assert main(["factorize", "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[2].startswith("model: ") and "factorize.ratio: null  # " in text
    assert text.index("factorize.ratio") < text.index("# other keys:") < text.index("\ntrain.batch_tokens: ")
    assert yaml.safe_load(text)["train.batch_tokens"] == 16384  # the help reads as YAML
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in METHOD_NAMES if name != "softmax") and "factorize.ratio=F" in usage
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("supra ")


@pytest.mark.parametrize("args, hint", [
    (["convert", "--model", "X"], "write model=X instead of --model X"),
    (["eval", "--seq_len=5"], "write seq_len=5 instead of --seq_len=5"),
    (["convert", "--overwrite"], "write overwrite=VALUE instead of --overwrite"),
])
def test_an_option_gets_a_key_value_hint(capsys, args, hint):
    assert main(args) == 2
    assert hint in one_error_line(capsys)


# ------------------------------------------------------------------------------------- 11. offline

def test_the_slurm_launcher_off_a_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    from supra import launch

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    monkeypatch.chdir(tmp_path)
    assert launch.main(["--multirun", "hydra/launcher=submitit_slurm", "command=uptrain", "recipe=tiny"]) == 2
    assert "this machine has no sbatch or srun (not a SLURM login node)" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_lm_eval_offline_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from supra.evaluate import lm_eval_task

    monkeypatch.setattr(lm_eval_task, "hub_unreachable", lambda: "huggingface.co cannot be reached (offline?)")
    monkeypatch.setattr("supra.commands.eval.load_model_and_tokenizer", lambda cfg: pytest.fail("model loaded"))
    start = time.perf_counter()
    assert main(["eval", "recipe=tiny", "tasks=[lm_eval:hellaswag]", f"out={tmp_path / 'eval'}"]) == 2
    line = one_error_line(capsys)
    assert "hellaswag need datasets that are not in the local cache, and huggingface.co cannot be reached" in line
    assert time.perf_counter() - start < 60 and not (tmp_path / "eval").exists()


# ------------------------------------------------------------------------------------ 12. piped logs

@pytest.mark.parametrize("args", [["uptrain", "recipe=tiny", "sed_len=5"], ["eval", "method=lolcat"],
                                  ["convert", "window=-1"], ["uptrain", "--model", "x"]])
def test_a_typo_is_refused_before_torch_is_imported(args):
    """Torch and transformers take seconds to import: settings are checked without them."""
    script = (f"import sys; from supra.cli import main; code = main({args!r}); "
              "sys.exit(3 if 'torch' in sys.modules or 'transformers' in sys.modules else code)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("supra: error:"), result.stderr


def test_a_piped_dry_run_is_whole_and_in_readable_units(capsys):
    assert main(["uptrain", "recipe=tiny", "train.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "0.0 h" not in out, out  # capsys is a pipe, as SLURM's log is
    assert re.search(r"estimated wall time [\d.]+ (s|min) ", out), out


def test_eval_says_each_task_as_it_goes(tmp_path, capsys):
    assert main(["eval", *FAST, "eval.max_tokens=64", f"out={tmp_path / 'eval'}"]) == 0
    out = capsys.readouterr().out
    assert "task 1/1 ppl: running" in out and re.search(r"task 1/1 ppl: done in \d+ s", out)


def test_a_run_written_by_an_older_supra_resumes_with_the_settings_added_since(tmp_path):
    """A snapshot that lacks settings added since (a run started before an upgrade) resumes with the same
    command, as long as those settings stay at their defaults; a setting it has and the command changes
    is still refused."""
    run = tmp_path / "run"
    args = [*FAST, ONE_STAGE, "train.checkpoint_every=1", f"out={run}"]
    assert main(["uptrain", *args]) == 0
    done = steps(run)
    snapshot = run / "uptrain.config.yaml"
    older = yaml.safe_load(snapshot.read_text())
    for section, name in ((older, "cache_chunk"), (older["train"], "eval_every"),
                          (older["train"]["stages"][0], "ce_weight")):
        del section[name]
    snapshot.write_text(yaml.safe_dump(older))
    shutil.rmtree(run / "model")
    assert main(["uptrain", *args]) == 0
    assert steps(run) == done and (run / "model" / "config.json").exists()
    assert main(["uptrain", *args, "seed=3"]) == 2
