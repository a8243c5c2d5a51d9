"""The sparse global KV cache of the LoLCATs hybrid and the gated students' window
(kernels/sparse_cache.py): the blocked form, prompt chunks and decode steps make the definition's
choices and outputs, for every cache rule (runs, recall share, heads sharing a key/value head) and both
windows; memory stays constant; the choice is deterministic and keeps what the queries attend;
cache_budget=0 is the hybrid without a cache. Model-level checks (three forms, left padding, restarts,
packed documents) run through the "lolcats-cache", "gla-cache" and "gdn-cache" specs of test_layers.py
and test_decode.py."""

from __future__ import annotations

import pytest
import torch
from supra.kernels import parallel_window_hybrid_attention, stack_states, window_hybrid_attention, window_hybrid_step
from supra.kernels.sparse_cache import choose, parallel_cached_hybrid_attention
from test_decode import random_hybrid_inputs
from test_layers import relative_error

WINDOW = 4
# Sinks with a cache rule: single tokens chosen by attention; runs of 2, half by recall error (LoLA's
# choice), per head and shared by the three heads of one key/value head; runs of a whole block by
# recall error alone
CACHE_RULES = [(0, {"cache_budget": 1}), (2, {"cache_budget": 3}),
               (2, {"cache_budget": 4, "cache_chunk": 2, "cache_recall": 2}),
               (2, {"cache_budget": 4, "cache_chunk": 2, "cache_recall": 2, "cache_groups": 3}),
               (0, {"cache_budget": 8, "cache_chunk": 4, "cache_recall": 8})]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def grouped_query_inputs(inputs: tuple[torch.Tensor, ...], groups: int) -> tuple[torch.Tensor, ...]:
    """The heads of each group of `groups` get the same k and v, as a grouped-query model feeds them."""
    q, k, v, *rest = inputs
    return (q, *(x[:, :, ::groups].repeat_interleave(groups, dim=2) for x in (k, v)), *rest)


def steps(state, inputs, lo: int, hi: int) -> tuple[list[torch.Tensor], object]:
    outs = []
    for t in range(lo, hi):
        y, state = window_hybrid_step(*(x[:, t] for x in inputs[:5]), inputs[5], state)
        outs.append(y.unsqueeze(1))
    return outs, state


@pytest.mark.parametrize("terrace", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sinks,rule", CACHE_RULES)
@pytest.mark.parametrize("prefill", [1, 5, WINDOW, 2 * WINDOW + 1])
def test_blocked_chunks_and_steps_are_the_definition(prefill, sinks, rule, dtype, terrace):
    """One blocked call, and a prompt in two chunks then steps over many blocks (far past window +
    budget), equal the definition, with the terrace and with the sliding window; the stepped state
    is the one a whole call leaves."""
    torch.manual_seed(prefill)
    chunk, T = 6, 15 * WINDOW + 3
    inputs = grouped_query_inputs(random_hybrid_inputs(2, T, dtype=dtype), rule.get("cache_groups", 1))
    q, k, v, fq, fk, gate = inputs
    expected = parallel_cached_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks, **rule, terrace=terrace)
    uncached = parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks, terrace=terrace)
    assert relative_error(uncached, expected) > 1e-2  # the cache changes the outputs
    one_call, whole = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, sinks=sinks,
                                              terrace=terrace, **rule)
    assert relative_error(one_call, expected) < TOLERANCE[dtype]
    outs, state = [], None
    for lo, hi in ((0, prefill), (prefill, prefill + chunk)):
        out, state = window_hybrid_attention(*(x[:, lo:hi] for x in inputs[:5]), gate, WINDOW, state,
                                             output_final_state=True, sinks=sinks, terrace=terrace, **rule)
        outs.append(out)
    stepped, state = steps(state, inputs, prefill + chunk, T)
    assert relative_error(torch.cat(outs + stepped, 1), expected) < TOLERANCE[dtype]
    assert torch.equal(state.cache_valid, whole.cache_valid) and torch.equal(state.phase, whole.phase)
    assert relative_error(state.kv, whole.kv) < TOLERANCE[dtype]
    more = grouped_query_inputs(random_hybrid_inputs(2, 2 * WINDOW + 3, dtype=dtype), rule.get("cache_groups", 1))
    # the stepped state continues as the whole's
    after_steps, _ = window_hybrid_attention(*more[:5], gate, WINDOW, state, sinks=sinks, terrace=terrace,
                                             **rule)
    after_whole, _ = window_hybrid_attention(*more[:5], gate, WINDOW, whole, sinks=sinks, terrace=terrace,
                                             **rule)
    assert relative_error(after_steps, after_whole) < TOLERANCE[dtype]


