"""supra uptrain on the tiny recipe: stages learn, resume is exact, signals and bad steps are handled,
two processes train with FSDP2, and dry runs plan 7B jobs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from supra.cli import main
from supra.train.trainer import REQUEUE_EXIT_CODE

FAST = ["recipe=tiny", "train.eval_baselines=false", "train.sample_tokens=0", "train.logger=none"]


def losses(run: Path) -> list[tuple[int, str, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["stage"], r["loss"]) for r in records if "loss" in r]


def uptrain_process(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "supra.cli", "uptrain", *FAST, f"out={run}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("stages", [
    "[{name: attention_transfer, tokens: 5120, lr: 1e-2, min_lr: 1e-2, warmup_steps: 1}]",
    "[{name: full, tokens: 5120, lr: 3e-3, min_lr: 3e-3, warmup_steps: 1}]",
])
def test_each_stage_lowers_its_loss(tmp_path, stages):
    run = tmp_path / "run"
    assert main(["uptrain", *FAST, f"out={run}", f"train.stages={stages}", "data.shuffle_buffer=0"]) == 0
    values = [loss for _, _, loss in losses(run)]
    assert len(values) == 20
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5
    assert (run / "model" / "config.json").exists()


def test_lora_lowers_the_loss_of_a_converted_smollm2(tmp_path, smollm2_dir):
    # A random model's logits are near uniform whatever its adapters do, so LoRA is tested on the real one.
    run = tmp_path / "run"
    assert main(["uptrain", "recipe=smollm2-135m", f"out={run}", "seq_len=64", "train.batch_tokens=128",
                 "train.micro_batch_size=2", "train.eval_baselines=false", "train.sample_tokens=0",
                 "train.logger=none", "eval.max_tokens=256", "data.shuffle_buffer=0",
                 "train.stages=[{name: lora, tokens: 768, lr: 2e-3, min_lr: 2e-3, warmup_steps: 1}]"]) == 0
    values = [loss for _, _, loss in losses(run)]
    assert len(values) == 6
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2


def test_kill_9_then_rerun_continues_exactly(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(["uptrain", *FAST, f"out={reference}"]) == 0
    process = uptrain_process(killed)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-00000010").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert main(["uptrain", *FAST, f"out={killed}"]) == 0
    assert losses(killed) == losses(reference)  # bit for bit, also across the stage boundary


def test_a_partial_checkpoint_is_ignored(tmp_path):
    run = tmp_path / "run"
    assert main(["uptrain", *FAST, f"out={run}", "train.keep_checkpoints=5"]) == 0
    complete = sorted((run / "checkpoints").glob("step-*"))
    # A job killed while writing step 20 leaves a .tmp directory and step 15 as the latest.
    last = complete[-1]
    last.rename(last.with_name(f".{last.name}.tmp"))
    (last.with_name(f".{last.name}.tmp") / "__0_0.distcp").write_bytes(b"truncated")
    import shutil

    shutil.rmtree(run / "model")
    before = losses(run)
    assert main(["uptrain", *FAST, f"out={run}", "train.keep_checkpoints=5"]) == 0
    assert losses(run) == before
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_sigterm_checkpoints_and_exits_with_the_requeue_code(tmp_path):
    run = tmp_path / "run"
    process = uptrain_process(run)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len(losses(run)) < 3:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == REQUEUE_EXIT_CODE, output
    step = losses(run)[-1][0]
    assert (run / "checkpoints" / f"step-{step:08d}").exists()
    assert main(["uptrain", *FAST, f"out={run}"]) == 0
    assert losses(run)[-1][0] == 20


def test_diverging_loss_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    import supra.train.trainer as trainer

    real = trainer.micro_batch_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] > 14 else loss

    monkeypatch.setattr(trainer, "micro_batch_loss", poisoned)
    run = tmp_path / "run"
    assert main(["uptrain", *FAST, f"out={run}", "train.max_bad_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "non-finite steps in a row" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step-00000005").exists()


def test_two_processes_train_with_fsdp2_and_resume(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = ["uptrain", *FAST, f"out={run}", "train.stages=[{name: attention_transfer, tokens: 1280, lr: 1e-2},"
                "{name: lora, tokens: 1280, lr: 1e-3}]"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "supra.cli", *settings]
    first = subprocess.run([*command, "train.checkpoint_every=2"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = losses(run)
    assert [r[0] for r in records] == list(range(1, 11))
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000010").glob("rank-*.pt")) == ["rank-0.pt",
                                                                                                 "rank-1.pt"]
    assert all(math.isfinite(r[2]) for r in records)
    # Resuming from the step-8 checkpoint repeats steps 9-10 exactly.
    import shutil

    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints" / "step-00000010")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert losses(run) == records
    # One process cannot take over two ranks' data positions.
    shutil.rmtree(run / "model")
    alone = subprocess.run([sys.executable, "-m", "supra.cli", *settings], env=env, capture_output=True, text=True,
                           timeout=600)
    assert alone.returncode == 2 and "written by 2 processes, this job has 1" in alone.stderr, alone.stderr[-2000:]


@pytest.mark.parametrize("recipe, expected", [("mistral7b", "total 7.812B, new 0.571B"),
                                              ("llama7b", "total 7.275B, new 0.537B")])
def test_dry_run_plans_a_7b_job_in_seconds(recipe, expected, capsys):
    started = time.time()
    assert main(["uptrain", f"recipe={recipe}", "train.dry_run=true", "train.world_size=8"]) == 0
    out = capsys.readouterr().out
    assert time.time() - started < 30
    assert expected in out  # Mistral-SUPRA: ~7.8B parameters, ~0.57B new, as SUPRA reports
    assert "estimated wall time" in out and "memory" in out


def test_resuming_with_other_settings_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["uptrain", *FAST, f"out={run}", "train.stages=[{name: full, tokens: 512, lr: 1e-3}]"]) == 0
    assert main(["uptrain", *FAST, f"out={run}", "train.stages=[{name: full, tokens: 512, lr: 1e-2}]"]) == 2
    assert "different settings" in capsys.readouterr().err


def test_eval_every_logs_heldout_perplexity(tmp_path):
    run = tmp_path / "run"
    assert main(["uptrain", *FAST, f"out={run}", "train.eval_every=4", "eval.max_tokens=256"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [(r["step"], r["stage"]) for r in records if "heldout_ppl" in r]
    # every 4 steps of each 10-step stage, and at each stage's end
    assert evaluated == [(4, "attention_transfer"), (8, "attention_transfer"), (10, "attention_transfer"),
                         (14, "lora"), (18, "lora"), (20, "lora")]
    assert all(math.isfinite(r["heldout_ppl"]) and r["heldout_tokens"] == 256 for r in records if "heldout_ppl" in r)


def test_dry_run_of_a_named_source_reads_its_config_locally(smollm2_dir, capsys):
    assert main(["uptrain", "recipe=smollm2-135m", "train.dry_run=true", "train.world_size=1"]) == 0
    assert "parameters: total 0.136B" in capsys.readouterr().out


BLOCKS = [*FAST, "architecture.num_hidden_layers=4", "train.grad_clip=1e9", "data.shuffle_buffer=0"]


def transfer_stage(block_layers: int) -> str:
    return (f"train.stages=[{{name: attention_transfer, tokens: 2560, lr: 1e-2, min_lr: 1e-3, warmup_steps: 2, "
            f"block_layers: {block_layers}}}]")


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def test_blockwise_transfer_equals_whole_model_transfer(tmp_path):
    """Teacher forcing makes each layer's loss depend on its own maps only, so training blocks of
    layers one after another from cached inputs (AdamW is per parameter; clipping off) must give
    the weights that training all layers together gives."""
    whole, blocks = tmp_path / "whole", tmp_path / "blocks"
    assert main(["uptrain", *BLOCKS, f"out={whole}", transfer_stage(0)]) == 0
    assert main(["uptrain", *BLOCKS, f"out={blocks}", transfer_stage(2)]) == 0
    expected, got = final_weights(whole), final_weights(blocks)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert [r[0] for r in losses(blocks)] == list(range(1, 21))  # 10 steps per block, 2 blocks
    # Against the untrained conversion: every new parameter moved, every pretrained one did not.
    from safetensors.torch import load_file

    assert main(["convert", "recipe=tiny", "architecture.num_hidden_layers=4", f"out={tmp_path / 'untrained'}"]) == 0
    untrained = load_file(tmp_path / "untrained" / "model.safetensors")
    for name, value in untrained.items():
        new = ".feature_map_" in name or name.endswith("window_factor")
        assert torch.equal(got[name], value) != new, name
    assert not (blocks / "blocks").exists() or not any((blocks / "blocks").iterdir())  # cache removed


def test_blockwise_transfer_resumes_at_the_unfinished_block(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert main(["uptrain", *BLOCKS, f"out={reference}", transfer_stage(2)]) == 0
    process = uptrain_process(stopped, *BLOCKS[len(FAST):], transfer_stage(2))
    deadline = time.time() + 300
    while not (stopped / "blocks" / "stage-0" / "block-0.pt").exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == REQUEUE_EXIT_CODE, output
    assert main(["uptrain", *BLOCKS, f"out={stopped}", transfer_stage(2)]) == 0
    expected, got = final_weights(reference), final_weights(stopped)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert losses(stopped)[10:] == losses(reference)[10:]  # block 2 reran from its first step


def test_blockwise_transfer_refuses_several_processes():
    from omegaconf import OmegaConf

    from supra.config import ConfigError
    from supra.train.blockwise import check_blockwise

    with pytest.raises(ConfigError, match="one process"):
        check_blockwise([OmegaConf.create({"block_layers": 2})], distributed=True)
