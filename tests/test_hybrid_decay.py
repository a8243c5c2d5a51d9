"""The LoLCATs hybrid with a decayed linear part (`log_decay`, LinearizeSpec.state_decay): every torch
form against the float64 T x T definition (sliding and terrace, sinks, odd lengths, segments,
gradients), the decode step against the full forward, no decay unchanged, and the point of it: the
state's share of the denominator stays bounded far past the training length."""

from __future__ import annotations

import pytest
import torch
from supra.kernels import hybrid, parallel_window_hybrid_attention, window_hybrid_attention, window_hybrid_step
from test_decode import WINDOW, random_hybrid_inputs
from test_layers import relative_error, tiny_model

from supra.layers import attention as attention_module
from supra.layers.feature_maps import log_decay_rates
from supra.layers.linearize import LinearizeSpec, new_parameter_names

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def rates(heads: int = 3) -> torch.Tensor:
    """Fast and slow heads: at W = 8 the first barely reaches past the window, the last keeps ~30 tokens."""
    return torch.tensor([-0.5, -0.1, -0.03][:heads], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("terrace", [False, True])
def test_blocked_form_with_segments_is_the_definition(terrace, sinks, dtype, monkeypatch):
    """Odd length, several segments carrying the state (4 windows each): outputs, and the gradients of
    every input including the decay rates, are the definition's."""
    monkeypatch.setattr(hybrid, "SEGMENT_TOKENS", 4 * WINDOW)
    T = 9 * WINDOW + 5
    inputs = [x.to(dtype).requires_grad_() for x in (*random_hybrid_inputs(2, T), rates())]
    weights = torch.randn(2, T, 3, 5, dtype=torch.float64)

    def run(form, cast):
        x = [t.to(cast) for t in inputs]
        out = form(*x)
        grads = torch.autograd.grad((out.double() * weights).sum(), inputs)
        return out.double(), grads

    def blocked(q, k, v, fq, fk, gate, log_decay):
        return window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks=sinks, terrace=terrace,
                                       log_decay=log_decay)[0]

    def definition(q, k, v, fq, fk, gate, log_decay):
        return parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks, terrace, log_decay)

    out, grads = run(blocked, dtype)
    ref, ref_grads = run(definition, torch.float64)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    for got, want in zip(grads, ref_grads):
        assert relative_error(got.double(), want.double()) < 10 * TOLERANCE[dtype]
    undecayed = definition(*(t.double() for t in inputs[:6]), None)
    assert relative_error(undecayed, ref) > 1e-2  # the decay changes the output


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("terrace", [False, True])
@pytest.mark.parametrize("prefill", [1, 5, 2 * WINDOW + 3])
def test_chunks_and_steps_are_the_definition(prefill, terrace, sinks):
    """A prompt in two chunks (a state carried between them, phases not aligned with blocks), then
    steps past several windows: every output is the definition's, and the stepped state is the one
    a whole-sequence call leaves."""
    chunk = 7
    T = prefill + chunk + 3 * WINDOW + 2
    q, k, v, fq, fk, gate = random_hybrid_inputs(2, T)
    log_decay = rates()
    expected = parallel_window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, sinks, terrace, log_decay)
    kwargs = {"sinks": sinks, "terrace": terrace, "log_decay": log_decay}
    outs, state = [], None
    for lo, hi in ((0, prefill), (prefill, prefill + chunk)):
        out, state = window_hybrid_attention(*(x[:, lo:hi] for x in (q, k, v, fq, fk)), gate, WINDOW, state,
                                             output_final_state=True, **kwargs)
        outs.append(out)
    for t in range(prefill + chunk, T):
        y, state = window_hybrid_step(q[:, t], k[:, t], v[:, t], fq[:, t], fk[:, t], gate, state, log_decay)
        outs.append(y.unsqueeze(1))
    assert relative_error(torch.cat(outs, 1), expected) < 1e-10
    _, whole = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, **kwargs)
    assert relative_error(state.kv, whole.kv) < 1e-10
    more = random_hybrid_inputs(2, 11)
    after_steps, _ = window_hybrid_attention(*more[:5], gate, WINDOW, state, **kwargs)
    after_whole, _ = window_hybrid_attention(*more[:5], gate, WINDOW, whole, **kwargs)
    assert relative_error(after_steps, after_whole) < 1e-10


