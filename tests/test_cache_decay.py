"""The sparse global cache (kernels/sparse_cache.py) with a decayed linear part (`log_decay`): the
blocked form, prompt chunks and decode steps equal the float64 definition (sinks, odd lengths, rows at
different places in their blocks), gradients flow through a learned decay, the state stays constant,
and a LoLCATs layer takes both options."""

from __future__ import annotations

import pytest
import torch
from supra.kernels import parallel_window_hybrid_attention, stack_states, window_hybrid_attention, window_hybrid_step
from supra.kernels.sparse_cache import parallel_cached_hybrid_attention
from test_decode import random_hybrid_inputs
from test_layers import relative_error
from test_sparse_cache import CACHE_RULES, grouped_query_inputs

WINDOW = 4
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def rates() -> torch.Tensor:
    """Fast and slow heads: the first barely reaches past the window, the last keeps ~30 tokens."""
    return torch.tensor([-0.5, -0.1, -0.03], dtype=torch.float64)


def steps(state, inputs, log_decay, lo: int, hi: int) -> tuple[list[torch.Tensor], object]:
    outs = []
    for t in range(lo, hi):
        y, state = window_hybrid_step(*(x[:, t] for x in inputs[:5]), inputs[5], state, log_decay)
        outs.append(y.unsqueeze(1))
    return outs, state


def blocked(inputs, log_decay, state=None, sinks: int = 2, final: bool = True, terrace: bool = True, **rule):
    """The blocked form with a cache rule (default: 3 pairs, chosen one by one by attention)."""
    return window_hybrid_attention(*inputs[:5], inputs[5], WINDOW, state, output_final_state=final, sinks=sinks,
                                   terrace=terrace, log_decay=log_decay, **({"cache_budget": 3} | rule))


