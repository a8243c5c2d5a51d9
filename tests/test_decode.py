"""The one-token decode paths: every method's step (linear_attention_step, the hybrid's ring buffer)
against the chunked forward of the whole sequence, with left padding, a state carried across prompt
chunks and more decoded tokens than the window holds; and `generate()` really takes them."""

from __future__ import annotations

import pytest
import torch
from supra.kernels import (
    parallel_window_hybrid_attention,
    stack_states,
    window_hybrid_attention,
    window_hybrid_step,
)
from test_layers import METHODS, SPECS, TOLERANCE, relative_error, tiny_model
from transformers import DynamicCache

from supra.layers import attention as attention_module
from supra.layers import gated as gated_module
from supra.layers.cache import cache_kwargs

WINDOW = 8  # tiny_model's window: 21 decoded tokens wrap the ring more than twice


def count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the kernel entry points the layers call: one-token steps and whole-sequence forms."""
    calls = {"step": 0, "sequence": 0}

    def counted(module, name: str, kind: str):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module in (attention_module, gated_module):
        for name in ("linear_attention_step", "window_hybrid_step", "delta_rule_step"):
            if hasattr(module, name):
                counted(module, name, "step")
        for name in ("linear_attention", "window_hybrid_attention", "delta_rule"):
            if hasattr(module, name):
                counted(module, name, "sequence")
    return calls


def kernels_per_layer(method: str) -> int:
    """Kernel calls per layer and forward: the gated students add a sliding-window softmax to theirs."""
    spec = SPECS[method]
    return 2 if spec["method"] in ("gla", "gdn") and spec.get("window", WINDOW) > 0 else 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_steps_match_the_chunked_forward_with_left_padding(method, dtype, monkeypatch):
    model = tiny_model(2, dtype, **SPECS[method])
    B, pad, prompt, new = 3, (0, 4, 9), 13, 21
    ids = torch.randint(1, 101, (B, prompt + new))
    mask = torch.ones(B, prompt + new, dtype=torch.long)
    for row, p in enumerate(pad):
        mask[row, :p] = 0
    calls = count_calls(monkeypatch)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        logits = []
        for lo, hi in ((0, 6), (6, prompt)):  # the prompt in two chunks: a state carried between them
            logits.append(model(ids[:, lo:hi], attention_mask=mask[:, :hi], **cache_kwargs(cache),
                                use_cache=True).logits)
        before = dict(calls)
        for t in range(prompt, prompt + new):
            logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], **cache_kwargs(cache),
                                use_cache=True).logits)
    layers = model.config.num_hidden_layers * kernels_per_layer(method)
    assert calls["step"] - before["step"] == new * layers and calls["sequence"] == before["sequence"]
    real = mask.bool()
    assert relative_error(torch.cat(logits, 1)[real], whole[real]) < TOLERANCE[dtype]


@pytest.mark.parametrize("method", METHODS)
def test_generate_takes_the_one_token_step(method, monkeypatch):
    model = tiny_model(2, torch.float32, **SPECS[method])
    calls = count_calls(monkeypatch)
    new_tokens = 5
    model.generate(torch.randint(1, 101, (2, 7)), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    layers = model.config.num_hidden_layers * kernels_per_layer(method)
    assert calls == {"step": (new_tokens - 1) * layers, "sequence": layers}


def random_hybrid_inputs(B: int, T: int, H: int = 3, D: int = 8, E: int = 5, Fd: int = 6,
                         dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    q, k = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, E, dtype=dtype)
    fq, fk = torch.rand(B, T, H, Fd, dtype=dtype), torch.rand(B, T, H, Fd, dtype=dtype)
    return q, k, v, fq, fk, torch.rand(H, dtype=dtype)


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("prefill", [0, 3, WINDOW, 19])
def test_the_ring_buffer_wraps_past_the_window(prefill, sinks):
    """Prefill (shorter or longer than the window, or a single token), then more than 3W steps: every
    step's output is the definition's, and the ring ends where a whole-sequence call puts it. With
    sinks, a prompt shorter than them leaves sink slots that the steps fill."""
    T = prefill + 3 * WINDOW + 5
    q, k, v, fq, fk, gate = random_hybrid_inputs(2, T)
    expected = parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks)
    first = max(prefill, 1)
    out, state = window_hybrid_attention(*(x[:, :first] for x in (q, k, v, fq, fk)), gate, WINDOW,
                                         output_final_state=True, sinks=sinks)
    outs = [out]
    for t in range(first, T):
        y, state = window_hybrid_step(q[:, t], k[:, t], v[:, t], fq[:, t], fk[:, t], gate, state)
        outs.append(y.unsqueeze(1))
    assert relative_error(torch.cat(outs, 1), expected) < 1e-12
    # The stepped ring, continued by a whole-sequence call, equals one call over everything.
    _, whole = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, sinks=sinks)
    more = random_hybrid_inputs(2, 11)
    after_steps, _ = window_hybrid_attention(*more[:5], gate, WINDOW, state, sinks=sinks)
    after_whole, _ = window_hybrid_attention(*more[:5], gate, WINDOW, whole, sinks=sinks)
    assert relative_error(after_steps, after_whole) < 1e-12
    assert relative_error(state.kv, whole.kv) < 1e-12


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("prefill", [1, 5, WINDOW + 3, 2 * WINDOW + 5])
def test_terrace_forms_agree(prefill, sinks):
    """The terrace (own block + the previous one): the definition, one blocked call, and a prompt in
    two chunks (a state carried between them) then steps past several blocks agree, and the stepped
    state is the one a whole-sequence call leaves."""
    chunk = 7
    T = prefill + chunk + 3 * WINDOW + 2
    q, k, v, fq, fk, gate = random_hybrid_inputs(2, T)
    expected = parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks, terrace=True)
    assert relative_error(parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks), expected) > 1e-3
    one_call, whole = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, sinks=sinks,
                                              terrace=True)
    assert relative_error(one_call, expected) < 1e-10
    outs, state = [], None
    for lo, hi in ((0, prefill), (prefill, prefill + chunk)):
        out, state = window_hybrid_attention(*(x[:, lo:hi] for x in (q, k, v, fq, fk)), gate, WINDOW, state,
                                             output_final_state=True, sinks=sinks, terrace=True)
        outs.append(out)
    for t in range(prefill + chunk, T):
        y, state = window_hybrid_step(q[:, t], k[:, t], v[:, t], fq[:, t], fk[:, t], gate, state)
        outs.append(y.unsqueeze(1))
    assert relative_error(torch.cat(outs, 1), expected) < 1e-10
    assert relative_error(state.kv, whole.kv) < 1e-10 and torch.equal(state.phase, whole.phase)
    more = random_hybrid_inputs(2, 11)  # the stepped ring continues as the whole call's does
    after_steps, _ = window_hybrid_attention(*more[:5], gate, WINDOW, state, sinks=sinks, terrace=True)
    after_whole, _ = window_hybrid_attention(*more[:5], gate, WINDOW, whole, sinks=sinks, terrace=True)
    assert relative_error(after_steps, after_whole) < 1e-10


@pytest.mark.parametrize("sinks", [0, 2])
def test_terrace_rows_at_different_places_in_their_blocks(sinks):
    """Rows whose documents began at different times (left padding) sit at different places in their
    blocks: a chunk continuing both, then steps, are each row's definition."""
    T, read, chunk = 5 * WINDOW, (5, 2 * WINDOW + 3), 6
    q, k, v, fq, fk, gate = random_hybrid_inputs(2, T)
    expected = parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks, terrace=True)
    rows = [window_hybrid_attention(*(x[b:b + 1, :read[b]] for x in (q, k, v, fq, fk)), gate, WINDOW,
                                    output_final_state=True, sinks=sinks, terrace=True)[1] for b in range(2)]
    state = stack_states(rows)
    assert state.phase.tolist() == [5, 3]

    def rows_at(x: torch.Tensor, offset: int, length: int) -> torch.Tensor:  # row b from read[b] + offset
        return torch.stack([x[b, read[b] + offset:read[b] + offset + length] for b in range(2)])

    out, state = window_hybrid_attention(*(rows_at(x, 0, chunk) for x in (q, k, v, fq, fk)), gate, WINDOW, state,
                                         output_final_state=True, sinks=sinks, terrace=True)
    outs = [out]
    for t in range(chunk, T - read[1]):
        y, state = window_hybrid_step(*(rows_at(x, t, 1)[:, 0] for x in (q, k, v, fq, fk)), gate, state)
        outs.append(y.unsqueeze(1))
    assert relative_error(torch.cat(outs, 1), rows_at(expected, 0, T - read[1])) < 1e-10