@pytest.mark.parametrize("terrace", [True, False])
def test_rows_at_different_places_in_their_blocks(terrace):
    """Rows whose documents began at different times (left padding) decide at different steps."""
    T, read, chunk = 9 * WINDOW, (5, 2 * WINDOW + 3), 6
    inputs = random_hybrid_inputs(2, T)
    q, k, v, fq, fk, gate = inputs
    expected = parallel_cached_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, 2, 3, terrace=terrace)
    rows = [window_hybrid_attention(*(x[b:b + 1, :read[b]] for x in inputs[:5]), gate, WINDOW,
                                    output_final_state=True, sinks=2, terrace=terrace, cache_budget=3)[1]
            for b in range(2)]
    state = stack_states(rows)
    assert state.phase.tolist() == [1, 3]

    def rows_at(x: torch.Tensor, offset: int, length: int) -> torch.Tensor:  # row b from read[b] + offset
        return torch.stack([x[b, read[b] + offset:read[b] + offset + length] for b in range(2)])

    shifted = [rows_at(x, 0, T - read[1]) for x in inputs[:5]] + [gate]
    out, state = window_hybrid_attention(*(x[:, :chunk] for x in shifted[:5]), gate, WINDOW, state,
                                         output_final_state=True, sinks=2, terrace=terrace, cache_budget=3)
    stepped, _ = steps(state, shifted, chunk, T - read[1])
    assert relative_error(torch.cat([out] + stepped, 1), rows_at(expected, 0, T - read[1])) < 1e-10


def test_decode_memory_is_constant_in_context():
    """The state (ring, sinks, cache, linear state) has the same tensors and bytes at 300 and 900 tokens."""
    inputs = random_hybrid_inputs(1, 900, dtype=torch.float32)
    _, state = window_hybrid_attention(*(x[:, :2] for x in inputs[:5]), inputs[5], WINDOW, output_final_state=True,
                                       sinks=2, terrace=True, cache_budget=8)

    def footprint(s) -> list[tuple[tuple[int, ...], int]]:
        return [(tuple(x.shape), x.untyped_storage().nbytes()) for x in s if isinstance(x, torch.Tensor)]

    _, state = steps(state, inputs, 2, 300)
    at_300 = footprint(state)
    _, state = steps(state, inputs, 300, 900)
    assert footprint(state) == at_300
    assert bool(state.cache_valid.all())  # the cache is full, not empty


def test_a_grouped_query_cache_holds_a_groups_pairs_once_chosen_by_its_summed_scores():
    seen = torch.tensor([[[3.0, 0.0, 1.0], [0.0, 2.5, 1.0]]])  # two query heads of one key/value head
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    assert choose(seen, valid, 1).tolist() == [[[0]]] and choose(seen[:, 1:], valid, 1).tolist() == [[[1]]]
    errors = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]]])
    assert choose(seen, valid, 1, errors=errors, recall=1).tolist() == [[[2]]]
    inputs = grouped_query_inputs(random_hybrid_inputs(1, 9 * WINDOW, H=6, dtype=torch.float32), 3)
    _, shared = window_hybrid_attention(*inputs[:5], inputs[5], WINDOW, output_final_state=True, terrace=True,
                                        cache_budget=4, cache_groups=3)
    _, per_head = window_hybrid_attention(*inputs[:5], inputs[5], WINDOW, output_final_state=True, terrace=True,
                                          cache_budget=4)
    assert shared.cache_k.shape[1] == 2 and per_head.cache_k.shape[1] == 6
    assert shared.cache_fk.shape[1] == 6  # each head's features of the pairs, for when they enter its state
    assert sum(x.nbytes for x in shared if isinstance(x, torch.Tensor)) < sum(
        x.nbytes for x in per_head if isinstance(x, torch.Tensor))


def test_the_choice_is_deterministic_and_keeps_the_older_of_equal_errors():
    errors = torch.tensor([[[0.5, 2.0, 2.0, 1.0, 2.0, 3.0]]])
    valid = torch.tensor([[[True, True, True, True, True, False]]])
    assert choose(errors, valid, 2).tolist() == [[[1, 2]]]  # 4 ties with them, and 5 is no token
    inputs = random_hybrid_inputs(2, 7 * WINDOW)
    twice = [window_hybrid_attention(*inputs[:5], inputs[5], WINDOW, output_final_state=True, terrace=True,
                                     cache_budget=3)[1] for _ in range(2)]
    assert torch.equal(twice[0].cache_k, twice[1].cache_k) and torch.equal(twice[0].kv, twice[1].kv)


def test_the_cache_keeps_the_pair_the_last_block_attended():
    """A key that every later query attends (a needle among random keys) is chosen into a one-pair
    cache when it leaves the window and kept there, in the blocked form and in decode steps."""
    torch.manual_seed(0)
    T, needle = 6 * WINDOW, 1
    q, k, v, fq, fk, gate = random_hybrid_inputs(1, T)
    q[:] = q[:, :1]  # every query the same direction, which the needle's key points along
    k[:, needle] = 4 * q[:, 0]
    _, whole = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, terrace=True,
                                       cache_budget=1)
    _, state = window_hybrid_attention(*(x[:, :2] for x in (q, k, v, fq, fk)), gate, WINDOW,
                                       output_final_state=True, terrace=True, cache_budget=1)
    _, state = steps(state, (q, k, v, fq, fk, gate), 2, T)
    for held in (whole, state):
        assert bool(held.cache_valid.all()) and torch.equal(held.cache_k[0, :, 0], k[0, needle])


