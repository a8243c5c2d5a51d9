"""Attention-sublayer skipping: exactness, scoring, choosing, saving, hybrids, and user mistakes.

Everything runs on a random 4-layer Llama (the tiny recipe with two more layers), so the file takes
seconds; the CLI calls need only the SmolLM2 tokenizer.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from supra.cli import main
from supra.commands.settings import calibration
from supra.config import ConfigError, load_config
from supra.layers.cache import cache_kwargs
from supra.layers.linearize import (
    LinearizeSpec,
    SkippedAttention,
    decoder_layers,
    linearize,
    new_parameter_names,
    recorded_spec,
)
from supra.models import load_model
from supra.skip import apply_skip, attention_similarity, choose_layers, select_and_skip

TINY4 = ["recipe=tiny", "architecture.num_hidden_layers=4", "calibration_tokens=512"]


@pytest.fixture
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return AutoModelForCausalLM.from_config(config).eval()


def token_batches(count: int = 2, rows: int = 2, length: int = 24) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (rows, length), generator=generator) for _ in range(count)]


def zero_attention_output(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """The hand-built reference: attention still runs but its o_proj is zero, so it adds nothing."""
    with torch.no_grad():
        for idx in layers:
            decoder_layers(model)[idx].self_attn.o_proj.weight.zero_()
    return model


def test_skipped_model_equals_model_without_those_sublayers(llama):
    reference = zero_attention_output(copy.deepcopy(llama), [1, 2])
    skipped = apply_skip(copy.deepcopy(llama), [1, 2])
    skipped_flags = [isinstance(layer.self_attn, SkippedAttention) for layer in decoder_layers(skipped)]
    assert skipped_flags == [False, True, True, False]
    spec = recorded_spec(skipped)
    assert spec.skip_layers == [1, 2] and spec.method == "softmax"
    ids = token_batches(1)[0]
    with torch.no_grad():
        expected, got, full = reference(ids).logits, skipped(ids).logits, llama(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # the removed sublayers did matter


def test_skipped_model_generates_like_its_full_forward(llama):
    """generate() (with its cache) on a model whose first sublayer is gone matches greedy argmax."""
    model = apply_skip(llama, [0, 2])
    prompt = token_batches(1, rows=1, length=8)[0]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        sequence = prompt
        for _ in range(6):
            following = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, following], dim=1)
    assert torch.equal(generated, sequence)


def test_a_cache_without_cache_position_keeps_positions_when_layer_0_is_skipped(llama):
    """Called directly, with a DynamicCache and no cache_position, positions come from the cache's
    length, which transformers reads from layer 0's slot: the skipped sublayer must count tokens."""
    from transformers import DynamicCache

    model = apply_skip(llama, [0])
    ids = token_batches(1, rows=1, length=10)[0]
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :6], **cache_kwargs(cache), use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], **cache_kwargs(cache), use_cache=True).logits for t in range(6, 10)]
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_similarity_scores_match_a_hand_computation_and_rank_a_silent_sublayer_first(llama):
    zero_attention_output(llama, [2])
    batches = token_batches()
    scores = attention_similarity(llama, batches)
    assert len(scores) == 4 and all(-1.0 <= s <= 1.0 for s in scores)
    assert scores[2] == pytest.approx(1.0, abs=1e-6)
    assert choose_layers(scores, 4, "similarity", 1) == [2]
    assert choose_layers(scores, 4, "similarity", 2) == sorted([2, max((0, 1, 3), key=lambda i: scores[i])])

    # layer 0 by hand: the residual entering it is the embedding; after it, embedding + attention
    layer, inner = decoder_layers(llama)[0], llama.get_decoder()
    cosines = []
    with torch.no_grad():
        for ids in batches:
            before = inner.embed_tokens(ids)
            positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
            mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
            attn, _ = layer.self_attn(layer.input_layernorm(before), inner.rotary_emb(before, positions), mask)
            cosines.append(torch.nn.functional.cosine_similarity(before, before + attn, dim=-1).flatten())
    assert scores[0] == pytest.approx(torch.cat(cosines).mean().item(), abs=1e-5)


def test_choose_layers_last_and_candidates():
    assert choose_layers(None, 6, "last", 2) == [4, 5]
    assert choose_layers(None, 6, "last", 0) == []
    assert choose_layers(None, 6, "last", 2, candidates=[0, 1, 2, 3, 5]) == [3, 5]
    assert choose_layers([0.1, 0.9, 0.5, 0.95], 4, "similarity", 2, candidates=[0, 1, 2]) == [1, 2]
    for n in (-1, 7):
        with pytest.raises(ConfigError, match=r"n must be in 0\.\.6"):
            choose_layers(None, 6, "last", n)


def test_skipping_a_converted_model_keeps_its_recurrent_layers(llama):
    converted = linearize(llama, LinearizeSpec(method="supra", softmax_layers=[0]))
    before = set(new_parameter_names(converted))
    kept = decoder_layers(converted)[1].self_attn
    apply_skip(converted, [3])
    kinds = [type(layer.self_attn).__name__ for layer in decoder_layers(converted)]
    assert kinds == ["LlamaAttention", "SupraAttention", "SupraAttention", "SkippedAttention"]
    assert decoder_layers(converted)[1].self_attn is kept  # not wrapped a second time
    assert set(new_parameter_names(converted)) == {n for n in before if ".layers.3." not in n}
    spec = recorded_spec(converted)
    assert (spec.method, spec.softmax_layers, spec.skip_layers) == ("supra", [0], [3])


