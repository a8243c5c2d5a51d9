"""Bad input as a new user meets it, through the CLI: exit code 2 and one `supra: error:` line (or the
documented fallback), never a traceback, and nothing overwritten or lost."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from supra.cli import main
from supra.config import RANGES, RecipeConfig
from supra.data import DataConfig, build_train_loader, iter_documents
from supra.data.config import DATA_RANGES
from supra.data.sources import open_source, source_specs
from supra.errors import UserError, _lookup

FAST = ["recipe=tiny", "train.eval_baselines=false", "train.sample_tokens=0", "train.logger=none"]
ONE_STEP = "train.stages=[{name: full, tokens: 128, lr: 1e-3}]"


def uptrain(run: Path, *extra: str) -> int:
    return main(["uptrain", *FAST, f"out={run}", *extra])


def one_error_line(capsys) -> str:
    """The single `supra: error:` line on stderr (library warnings may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("supra: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def numbered_lines(n: int) -> str:
    return "".join(f"L{i:05d} the quick brown fox jumps over the lazy dog\n" for i in range(n))


# ----------------------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("arg, message", [
    ("train.stages=[{name: full, tokens: 100, lr: nan}]", "train.stages[0].lr must be a finite number > 0, got nan"),
    ("train.stages=[{name: full, tokens: 100, lr: inf}]", "train.stages[0].lr must be a finite number > 0"),
    ("train.stages=[{name: full, tokens: -5}]", "train.stages[0].tokens must be an integer >= 1, got -5"),
    ("train.stages=[{name: full, tokens: 1e3}]", "could not be converted to Integer"),
    ("train.stages=[{name: full, lr: 1e-3, min_lr: 1e-2}]", "min_lr (0.01) must be at most lr"),
    ("train.stages=[{name: full, betas: [0.9]}]", "betas must be two numbers"),
    ("train.stages=[{name: full, betas: [0.9, 1.5]}]", "train.stages[0].betas[1] must be a finite number in [0, 1)"),
    ("train.stages=[{nam: full}]", "Key 'nam' not in 'StageConfig'"),
    ("train.stages=[]", "train.stages is empty"),
    ("train.stages=5", "bad value for train.stages"),
    ("train.micro_batch_size=-1", "train.micro_batch_size must be an integer >= 1, got -1"),
    ("train.batch_tokens=0", "train.batch_tokens must be an integer >= 1, got 0"),
    ("train.batch_tokens=lots", "bad value for train.batch_tokens: Value 'lots'"),
    ("train.grad_clip=-1", "train.grad_clip must be a finite number > 0"),
    ("seq_len=0", "seq_len must be an integer >= 1, got 0"),
    ("seq_len=abc", "bad value for seq_len: Value 'abc' of type 'str' could not be converted to Integer; "
                    "valid: an integer >= 1"),
    ("window=0", "window must be >= 1 for lolcats (>= 0 otherwise), got 0"),
    ("window=-1", "window must be an integer >= 0, got -1"),
    ("sinks=-2", "sinks must be an integer >= 0, got -2"),
    ("window_kind=stairs", "unknown window_kind 'stairs'; valid: sliding, terrace"),
    (("method=gla", "window=0", "sinks=4"), "sinks must be >= 0 and needs a softmax window"),
    ("seed=-3", "seed must be an integer >= 0"),
    ("eval.batch_size=0", "eval.batch_size must be an integer >= 1"),
    ("eval.passkey_depths=[0.5, 2]", "eval.passkey_depths[1] must be a finite number in [0, 1], got 2.0"),
    ("data.heldout_fraction=1.5", "data.heldout_fraction must be a finite number in [0, 1), got 1.5"),
    ("data.heldout_fraction=nan", "data.heldout_fraction must be a finite number in [0, 1)"),
    ("data.tokenize_batch=0", "data.tokenize_batch must be an integer >= 1"),
    ("data.mixture=[{source: stdlib, weight: -1}]", "data.mixture[0].weight must be a finite number > 0"),
    ("train.param_dtype=fp8", "unknown train.param_dtype 'fp8'"),
    ("architecture=5", "bad value for architecture"),
    ("tasks=ppl", "bad value for tasks"),
])
def test_numbers_and_types_are_checked_before_anything_loads(tmp_path, capsys, arg, message):
    run = tmp_path / "run"
    assert main(["uptrain", "recipe=tiny", *([arg] if isinstance(arg, str) else arg), f"out={run}"]) == 2
    assert message in one_error_line(capsys)
    assert not run.exists()


