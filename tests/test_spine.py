"""The spine on the real SmolLM2-135M and through the CLI: sources, convert, eval, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

from supra.cli import main
from supra.layers.cache import cache_kwargs
from supra.layers.linearize import LinearizeSpec, linearize, new_parameter_names
from supra.models import SourceError, load_model, resolve_source

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method, prefill", [("supra", 0), ("lolcats", 200), ("t2r", 200)])
def test_smollm2_chunked_forward_equals_token_by_token_decoding(smollm2, method, prefill):
    """300 tokens one at a time for SUPRA; the others decode the last 100 after a chunked prefill
    (the same recurrent code path, a third of the CI time)."""
    model = linearize(copy.deepcopy(smollm2), LinearizeSpec(method=method))
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chunked = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True).logits] if prefill else []
        steps += [model(ids[:, t:t + 1], **cache_kwargs(cache), use_cache=True).logits for t in range(prefill, 300)]
    recurrent = torch.cat(steps, dim=1)
    assert ((recurrent - chunked).norm() / chunked.norm()).item() < 1e-4
    out = model.generate(ids[:, :12], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)


def test_convert_and_eval_through_the_cli(tmp_path, smollm2_dir):
    out = tmp_path / "smol-lolcats"
    assert main(["convert", "model=smollm2-135m", "method=lolcats", f"out={out}"]) == 0
    converted = load_model(str(out))
    original = load_model("smollm2-135m")
    new = set(new_parameter_names(converted))
    assert new and all(".self_attn.feature_map_" in n or n.endswith("window_factor") for n in new)
    converted_state = converted.state_dict()
    for name, value in original.state_dict().items():  # everything pretrained is bit-identical
        assert torch.equal(converted_state[name], value), name

    evaluated = tmp_path / "eval"
    assert main(["eval", f"model={out}", "tasks=[ppl]", "eval.max_tokens=1024", "seq_len=256", f"out={evaluated}"]) == 0
    result = json.loads((evaluated / "eval.json").read_text())["ppl"]
    assert result["tokens"] == 1024 and 1 < result["ppl"] < 1e6
    assert [b["start"] for b in result["by_position"]] == [0, 64, 128]
    assert (evaluated / "eval.config.yaml").exists()


def test_converting_over_an_existing_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "recipe=tiny", f"out={out}"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_tiny_recipe_converts_and_evaluates(tmp_path, monkeypatch):
    # Eval writes under runs/eval/<name>, never into the model folder, and records the model's own
    # conversion (supra, with its window), not the recipe's (lolcats).
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tiny"
    assert main(["convert", "recipe=tiny", "method=supra", f"out={out}"]) == 0
    model_files = sorted(p.name for p in out.iterdir())
    assert main(["eval", "recipe=tiny", "model=" + str(out), "eval.max_tokens=256"]) == 0
    evaluated = tmp_path / "runs" / "eval" / "tiny"
    assert json.loads((evaluated / "eval.json").read_text())["ppl"]["tokens"] == 256
    assert sorted(p.name for p in out.iterdir()) == model_files
    record = OmegaConf.load(evaluated / "eval.config.yaml")
    assert record.method == "supra" and record.model == str(out)


@pytest.mark.parametrize("args, message", [
    (["eval", "recipe=nope"], "unknown recipe 'nope'; valid recipes:"),
    (["eval", "sequence_length=5"], "unknown key 'sequence_length'; valid keys:"),
    (["eval", "seq_len=abc"], "bad value for seq_len"),
    (["eval", "method=mamba"], "unknown method 'mamba'; valid: supra, lolcats, t2r"),
    (["eval", "tasks=[nope]"], "unknown eval task 'nope'"),
    (["eval", "model=/no/such/dir"], "model not found"),
    (["eval", "model=missing.gguf"], "GGUF file not found"),
    (["convert", "recipe=tiny", "softmax_layers=[7]"], "valid layers are 0..1"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["eval", "data.source=/no/such/file.jsonl"], "/no/such/file.jsonl"),
])
def test_user_mistakes_get_one_line_and_exit_2(args, message, capsys, tmp_path):
    code = main([*args, f"out={tmp_path / 'run'}"] if args[0] != "frobnicate" else args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_entry_point_has_no_traceback_for_mistakes():
    done = subprocess.run([sys.executable, "-m", "supra.cli", "eval", "recipe=nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "valid recipes" in done.stderr


def test_unsupported_architecture_is_refused(tmp_path):
    with pytest.raises(SourceError, match="unsupported architecture 'gpt2'"):
        load_model("random", architecture={"model_type": "gpt2", "n_layer": 1})
    with pytest.raises(SourceError, match="model not found"):
        resolve_source("./nothing/here")
