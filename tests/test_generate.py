"""What a user of `generate()` sees: each decode step is one token fed into the carried state, and
its logits are those of a full forward over the whole sequence.

Greedy tokens alone would not catch a lost state: a model that silently runs without it still
picks plausible argmaxes. These tests compare the logits of every step."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from supra.export import export
from supra.layers.linearize import LinearizeSpec, linearize, new_parameter_names

pytestmark = pytest.mark.slow

PROMPT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
          "    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n    return b\n\n\ndef factorial(n):")


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb the new weights: a reload that re-initialised them, or a lost state, would show."""
    torch.manual_seed(0)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in new_parameter_names(model):
            params[name].add_(0.05 * torch.randn_like(params[name]))
    return model


def decode_step_inputs(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Record the number of tokens of every forward of the decoder."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        lengths.append(ids.shape[1])

    return lengths, model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def assert_generate_matches_full_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                                         new_tokens: int = 8) -> None:
    lengths, handle = decode_step_inputs(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    handle.remove()
    assert lengths == [ids.shape[1]] + [1] * (new_tokens - 1), f"decoder inputs per call: {lengths}"
    sequences = out.sequences
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new_tokens, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        full = model(input_ids=sequences, attention_mask=full_mask, use_cache=False).logits
    prompt = ids.shape[1]
    for step, logits in enumerate(out.logits):
        expected = full[:, prompt - 1 + step]
        error = ((logits - expected).norm() / expected.norm()).item()
        assert error < 1e-4, f"decode step {step}: relative logit error {error:.2e} against a full forward"


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: a long prompt (past the 64-token window) and a short one."""
    batch = smollm2_tokenizer([PROMPT, "import os\nimport sys\n"], return_tensors="pt", padding=True,
                              padding_side="left")
    assert batch["input_ids"].shape[1] > 64
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("method", ["lolcats", "supra", "gla", "gdn"])
def test_generate_on_a_converted_smollm2_feeds_one_token_per_step_and_matches_a_full_forward(
        smollm2, prompts, method):
    model = trained_looking(linearize(copy.deepcopy(smollm2), LinearizeSpec(method=method)))
    assert_generate_matches_full_forward(model, *prompts)


# The exported sparse cache: terrace blocks of 16, sinks, 4 pairs per head; the long prompt runs past
# window + budget, so the cache fills and evicts before and while decoding.
CACHE_SPEC = {"window_kind": "terrace", "window": 16, "sinks": 2, "cache_budget": 4, "cache_chunk": 2,
              "cache_recall": 0.5}


@pytest.mark.parametrize("settings", [{}, CACHE_SPEC], ids=["lolcats", "lolcats-cache"])
def test_generate_on_an_exported_smollm2_matches_a_full_forward(smollm2, smollm2_tokenizer, prompts, tmp_path,
                                                                monkeypatch, settings):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    model = trained_looking(linearize(copy.deepcopy(smollm2), LinearizeSpec(method="lolcats", **settings)))
    out = export(model, smollm2_tokenizer, tmp_path / "export", dtype="float32")
    assert all(json.loads((out / "config.json").read_text())["supra"][k] == v for k, v in settings.items())
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "SupraForCausalLM"
    assert_generate_matches_full_forward(loaded, *prompts)


def test_a_cache_under_an_unknown_argument_name_is_an_error(smollm2):
    """A future rename must not silently drop the state: the layer refuses a cache it cannot place."""
    from transformers import DynamicCache

    model = linearize(copy.deepcopy(smollm2), LinearizeSpec(method="supra"))
    attention = model.get_decoder().layers[0].self_attn
    hidden = torch.randn(1, 3, model.config.hidden_size)
    rotary = model.get_decoder().rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(TypeError, match="'recurrent_cache', an argument supra does not know"):
        attention(hidden, rotary, recurrent_cache=DynamicCache(config=model.config))
    with pytest.raises(TypeError, match="use_cache=True but found no cache"):
        attention(hidden, rotary, use_cache=True)
