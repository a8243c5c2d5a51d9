"""The three forms of every converted layer agree: parallel (masked quadratic), chunked, recurrent.

A small random Llama is converted with each method; the chunked forward of the whole sequence is
compared with the quadratic reference forms (patched in) and with token-by-token decoding through
the recurrent state, in float64 and float32, with odd lengths, GQA and a state carried across calls.
"""

from __future__ import annotations

import pytest
import torch
from supra.kernels import parallel_linear_attention, parallel_window_hybrid_attention, recurrent_delta_rule
from supra.kernels.sparse_cache import parallel_cached_hybrid_attention
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from supra.layers import attention as attention_module
from supra.layers import gated as gated_module
from supra.layers.cache import cache_kwargs
from supra.layers.linearize import LinearizeSpec, SkippedAttention, linearize, new_parameter_names

SPECS = {  # test name: conversion settings
    "supra": {"method": "supra"},
    "lolcats": {"method": "lolcats"},
    "lolcats-sinks": {"method": "lolcats", "sinks": 3},  # the first 3 tokens stay in the softmax window
    "lolcats-terrace": {"method": "lolcats", "window_kind": "terrace", "sinks": 2},  # blocks of W, with sinks
    # + a sparse cache of 4 pairs per head beyond the window, in runs of 2, one run by recall error (LoLA),
    # one by attention; prompts run past window + budget
    "lolcats-cache": {"method": "lolcats", "window_kind": "terrace", "sinks": 2, "cache_budget": 4, "cache_chunk": 2,
                      "cache_recall": 0.5},
    # the linear part decayed: fixed rates on the sliding window, learned ones on the terrace
    "lolcats-decay": {"method": "lolcats", "sinks": 2, "state_decay": "supra"},
    "lolcats-terrace-learned-decay": {"method": "lolcats", "window_kind": "terrace", "sinks": 2,
                                      "state_decay": "learned"},
    # both, on the sliding window: the cache's pairs exact, the linear state (tokens past the window, folded
    # or evicted) decayed by learned rates
    "lolcats-cache-decay": {"method": "lolcats", "sinks": 2, "cache_budget": 3, "cache_chunk": 1,
                            "cache_recall": 0.34, "state_decay": "learned"},
    "t2r": {"method": "t2r"},
    "gla": {"method": "gla"},  # Liger: key gate + sliding window
    "gla-learned": {"method": "gla", "gate": "learned", "window": 0},
    "gdn": {"method": "gdn"},
    "gdn-learned": {"method": "gdn", "gate": "learned", "decay": "retnet", "window": 0},
    # the window's share per token, with the demo's terrace window and sinks
    "gla-token-mix": {"method": "gla", "window_mix": "token", "window_kind": "terrace", "sinks": 2},
    "gdn-token-mix": {"method": "gdn", "window_mix": "token", "window_kind": "terrace", "sinks": 2},
    # the sparse cache in the gated students' window softmax: runs of 2 with one by recall error of a linear
    # memory of their key features; GLA on the sliding window, GDN on the terrace with sinks
    "gla-cache": {"method": "gla", "cache_budget": 4, "cache_chunk": 2, "cache_recall": 0.5},
    "gdn-cache": {"method": "gdn", "window_mix": "token", "window_kind": "terrace", "sinks": 2, "cache_budget": 4,
                  "cache_chunk": 2, "cache_recall": 0.5},
}
METHODS = list(SPECS)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny_model(kv_heads: int = 4, dtype: torch.dtype = torch.float64, layers: int = 2, **spec) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=101, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(dtype)
    linearize(model, LinearizeSpec(**{"window": 8, **spec}))
    # Untrained maps are near-identity; random ones make the test see every parameter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in set(new_parameter_names(model)):
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def use_parallel_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the layers through the quadratic reference forms instead of the chunked ones (for the
    delta rule, which has no quadratic form, through its token loop)."""
    def linear(q, k, v, log_decay, scale, state, want_state, cu_seqlens=None, backend=None):
        return parallel_linear_attention(q, k, v, log_decay, scale, state, want_state, cu_seqlens)

    def hybrid(q, k, v, fq, fk, gate, window, state, want_state, backend=None, sinks=0, terrace=False,
               log_decay=None, cache_budget=0, cache_chunk=1, cache_recall=0, cache_groups=1):
        assert state is None  # the quadratic form has no state; plain forwards still ask for one
        if cache_budget:
            return parallel_cached_hybrid_attention(q, k, v, fq, fk, gate, window, sinks, cache_budget, log_decay,
                                                    cache_chunk, cache_recall, terrace, cache_groups), None
        return parallel_window_hybrid_attention(q, k, v, fq, fk, gate, window, sinks, terrace, log_decay), None

    def delta(q, k, v, beta, log_decay, scale, state, want_state, cu_seqlens=None, backend=None):
        return recurrent_delta_rule(q, k, v, beta, log_decay, scale, state, want_state, cu_seqlens)

    monkeypatch.setattr(attention_module, "linear_attention", linear)
    monkeypatch.setattr(attention_module, "window_hybrid_attention", hybrid)
    monkeypatch.setattr(gated_module, "window_hybrid_attention", hybrid)
    monkeypatch.setattr(gated_module, "delta_rule", delta)


def decode_token_by_token(model, ids: torch.Tensor, prefill: int = 0) -> torch.Tensor:
    cache = DynamicCache(config=model.config)
    logits = []
    if prefill:
        logits.append(model(ids[:, :prefill], **cache_kwargs(cache), use_cache=True).logits)
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t:t + 1], **cache_kwargs(cache), use_cache=True).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("method", METHODS)
def test_three_forms_agree(method, kv_heads, dtype, monkeypatch):
    model = tiny_model(kv_heads, dtype, **SPECS[method])
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        chunked = model(ids).logits
        recurrent = decode_token_by_token(model, ids)
        carried = decode_token_by_token(model, ids, prefill=21)  # a state carried across two calls
        use_parallel_forms(monkeypatch)
        parallel = model(ids).logits
    assert relative_error(chunked, parallel) < TOLERANCE[dtype]
    assert relative_error(recurrent, parallel) < TOLERANCE[dtype]
    assert relative_error(carried, parallel) < TOLERANCE[dtype]


@pytest.mark.parametrize("method", METHODS)
def test_two_prompt_chunks_continue_exactly(method):
    model = tiny_model(2, **SPECS[method])
    ids = torch.randint(0, 101, (3, 45))
    with torch.no_grad():
        whole = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :19], **cache_kwargs(cache), use_cache=True).logits
        second = model(ids[:, 19:], **cache_kwargs(cache), use_cache=True).logits
    assert relative_error(torch.cat([first, second], 1), whole) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_new_parameters(method):
    model = tiny_model(2, torch.float32, **SPECS[method]).train()
    ids = torch.randint(0, 101, (2, 29))
    model(ids, labels=ids).loss.backward()
    for name in new_parameter_names(model):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", METHODS)
def test_packed_documents_do_not_see_each_other(method):
    model = tiny_model(2, **SPECS[method])
    a, b = torch.randint(0, 101, (1, 13)), torch.randint(0, 101, (1, 20))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(13), torch.arange(20)]).unsqueeze(0)
    with torch.no_grad():
        together = model(packed, position_ids=positions).logits
        alone = torch.cat([model(a).logits, model(b).logits], dim=1)
    assert relative_error(together, alone) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_generates_like_single_prompts(method):
    model = tiny_model(2, **SPECS[method])  # float64: greedy ties in float32 would make the test flaky
    short, long = torch.randint(1, 101, (1, 6)), torch.randint(1, 101, (1, 11))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = (torch.arange(11) >= 5).long().unsqueeze(0).expand(2, -1).clone()
    mask[1] = 1
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    together = model.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(together[0, 5:], model.generate(short, **settings)[0])
    assert torch.equal(together[1], model.generate(long, **settings)[0])


def test_right_padding_with_a_cache_is_refused():
    model = tiny_model(2, method="supra")
    ids = torch.randint(1, 101, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        model(ids, attention_mask=mask, **cache_kwargs(DynamicCache(config=model.config)), use_cache=True)


def test_beam_search_is_refused_clearly():
    model = tiny_model(2, torch.float32, method="supra")
    with pytest.raises(ValueError, match="beam search"):
        model.generate(torch.randint(1, 101, (1, 5)), num_beams=2, max_new_tokens=3, do_sample=False)


def test_softmax_and_skipped_layers_in_one_model():
    model = tiny_model(2, layers=4, method="supra", softmax_layers=[1], skip_layers=[3])
    layers = model.model.layers
    assert type(layers[1].self_attn).__name__ == "LlamaAttention"
    assert isinstance(layers[3].self_attn, SkippedAttention)
    ids = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        whole = model(ids).logits
        recurrent = decode_token_by_token(model, ids, prefill=7)
    assert relative_error(recurrent, whole) < 1e-10


def test_conversion_keeps_pretrained_weights_and_marks_new_ones():
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    model = LlamaForCausalLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linearize(model, LinearizeSpec(method="supra"))
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    new = set(new_parameter_names(model))
    assert new == set(after) - set(before)
    assert all("feature_map" in n for n in new)


def test_bad_spec_values_are_refused():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="valid layers are 0..1"):
        linearize(model, LinearizeSpec(method="supra", softmax_layers=[2]))
    with pytest.raises(ValueError, match="unknown method"):
        linearize(model, LinearizeSpec(method="mamba"))
    with pytest.raises(ValueError, match="cache_budget must be >= 0"):
        linearize(model, LinearizeSpec(method="lolcats", cache_budget=-4))
    with pytest.raises(ValueError, match="cache_budget=4 does nothing with method=t2r; it is for method=lolcats, "
                                         "gla, gdn"):
        linearize(model, LinearizeSpec(method="t2r", cache_budget=4, cache_chunk=4))
    with pytest.raises(ValueError, match="cache_budget=4 does nothing with method=gdn and window=0"):
        linearize(model, LinearizeSpec(method="gdn", window=0, cache_budget=4, cache_chunk=4))


def test_per_token_decay_follows_packed_documents():
    """Gated variants give a log decay per token (B, T, H); rows holding several documents are packed
    into one varlen row, and the decay must be packed the same way."""
    layer = next(m for m in tiny_model(4, method="supra").modules() if isinstance(m, attention_module.SupraAttention))
    B, T, H, K = 2, 11, 4, 8
    q, k, v = (torch.randn(B, T, H, K, dtype=torch.float64) for _ in range(3))
    log_decay = -torch.rand(B, T, H, dtype=torch.float64)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 0], starts[0, 5], starts[1, 8] = True, True, True
    out, _ = layer.linear_mix(q, k, v, log_decay, 0.5, None, starts, want_state=False)
    for row, cut in ((0, 5), (1, 8)):
        for lo, hi in ((0, cut), (cut, T)):
            part = slice(lo, hi)
            expected, _ = parallel_linear_attention(q[row:row + 1, part], k[row:row + 1, part], v[row:row + 1, part],
                                                    log_decay[row:row + 1, part], 0.5)
            assert relative_error(out[row:row + 1, part], expected) < 1e-10