@pytest.mark.parametrize("terrace", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sinks,rule", CACHE_RULES)
@pytest.mark.parametrize("prefill", [1, 5, 2 * WINDOW + 1])
def test_blocked_chunks_and_steps_are_the_definition(prefill, sinks, rule, dtype, terrace):
    """One blocked call, and a prompt in two chunks then steps over many blocks, equal the decayed
    definition, with either window; the stepped state is the one a whole call leaves, and continues as it."""
    torch.manual_seed(prefill)
    chunk, T = 6, 15 * WINDOW + 3
    groups = rule.get("cache_groups", 1)
    inputs = grouped_query_inputs(random_hybrid_inputs(2, T, dtype=dtype), groups)
    log_decay = rates().to(dtype)
    expected = parallel_cached_hybrid_attention(*inputs[:5], inputs[5], WINDOW, sinks, log_decay=log_decay, **rule,
                                                terrace=terrace)
    undecayed = parallel_cached_hybrid_attention(*inputs[:5], inputs[5], WINDOW, sinks, **rule, terrace=terrace)
    uncached = parallel_window_hybrid_attention(*inputs[:5], inputs[5], WINDOW, sinks, terrace, log_decay)
    assert relative_error(undecayed, expected) > 1e-2 and relative_error(uncached, expected) > 1e-2
    one_call, whole = blocked(inputs, log_decay, sinks=sinks, terrace=terrace, **rule)
    assert relative_error(one_call, expected) < TOLERANCE[dtype]
    outs, state = [], None
    for lo, hi in ((0, prefill), (prefill, prefill + chunk)):
        out, state = blocked([x[:, lo:hi] for x in inputs[:5]] + [inputs[5]], log_decay, state, sinks,
                             terrace=terrace, **rule)
        outs.append(out)
    stepped, state = steps(state, inputs, log_decay, prefill + chunk, T)
    assert relative_error(torch.cat(outs + stepped, 1), expected) < TOLERANCE[dtype]
    assert torch.equal(state.cache_valid, whole.cache_valid) and torch.equal(state.phase, whole.phase)
    assert torch.equal(state.cache_age * state.cache_valid, whole.cache_age * whole.cache_valid)
    assert relative_error(state.kv, whole.kv) < TOLERANCE[dtype]
    more = grouped_query_inputs(random_hybrid_inputs(2, 2 * WINDOW + 3, dtype=dtype), groups)
    after_steps, _ = blocked(more, log_decay, state, sinks, final=False, terrace=terrace, **rule)
    after_whole, _ = blocked(more, log_decay, whole, sinks, final=False, terrace=terrace, **rule)
    assert relative_error(after_steps, after_whole) < TOLERANCE[dtype]


def test_an_evicted_entry_enters_the_state_with_its_own_age():
    """Over a long run entries are evicted from the cache blocks after they left the window: the
    carried state is the decayed sum over exactly the tokens not in the cache, each from its own place."""
    T, budget = 13 * WINDOW + 2, 3
    inputs = random_hybrid_inputs(1, T)
    log_decay = rates()
    _, state = blocked(inputs, log_decay, sinks=0, cache_budget=budget)
    k, v, fk = (x[0].transpose(0, 1) for x in (inputs[1], inputs[2], inputs[4]))  # (H, T, .)
    newest = T - 1
    place = newest - state.cache_age[0]  # (H, C): the cached tokens' places
    decided = range((T // WINDOW - 1) * WINDOW)  # blocks before the previous one left the window
    for h in range(3):
        cached = set(place[h][state.cache_valid[0, h]].tolist())
        assert len(cached) == budget and max(cached) < len(decided)
        for c, j in enumerate(place[h].tolist()):  # the cache's k is the token's at that place
            assert torch.equal(state.cache_k[0, h, c], k[h, j])
        linear = [j for j in decided if j not in cached]
        weights = (log_decay[h] * (newest - torch.tensor(linear, dtype=torch.float64))).exp()
        ones = torch.ones(len(linear), 1, dtype=torch.float64)
        expected = (fk[h, linear] * weights[:, None]).T @ torch.cat([v[h, linear], ones], 1)
        assert relative_error(state.kv[0, h], expected) < 1e-12


@pytest.mark.parametrize("terrace", [True, False])
def test_rows_at_different_places_in_their_blocks(terrace):
    """Rows whose documents began at different times decide at different steps, decayed."""
    T, read, chunk = 9 * WINDOW, (5, 2 * WINDOW + 3), 6
    inputs = random_hybrid_inputs(2, T)
    log_decay = rates()
    expected = parallel_cached_hybrid_attention(*inputs[:5], inputs[5], WINDOW, 2, 3, log_decay, terrace=terrace)
    rows = [blocked([x[b:b + 1, :read[b]] for x in inputs[:5]] + [inputs[5]], log_decay, terrace=terrace)[1]
            for b in range(2)]
    state = stack_states(rows)
    assert state.phase.tolist() == [1, 3]

    def rows_at(x: torch.Tensor, length: int) -> torch.Tensor:  # row b from read[b]
        return torch.stack([x[b, read[b]:read[b] + length] for b in range(2)])

    shifted = [rows_at(x, T - read[1]) for x in inputs[:5]] + [inputs[5]]
    out, state = blocked([x[:, :chunk] for x in shifted[:5]] + [inputs[5]], log_decay, state, terrace=terrace)
    stepped, _ = steps(state, shifted, log_decay, chunk, T - read[1])
    assert relative_error(torch.cat([out] + stepped, 1), rows_at(expected, T - read[1])) < 1e-10


def test_gradients_flow_through_a_learned_decay():
    """The blocked form's gradients (inputs and decay rates; the choice itself is not differentiated)
    are the definition's."""
    T = 9 * WINDOW + 3
    inputs = [x.requires_grad_() for x in (*random_hybrid_inputs(2, T), rates())]
    weights = torch.randn(2, T, 3, 5, dtype=torch.float64)
    got = blocked(inputs[:6], inputs[6], final=False)[0]
    want = parallel_cached_hybrid_attention(*inputs[:5], inputs[5], WINDOW, 2, 3, inputs[6])
    assert relative_error(got, want) < 1e-10
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    assert got_grads[6].abs().sum() > 0
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g, w) < 1e-9


def test_decode_memory_is_constant_in_context():
    """With the decay the state holds one more constant tensor (the cache's ages): same bytes at 300 and 900."""
    inputs = random_hybrid_inputs(1, 900, dtype=torch.float32)
    log_decay = rates().float()
    _, state = blocked([x[:, :2] for x in inputs[:5]] + [inputs[5]], log_decay, cache_budget=8)

    def footprint(s) -> list[tuple[tuple[int, ...], int]]:
        return [(tuple(x.shape), x.untyped_storage().nbytes()) for x in s if isinstance(x, torch.Tensor)]

    _, state = steps(state, inputs, log_decay, 2, 300)
    at_300 = footprint(state)
    _, state = steps(state, inputs, log_decay, 300, 900)
    assert footprint(state) == at_300 and state.cache_age is not None
    assert bool(state.cache_valid.all()) and bool(torch.isfinite(state.kv).all())


def test_without_a_decay_nothing_changes_and_states_do_not_mix():
    """No decay: no ages in the state, the undecayed definition; a state of one kind refuses the other."""
    inputs = random_hybrid_inputs(2, 7 * WINDOW + 1)
    y, state = blocked(inputs, None)
    assert state.cache_age is None
    assert relative_error(y, parallel_cached_hybrid_attention(*inputs[:5], inputs[5], WINDOW, 2, 3)) < 1e-12
    with pytest.raises(ValueError, match="different decay"):
        blocked(inputs, rates(), state)
    with pytest.raises(ValueError, match="different decay"):
        window_hybrid_step(*(x[:, 0] for x in inputs[:5]), inputs[5], state, rates())