def test_a_zero_budget_is_the_hybrid_without_a_cache():
    q, k, v, fq, fk, gate = random_hybrid_inputs(2, 5 * WINDOW + 1)
    for terrace in (True, False):
        assert torch.equal(parallel_cached_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, 2, 0, terrace=terrace),
                           parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, 2, terrace=terrace))
    _, state = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, terrace=True)
    assert state.cache_k is None
    with pytest.raises(ValueError, match="keeps no sparse cache, the call asks for a sparse cache of 2 pairs"):
        window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, state, terrace=True, cache_budget=2)


def test_a_trained_model_takes_a_cache_budget_as_a_setting():
    """`supra convert cache_budget=C` on a converted model sets the cache (LoLA needs no training): the
    feature maps stay, the spec is recorded, and the forward is the definition's; other methods refuse."""
    from test_layers import tiny_model, use_parallel_forms

    from supra.commands.settings import convert_model
    from supra.config import ConfigError, load_config
    from supra.layers.linearize import recorded_spec

    model = tiny_model(2, window_kind="terrace", sinks=2)
    maps = {n: p.clone() for n, p in model.named_parameters() if "feature_map" in n}
    ids = torch.randint(0, 101, (2, 41))
    with torch.no_grad():
        before = model(ids).logits
        settings = ["cache_budget=4", "cache_chunk=2", "cache_recall=0.5", "window_kind=terrace"]
        convert_model(model, load_config(settings))
        after = model(ids).logits
    assert recorded_spec(model).cache_arguments(1) == {"cache_budget": 4, "cache_chunk": 2, "cache_recall": 2,
                                                       "cache_groups": 1}
    assert all(torch.equal(p, maps[n]) for n, p in model.named_parameters() if n in maps)
    assert relative_error(after, before) > 1e-3
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        use_parallel_forms(patch)
        assert relative_error(model(ids).logits, after) < 1e-10
    with pytest.raises(ConfigError, match="cache_budget=8 does nothing with method=supra; it is for method=lolcats, "
                                          "gla, gdn"):
        convert_model(tiny_model(2, method="supra"), load_config(["cache_budget=8", "method=supra"]))
    with pytest.raises(ConfigError, match="cache_budget=8 does nothing with method=gla and window=0"):
        convert_model(tiny_model(2, method="gla", window=0), load_config(["cache_budget=8", "method=gla", "window=0"]))


def test_a_converted_model_keeps_its_cache_unless_a_budget_is_given():
    """Settings that leave cache_budget unset keep a converted model's cache: giving layers back their
    softmax attention (`supra convert model=RUN/model softmax_layers=[...]`) does not drop it, and
    nothing else asked of a converted model is a second conversion, refused. cache_budget=0 drops it."""
    from test_layers import tiny_model

    from supra.commands.settings import convert_model
    from supra.config import load_config
    from supra.layers.attention import RecurrentAttention
    from supra.layers.linearize import decoder_layers, recorded_spec
    from supra.models import SourceError

    model = tiny_model(2, window_kind="terrace", sinks=2)
    convert_model(model, load_config(["cache_budget=4", "cache_chunk=2", "window_kind=terrace"]))
    convert_model(model, load_config(["softmax_layers=[0]"]))
    spec = recorded_spec(model)
    assert (spec.softmax_layers, spec.cache_budget, spec.cache_chunk) == ([0], 4, 2)
    assert not isinstance(decoder_layers(model)[0].self_attn, RecurrentAttention)
    assert decoder_layers(model)[1].self_attn.spec.cache_budget == 4
    with pytest.raises(SourceError, match="is already converted"):
        convert_model(model, load_config([]))
    convert_model(model, load_config(["cache_budget=0"]))
    assert recorded_spec(model).cache_budget == 0 and decoder_layers(model)[1].self_attn.spec.cache_budget == 0


def test_uptrain_trains_without_the_cache_and_saves_the_model_with_it(tmp_path):
    """The stages of cache_budget=C and of no cache are the same steps (same losses); the saved model,
    and a checkpoint rebuilt as a model, have the cache."""
    import json

    from supra.cli import main
    from supra.commands.common import model_at_checkpoint
    from supra.layers.linearize import recorded_spec

    args = ["recipe=tiny", "window_kind=terrace", "train.eval_baselines=false", "train.sample_tokens=0",
            "train.logger=none", "eval.max_tokens=128", "eval.long_factor=1",
            "train.stages=[{name: attention_transfer, tokens: 512, lr: 1e-2}]"]
    losses = {}
    for budget in (0, 8):
        run = tmp_path / f"cache-{budget}"
        assert main(["uptrain", *args, f"cache_budget={budget}", f"out={run}"]) == 0
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[budget] = [line["loss"] for line in lines if "loss" in line]
        saved = json.loads((run / "model" / "config.json").read_text())["supra"]
        assert saved["cache_budget"] == budget
    assert losses[0] == losses[8] and losses[0]
    model, _ = model_at_checkpoint(tmp_path / "cache-8", None, torch.device("cpu"))
    assert recorded_spec(model).cache_budget == 8