def test_a_step_allocates_no_state():
    """The step writes into the state it is given: same tensors, only the next slot moves."""
    q, k, v, fq, fk, gate = random_hybrid_inputs(1, WINDOW + 2)
    _, state = window_hybrid_attention(*(x[:, :-1] for x in (q, k, v, fq, fk)), gate, WINDOW,
                                       output_final_state=True)
    pointers = [x.data_ptr() for x in state[:5]]
    _, stepped = window_hybrid_step(q[:, -1], k[:, -1], v[:, -1], fq[:, -1], fk[:, -1], gate, state)
    assert [x.data_ptr() for x in stepped[:5]] == pointers
    assert stepped.next_slot == (state.next_slot + 1) % WINDOW


@pytest.mark.parametrize("method", METHODS)
def test_a_row_whose_document_starts_at_a_decode_step_forgets_its_padding(method):
    """A row that is all padding in the prompt starts its document at a decode step (position 0):
    the step empties that row's state, as a whole-sequence call does."""
    model = tiny_model(2, **SPECS[method])
    prompt, new = 6, 12
    ids = torch.randint(1, 101, (2, prompt + new))
    mask = torch.ones(2, prompt + new, dtype=torch.long)
    mask[1, :prompt] = 0
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :prompt], attention_mask=mask[:, :prompt], **cache_kwargs(cache), use_cache=True)
        steps = torch.cat([model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], **cache_kwargs(cache),
                                 use_cache=True).logits for t in range(prompt, prompt + new)], 1)
        alone = model(ids[1:, prompt:]).logits
    assert relative_error(steps[1:], alone) < 1e-10


@pytest.mark.parametrize("sinks", [0, 2])
def test_long_prompts_run_in_segments_that_carry_the_state(monkeypatch, sinks):
    """Past SEGMENT_TOKENS the blocked form runs segment by segment; outputs and the final state are
    those of one pass (here segments of 4 windows, and a length that ends inside a window)."""
    from supra.kernels import hybrid

    T = 4 * 4 * WINDOW + 13
    q, k, v, fq, fk, gate = random_hybrid_inputs(2, T)
    one_pass, one_state = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True,
                                                  sinks=sinks)
    monkeypatch.setattr(hybrid, "SEGMENT_TOKENS", 4 * WINDOW)
    segmented, state = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, sinks=sinks)
    definition = parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks)
    assert relative_error(segmented, definition) < 1e-12
    assert relative_error(segmented, one_pass) < 1e-12
    for name in ("kv", "k", "v", "fk", "sink_k", "sink_v")[:6 if sinks else 4]:
        assert relative_error(getattr(state, name), getattr(one_state, name)) < 1e-12
    assert torch.equal(state.valid, one_state.valid) and state.next_slot == one_state.next_slot