@pytest.mark.parametrize("terrace", [False, True])
def test_no_decay_is_a_rate_of_zero(terrace):
    """log_decay None runs the undecayed sum, which the decayed forms reproduce at gamma = 1."""
    q, k, v, fq, fk, gate = random_hybrid_inputs(2, 5 * WINDOW + 3)
    none, none_state = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, sinks=2,
                                               terrace=terrace)
    zero, zero_state = window_hybrid_attention(q, k, v, fq, fk, gate, WINDOW, output_final_state=True, sinks=2,
                                               terrace=terrace, log_decay=torch.zeros(3, dtype=torch.float64))
    assert relative_error(zero, none) < 1e-12 and relative_error(zero_state.kv, none_state.kv) < 1e-12


def test_the_spec_adds_a_parameter_only_when_the_decay_is_learned():
    names = {kind: {n.rsplit(".", 1)[-1] for n in new_parameter_names(tiny_model(2, state_decay=kind,
                                                                                  window_kind="terrace"))}
             for kind in ("none", "supra", "learned")}
    assert names["none"] == names["supra"] == {"weight", "window_factor"}
    assert names["learned"] == names["none"] | {"state_decay"}
    layer = tiny_model(2, state_decay="learned").model.layers[0].self_attn
    start = torch.tensor(log_decay_rates("supra", 4))
    assert (layer.log_decay(torch.device("cpu")) - start).abs().max() < 0.5  # starts near SUPRA's rates
    with pytest.raises(ValueError, match="unknown state_decay"):
        LinearizeSpec(state_decay="sometimes").validate()


def linear_share(model: torch.nn.Module, length: int) -> torch.Tensor:
    """The linear part's share s of the denominator in layer 0 (H, length), on random tokens. The
    output is y = (1 - s) y_window + s y_linear, with the window alone (fq = 0) and the linear part
    alone (gate 0): s is read off the three (least squares over the value channels)."""
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return window_hybrid_attention(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(attention_module, "window_hybrid_attention", record)
        model(torch.randint(0, 101, (1, length), generator=torch.Generator().manual_seed(0)))
    (q, k, v, fq, fk, gate, *rest), kwargs = calls[0]
    both, alone, linear = (window_hybrid_attention(*x, *rest, **kwargs)[0] for x in (
        (q, k, v, fq, fk, gate), (q, k, v, torch.zeros_like(fq), fk, gate),
        (q, k, v, fq, fk, torch.zeros_like(gate))))  # 0 / 0 where no token is old yet: not looked at
    return (((both - alone) * (linear - alone)).sum(-1) / (linear - alone).square().sum(-1))[0].T


def test_the_state_stays_bounded_at_four_times_the_training_length():
    """The linear part's weight against the window's, s / (1 - s) per head: undecayed it grows with the
    context (about 4x from the training length, here 256 tokens, to 4x it) and takes the shared
    denominator from the exact window; decayed it levels off (SUPRA's rates: the slowest head keeps
    ~256 tokens and grows by under 2x, the others stay flat)."""
    train = 256
    growth = {}
    for kind in ("none", "supra"):
        model = tiny_model(4, torch.float32, state_decay=kind, window_kind="terrace", sinks=2, layers=1)
        share = linear_share(model, 4 * train)
        odds = [(s / (1 - s)) for s in (share[:, train - 64:train].mean(1), share[:, -64:].mean(1))]
        growth[kind] = odds[1] / odds[0]
    assert (growth["none"] > 3).all() and (growth["supra"] < 2).all() and (growth["supra"][:3] < 1.1).all(), growth