def test_every_numeric_setting_has_a_valid_range():
    cfg = OmegaConf.structured(RecipeConfig)
    for key in ("eval.lm_eval_limit", "eval.lm_eval_fewshot", "feature_dim", "train.world_size", "step"):
        OmegaConf.update(cfg, key, 8)  # null by default: a number, so the walk below sees them
    values = OmegaConf.to_container(cfg)
    numeric = {name for name, _ in numeric_leaves(values, "") if not name.startswith("data.")}
    covered = {name for rule in RANGES for name, _ in _lookup(values, rule.split("."), "")}
    assert numeric <= covered, sorted(numeric - covered)
    data_numbers = {f.name for f in dataclasses.fields(DataConfig) if f.type in ("int", "float", "int | None")}
    assert data_numbers <= set(DATA_RANGES), sorted(data_numbers - set(DATA_RANGES))


def numeric_leaves(node, prefix):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from numeric_leaves(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from numeric_leaves(value, f"{prefix}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, node


# ---------------------------------------------------------------------------------- one text file

def test_a_single_text_file_is_a_corpus(tmp_path, caplog):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(numbered_lines(2000))  # ~110 KB, one document
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["uptrain", "recipe=tiny", "train.sample_tokens=0", "train.logger=none", ONE_STEP,
                     f"data.source={corpus}", f"out={run}"]) == 0
    said = [r.getMessage() for r in caplog.records if "held out instead" in r.getMessage()]
    assert len(said) == 1, said  # one line, however often the source is opened
    results = json.loads((run / "eval.json").read_text())
    assert results["ppl_original"]["tokens"] > 0 and results["ppl_uptrained"]["tokens"] > 0
    # the report also scores 4x the training length (the tiny recipe's 64 tokens), and the window alone
    for which in ("original", "uptrained", "window_alone"):
        assert results[f"ppl_{which}_256"]["seq_len"] == 256 and results[f"ppl_{which}"]["seq_len"] == 64
    assert "ppl_converted_256" not in results


@pytest.mark.parametrize("files", [
    {"corpus.txt": numbered_lines(3000)},  # one document
    {"a.txt": numbered_lines(1000), "b.txt": numbered_lines(1500)},  # a few large ones
    {"small.jsonl": "".join(json.dumps({"text": f"L{i:05d} record {i} of a small file"}) + "\n" for i in range(30))},
])
def test_training_never_sees_text_held_out_by_position(tmp_path, smollm2_tokenizer, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cfg = DataConfig(source=str(tmp_path), heldout_fraction=0.02, shuffle_buffer=0)
    assert open_source(source_specs(cfg)[0], cfg).tail is not None  # these names hold nothing out by hash
    train, heldout = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "heldout"))
    assert heldout and train
    # The text is cut in two, not copied: together the splits are the corpus, once, in order.
    texts = [json.loads(line)["text"] if name.endswith(".jsonl") else line
             for name, text in sorted(files.items())
             for line in (text.splitlines() if name.endswith(".jsonl") else [text])]
    assert "".join(train) + "".join(heldout) == "".join(texts)
    assert len("".join(heldout)) >= 100

    def markers(texts: list[str]) -> set[str]:
        return {word for t in texts for word in t.split() if word[0] == "L" and word[1:].isdigit()}

    held_markers = markers(heldout) - markers(train)  # a line cut in two may share its marker
    assert held_markers
    # Every training row over three epochs of the training text: no held-out line's marker.
    loader = build_train_loader(cfg, smollm2_tokenizer, seq_len=64, batch_size=8)
    tokens = sum(len(smollm2_tokenizer(t)["input_ids"]) + 1 for t in train)
    seen = []
    for _, batch in zip(range(3 * tokens // (8 * 64) + 1), loader):
        seen.extend(smollm2_tokenizer.batch_decode(batch["input_ids"]))
    assert not markers(seen) & held_markers
    assert loader.stats()["epochs"] >= 2


def test_a_tiny_corpus_is_one_line_error(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("hello world\n")
    run = tmp_path / "run"
    assert uptrain(run, f"data.source={tmp_path / 'tiny.txt'}") == 2
    line = one_error_line(capsys)
    assert "has 12 characters of readable text" in line and "need at least 200" in line, line
    assert not run.exists()


def test_no_heldout_share_at_all_is_one_line_error(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(numbered_lines(200))
    assert uptrain(tmp_path / "run", ONE_STEP, "train.eval_baselines=true", "data.heldout_fraction=0",
                   f"data.source={tmp_path / 'c.txt'}") == 2
    assert "held-out split has no text to score" in one_error_line(capsys)


# ------------------------------------------------------------------------------------ bad records

def bad_files(root: Path) -> None:
    root.mkdir()
    (root / "good.txt").write_text(numbered_lines(400))
    (root / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": broken\n{"body": "x"}\n{"text": 5}\n'
                                     b'{"text": "caf\xe9"}\n[1, 2]\n')
    (root / "empty.jsonl").write_bytes(b"")
    (root / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("na\xefve\n".encode("latin-1"))


def test_bad_records_are_skipped_counted_and_named(tmp_path, caplog):
    bad_files(tmp_path / "data")
    with caplog.at_level(logging.INFO):
        docs = list(iter_documents(DataConfig(source=str(tmp_path / "data"), heldout_fraction=0.0), "train"))
    assert docs[0] == "fine" and len(docs) == 2  # bad.jsonl:1 and good.txt
    log = "\n".join(r.getMessage() for r in caplog.records)
    for where in ("bad.jsonl:2: not JSON", "bad.jsonl:3: no string field 'text'", "bad.jsonl:4: no string field",
                  "bad.jsonl:5: invalid UTF-8", "bad.jsonl:6: record is a list", "empty.jsonl: empty file",
                  "blob.bin: invalid UTF-8", "latin1.txt: invalid UTF-8 at byte 2, line 1"):
        assert where in log, (where, log)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read train documents")]
    assert "'skipped': 8" in summary[0] and "first bad records: " in summary[0] and "bad.jsonl:2" in summary[0]


def test_bad_records_skipped_through_the_cli(tmp_path):
    bad_files(tmp_path / "data")
    assert uptrain(tmp_path / "run", ONE_STEP, f"data.source={tmp_path / 'data'}") == 0


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", b'{"text": "ok"}\n{"text": broken\n', "a.jsonl:2: not JSON"),
    ("b.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "b.jsonl:2: no string field 'text'"),
    ("c.jsonl", b'{"text": "ok"}\n{"text": ["x"]}\n', "c.jsonl:2: no string field 'text'"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "d.jsonl:2: invalid UTF-8"),
    ("e.txt", b"line one\nline \xfe two\n", "e.txt: invalid UTF-8 at byte 14, line 2"),
    ("f.jsonl", b"", "f.jsonl: empty file"),
])
def test_bad_record_error_mode_names_file_and_line(tmp_path, capsys, name, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.txt").write_text(numbered_lines(400))
    (data / name).write_bytes(content)
    assert uptrain(tmp_path / "run", ONE_STEP, f"data.source={data}", "data.on_bad_record=error") == 2
    line = one_error_line(capsys)
    assert message in line and "data.on_bad_record=skip would skip" in line, line


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is an empty directory"),
    (lambda p: None, "not found (no such file or directory)"),
    (lambda p: p.write_bytes(bytes(range(256)) * 64), "has no readable text (1 record(s)); bad records skipped"),
    (lambda p: p.write_text("   \n\n"), "has no readable text"),
])
def test_unusable_data_sources_are_one_line(tmp_path, capsys, make, message):
    source = tmp_path / "data"
    make(source)
    run = tmp_path / "run"
    assert uptrain(run, f"data.source={source}") == 2
    assert message in one_error_line(capsys)
    assert not run.exists()


# ------------------------------------------------------------------------------------ checkpoints

def losses(run: Path) -> list[tuple[int, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_a_damaged_checkpoint_resumes_from_the_previous_one_or_says_which(tmp_path, caplog, capsys):
    import shutil

    run = tmp_path / "run"
    assert uptrain(run, "train.keep_checkpoints=5") == 0
    before = losses(run)
    checkpoints = run / "checkpoints"
    for damage in (lambda step: (step / "__0_0.distcp").write_bytes((step / "__0_0.distcp").read_bytes()[:1000]),
                   lambda step: (step / "rank-0.pt").unlink()):
        shutil.rmtree(run / "model")
        damage(checkpoints / "step-00000020")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert uptrain(run, "train.keep_checkpoints=5") == 0
        warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        assert len(warned) == 1 and "step-00000020" in warned[0] and "step-00000015" in warned[0], warned
        assert losses(run) == before  # steps 16-20 redone exactly
        assert (checkpoints / "step-00000020" / "meta.json").exists()  # rewritten; the damaged one kept aside
        assert list(checkpoints.glob(".step-00000020.damaged-*"))
    # Every checkpoint damaged: no silent restart from step 0, and nothing in the run changes.
    shutil.rmtree(run / "model")
    for step in checkpoints.glob("step-*"):
        (step / "meta.json").unlink()
    capsys.readouterr()
    files = tree(run)
    assert uptrain(run, "train.keep_checkpoints=5") == 2
    line = one_error_line(capsys)
    assert "checkpoint" in line and "step-00000020 is damaged (meta.json is missing)" in line, line
    assert "remove" in line and tree(run) == files


# ------------------------------------------------------------------- damaged records of a run

DAMAGED_YAML = [(b"seed: [1, 2\n", "is not valid YAML (expected ',' or ']', but got '<stream end>' at line 2)"),
                (b"- seed\n- 0\n", "is not a YAML mapping of settings"), (b"42\n", "is not a YAML mapping"),
                (b"", "is not a YAML mapping"), (b"seed: \xff\n", "is not UTF-8 text"),
                (b"data: ${oops\n", "is not valid YAML")]
DAMAGED_JSON = [(b'{"ppl": {"ppl": 3.1', "is not valid JSON (Expecting ',' delimiter at line 1)"),
                (b"[1, 2]", "holds a JSON list, not an object of results"), (b"\xff{}", "is not UTF-8 text")]


def damaged_run(run: Path, name: str, content: bytes) -> dict[str, str]:
    run.mkdir()
    (run / name).write_bytes(content)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return tree(run)


@pytest.mark.parametrize("content, problem", DAMAGED_YAML)
def test_a_damaged_config_snapshot_is_one_line(tmp_path, capsys, content, problem):
    run = tmp_path / "run"
    files = damaged_run(run, "uptrain.config.yaml", content)
    assert uptrain(run, ONE_STEP) == 2
    line = one_error_line(capsys)
    assert f"{run / 'uptrain.config.yaml'} {problem}" in line and line.endswith("choose another out="), line
    assert tree(run) == files


@pytest.mark.parametrize("content, problem", DAMAGED_JSON)
@pytest.mark.parametrize("command", ["uptrain", "eval"])
def test_a_damaged_eval_json_is_one_line(tmp_path, capsys, command, content, problem):
    run = tmp_path / "run"
    files = damaged_run(run, "eval.json", content)
    args = [ONE_STEP] if command == "uptrain" else []
    assert main([command, *FAST, f"out={run}", *args]) == 2
    line = one_error_line(capsys)
    assert f"{run / 'eval.json'} {problem}" in line and "move the directory away" in line, line
    assert tree(run) == files


def test_a_metrics_line_cut_short_is_dropped_on_resume_with_a_warning(tmp_path, caplog):
    from supra.train.progress import ProgressLog

    lines = ['{"step": 1, "loss": 2.0}', '[3]', '{"step": "x"}', '', '{"step": 2, "loss": 1.9}', '{"step": 3, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING):
        ProgressLog(tmp_path, total_steps=9, done_steps=2, logger_kind="none", config={}, enabled=True)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [lines[0], lines[4]]
    assert any("dropped 3 line(s)" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------- error type

def test_every_user_error_is_one_type():
    from supra.config import ConfigError
    from supra.data import DataError
    from supra.models import SourceError
    from supra.train.checkpoint import CheckpointError
    from supra.train.trainer import TrainingStopped

    for kind in (ConfigError, DataError, SourceError, CheckpointError, TrainingStopped):
        assert issubclass(kind, UserError)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import supra.commands.eval as command

    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(command, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["eval", "recipe=tiny"])


@pytest.mark.parametrize("command", ["uptrain", "convert", "export"])
def test_an_output_path_that_is_a_file_is_refused(tmp_path, capsys, command):
    out = tmp_path / "taken"
    out.write_text("mine")
    extra = [f"model={tmp_path}"] if command == "export" else []
    assert main([command, *FAST, f"out={out}", *extra]) == 2
    line = one_error_line(capsys)
    assert str(out) in line
    assert out.read_text() == "mine"


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["convert", "recipe=tiny", f"out={model}"]) == 0
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    capsys.readouterr()
    for source, message in ((model, "could not load model"), (tmp_path / "broken", "not a valid JSON file"),
                            (tmp_path / "fake.gguf", "not a GGUF file")):
        assert main(["eval", f"model={source}", f"out={tmp_path / 'eval'}"]) == 2
        line = one_error_line(capsys)
        assert str(source) in line and message in line, line


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "recipe broken is not a mapping of keys to values"),
    ("seq_len: [unclosed\n", "recipe broken is not valid YAML"),
    ("seq_len: -4\n", "seq_len must be an integer >= 1, got -4"),
    ("sequence: 4\n", "recipe broken: unknown key 'sequence'"),
])
def test_a_broken_recipe_is_one_line(monkeypatch, capsys, text, message):
    import supra.config

    monkeypatch.setattr(supra.config, "recipe_names", lambda: ["broken"])
    monkeypatch.setattr(supra.config, "recipe_text", lambda name: text)
    assert main(["eval", "recipe=broken"]) == 2
    assert message in one_error_line(capsys)