def test_select_and_skip_never_picks_kept_softmax_or_skipped_layers(llama, smollm2_tokenizer):
    cfg = load_config([*TINY4, "n=2", "select=last", "softmax_layers=[3]", "skip_layers=[0]"])
    result = select_and_skip(llama, cfg.skip_layers, cfg.softmax_layers, cfg.n, cfg.select,
                             calibration(cfg, smollm2_tokenizer))
    assert result.candidates == [1, 2] and result.chosen == [0, 1, 2] and result.skip_layers == [0, 1, 2]
    assert result.scores is None


def test_skip_command_saves_a_model_that_reloads_with_its_skip_list(tmp_path, smollm2_tokenizer):
    out = tmp_path / "skipped"
    assert main(["skip", *TINY4, "n=2", f"out={out}"]) == 0
    report = json.loads((out / "skip.json").read_text())
    assert len(report["scores"]) == 4 and len(report["chosen"]) == 2 == len(report["skip_layers"])
    assert report["chosen"] == choose_layers(report["scores"], 4, "similarity", 2)
    assert OmegaConf.load(out / "skip.config.yaml").n == 2

    reloaded = load_model(str(out)).eval()
    assert recorded_spec(reloaded).skip_layers == report["chosen"]
    assert [i for i, layer in enumerate(decoder_layers(reloaded))
            if isinstance(layer.self_attn, SkippedAttention)] == report["chosen"]
    # the same random model, rebuilt with the same seed and skipped in memory, gives the same logits
    cfg = load_config(TINY4)
    torch.manual_seed(cfg.seed)
    fresh = load_model("random", architecture=OmegaConf.to_container(cfg.architecture)).eval()
    apply_skip(fresh, report["chosen"])
    ids = token_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, fresh(ids).logits, rtol=0, atol=1e-5)

    assert main(["eval", *TINY4, f"model={out}", "eval.max_tokens=128", f"out={tmp_path / 'eval'}"]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["ppl"]["tokens"] == 128


def test_hybrid_skip_softmax_and_linear_in_one_recipe_then_skip_on_top(tmp_path, smollm2_tokenizer):
    converted, skipped = tmp_path / "hybrid", tmp_path / "hybrid-skip"
    assert main(["convert", *TINY4, "method=supra", "softmax_layers=[0]", "skip_layers=[1]", f"out={converted}"]) == 0
    assert main(["skip", *TINY4, f"model={converted}", "select=last", "n=1", f"out={skipped}"]) == 0
    model = load_model(str(skipped))
    kinds = [type(layer.self_attn).__name__ for layer in decoder_layers(model)]
    assert kinds == ["LlamaAttention", "SkippedAttention", "SupraAttention", "SkippedAttention"]
    spec = recorded_spec(model)
    assert spec.skip_layers == [1, 3] and spec.softmax_layers == [0]
    # the feature maps of the kept linear layer survived the second save
    original = load_model(str(converted))
    torch.testing.assert_close(decoder_layers(model)[2].self_attn.feature_map_q.weight,
                               decoder_layers(original)[2].self_attn.feature_map_q.weight)


def test_convert_applies_select_and_n_before_linearizing(tmp_path, smollm2_tokenizer):
    out = tmp_path / "converted"
    assert main(["convert", *TINY4, "method=lolcats", "select=last", "n=2", "softmax_layers=[3]", f"out={out}"]) == 0
    spec = recorded_spec(load_model(str(out)))
    assert (spec.method, spec.skip_layers, spec.softmax_layers) == ("lolcats", [1, 2], [3])


@pytest.mark.parametrize("args, message", [
    (["n=-1"], "n must be an integer >= 0, got -1"),  # checked with the config, before the model loads
    (["n=5"], "n must be in 0..4"),
    ([], "nothing to skip: set n=K with K in 1..4"),
    (["n=1", "select=first"], "unknown select 'first'; valid: similarity, last"),
    (["n=1", "skip_layers=[9]"], "skip_layers has layer 9; valid layers are 0..3"),
])
def test_bad_skip_requests_are_one_line_errors(args, message, tmp_path, capsys, smollm2_tokenizer):
    out = tmp_path / "never"
    assert main(["skip", *TINY4, *args, f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_export_of_a_skipped_model_keeps_the_skip_list(tmp_path, monkeypatch, smollm2_tokenizer):
    """supra skip -> supra export -> loaded by transformers alone (remote code) and by supra."""
    from transformers import AutoModelForCausalLM as Auto

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    skipped, exported = tmp_path / "skipped", tmp_path / "exported"
    assert main(["skip", *TINY4, "select=last", "n=2", f"out={skipped}"]) == 0
    assert main(["export", *TINY4, f"model={skipped}", f"out={exported}"]) == 0
    ids = token_batches(1)[0]
    original = load_model(str(skipped)).eval()
    plain = Auto.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    via_supra = load_model(str(exported)).eval()
    for model in (plain, via_supra):
        assert recorded_spec(model).skip_layers == [2, 3]
    with torch.no_grad():
        expected = original(ids).logits
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(via_supra(ids).logits, expected, rtol=0, atol=1e-5)
