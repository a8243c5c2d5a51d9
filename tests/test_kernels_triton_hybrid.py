"""Triton LoLCATs hybrid kernels (under TRITON_INTERPRET=1 on CPU) against the float64 definitions.

Every test draws fresh random inputs; output buffers are NaN-poisoned so an element a kernel never
writes fails the comparison. Gradients: autograd of the Triton op against autograd of the float64
T x T definition (`parallel_window_hybrid_attention`), for q, k, v, fq, fk and the gate, through a
random weighting of the output. Features are positive, as Hedgehog's softmax features are.
"""

from __future__ import annotations

import pytest
import torch
from supra.kernels import (
    HybridState,
    parallel_window_hybrid_attention,
    triton_hybrid,
    window_hybrid_attention,
)
from supra.kernels.triton_hybrid import triton_window_hybrid_attention

FP32_TOL = 1e-5
CUDA = torch.cuda.is_available()  # on a CUDA machine the same tests run the compiled kernels


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error; absolute where the expected tensor vanishes (a window longer than the
    sequence leaves the features and the gate without gradient: the gate cancels in the ratio). A NaN
    (a poisoned element never written) counts as infinite, so that `max` over the errors cannot skip it."""
    actual, expected = actual.double(), expected.double()
    if not actual.isfinite().all():
        return float("inf")
    norm = expected.pow(2).mean().sqrt().item()
    return (actual - expected).pow(2).mean().sqrt().item() / (norm if norm > 1e-12 else 1.0)


def make_inputs(B: int, T: int, H: int, D: int, F: int, V: int) -> dict[str, torch.Tensor]:
    return {"q": torch.randn(B, T, H, D), "k": torch.randn(B, T, H, D), "v": torch.randn(B, T, H, V),
            "fq": torch.randn(B, T, H, F).softmax(-1), "fk": torch.randn(B, T, H, F).softmax(-1),
            "gate": torch.sigmoid(torch.randn(H))}


def output_and_grads(fn, inputs: dict[str, torch.Tensor], weights: torch.Tensor,
                     cast: dict[str, torch.dtype]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {name: x.to(cast.get(name, x.dtype)).clone().requires_grad_() for name, x in inputs.items()}
    o = fn(*leaves.values())
    (o.double() * weights.double()).sum().backward()
    return o, {name: x.grad for name, x in leaves.items()}


def compare_with_reference(B, T, H, D, F, V, window, chunk_size=None, dtype=torch.float32, sinks=0, terrace=False):
    """Forward and backward through Triton and the float64 definition; relative RMS errors."""
    inputs = make_inputs(B, T, H, D, F, V)
    for name in ("q", "k", "v"):  # both sides see the same rounded activations
        inputs[name] = inputs[name].to(dtype).float()
    weights = torch.randn(B, T, H, V)

    def triton_fn(q, k, v, fq, fk, gate):
        return triton_window_hybrid_attention(q, k, v, fq, fk, gate, window, chunk_size=chunk_size, sinks=sinks,
                                              terrace=terrace)[0]

    def reference(q, k, v, fq, fk, gate):
        return parallel_window_hybrid_attention(q, k, v, fq, fk, gate, window, sinks, terrace)

    # As in the model: activations in `dtype`, the Hedgehog features and the gate in float32.
    o, grads = output_and_grads(triton_fn, inputs, weights, {"q": dtype, "k": dtype, "v": dtype})
    ref_o, ref_grads = output_and_grads(reference, inputs, weights, dict.fromkeys(inputs, torch.float64))
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    errors = {"o": rel_rms(o, ref_o)}
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape and grads[name].dtype == inputs[name].to(
            {"q": dtype, "k": dtype, "v": dtype}.get(name, torch.float32)).dtype, name
        errors["d" + name] = rel_rms(grads[name], ref)
    return errors


@pytest.mark.parametrize(
    "B, T, H, D, F, V, window, chunk_size",
    [
        (2, 37, 3, 16, 32, 16, 5, None),  # odd T, window well inside a 16-token chunk
        (1, 50, 1, 32, 16, 32, 16, None),  # window == chunk: the window reaches into the previous chunk
        (1, 45, 3, 64, 64, 64, 12, 32),  # window < chunk, not a power of two
        (2, 23, 1, 16, 16, 16, 30, 32),  # window longer than the sequence: no linear part at all
        (1, 61, 3, 32, 32, 16, 1, None),  # window of one token: everything older is linear
        (1, 33, 2, 24, 40, 20, 8, None),  # head dims that are no powers of two: masked columns
    ],
)
def test_matches_definition(B, T, H, D, F, V, window, chunk_size):
    errors = compare_with_reference(B, T, H, D, F, V, window, chunk_size)
    assert max(errors.values()) < FP32_TOL, errors


@pytest.mark.parametrize(
    "B, T, H, D, F, V, window, chunk_size, sinks",
    [
        (2, 37, 2, 16, 16, 16, 5, None, 4),  # odd T, sinks leave the window in the first chunk
        (1, 45, 1, 16, 16, 16, 12, 16, 20),  # more sinks than a chunk: sink tile and window tiles overlap
        (1, 3, 2, 16, 16, 16, 1, None, 4),  # T shorter than S: every token a sink
        (1, 50, 1, 16, 16, 16, 16, None, 1),  # window == chunk: the first sink leaves at query 16
    ],
)
def test_sinks_match_definition(B, T, H, D, F, V, window, chunk_size, sinks):
    errors = compare_with_reference(B, T, H, D, F, V, window, chunk_size, sinks=sinks)
    assert max(errors.values()) < FP32_TOL, errors


@pytest.mark.parametrize(
    "B, T, H, D, F, V, window, chunk_size, sinks",
    [
        (2, 45, 2, 16, 16, 16, 6, None, 0),  # blocks of 6 in chunks of 16: block and chunk edges differ
        (1, 50, 1, 16, 16, 16, 8, None, 3),  # 2W == chunk: the previous block reaches a chunk back
        (1, 37, 2, 16, 16, 16, 5, 32, 7),  # sinks past the first block
        (1, 29, 1, 16, 16, 80, 4, None, 3),  # V > 64: dv in two blocks of V, the second one partly masked
    ],
)
def test_terrace_matches_definition(B, T, H, D, F, V, window, chunk_size, sinks):
    errors = compare_with_reference(B, T, H, D, F, V, window, chunk_size, sinks=sinks, terrace=True)
    assert max(errors.values()) < FP32_TOL, errors


def test_bf16_activations():
    errors = compare_with_reference(1, 40, 3, 32, 32, 32, 7, dtype=torch.bfloat16)
    # Under the interpreter a cast to bf16 truncates (the GPU rounds), which biases these errors up.
    # The gate's gradient is a sum that mostly cancels (the gate scales the window part of the numerator
    # and of the denominator alike), so bf16 rounding of the window weights weighs more in it.
    assert errors.pop("dgate") < 1e-1 and max(errors.values()) < 2e-2, errors


def test_matches_blocked_torch_form_and_final_state():
    """Output and decoder state of the stateless call, against the blocked torch form in float64."""
    B, T, H, D, F, V, W = 2, 29, 3, 16, 16, 32, 16
    x = make_inputs(B, T, H, D, F, V)
    o, state = triton_window_hybrid_attention(*x.values(), window=W, output_final_state=True)
    ref_o, ref_state = window_hybrid_attention(*(t.double() for t in x.values()), window=W,
                                               output_final_state=True, backend="torch")
    assert isinstance(state, HybridState) and rel_rms(o, ref_o) < FP32_TOL
    assert state.kv.dtype == torch.float32 and rel_rms(state.kv, ref_state.kv) < FP32_TOL
    for name in ("k", "v", "fk"):
        assert torch.equal(getattr(state, name).double(), getattr(ref_state, name)), name
    assert torch.equal(state.valid, ref_state.valid) and state.next_slot == ref_state.next_slot
    # Shorter than the window: nothing has left it yet, and the ring's front slots hold no token.
    short_x = [t[:, :5] if t.dim() == 4 else t for t in x.values()]
    _, short = triton_window_hybrid_attention(*short_x, window=W, output_final_state=True)
    _, ref_short = window_hybrid_attention(*(t.double() for t in short_x), window=W, output_final_state=True,
                                           backend="torch")
    assert not short.kv.any() and torch.equal(short.valid, ref_short.valid) and (short.valid.sum(1) == 5).all()
    for name in ("k", "v", "fk"):
        assert torch.equal(getattr(short, name).double(), getattr(ref_short, name)), name


@pytest.mark.parametrize("T, terrace", [(29, False), (3, False), (29, True), (11, True)])
def test_sinks_final_state_matches_the_torch_form(T, terrace):
    """With sinks: the sink slots, the ring (sinks invalid, zero fk) and the linear state without them;
    T = 3 is shorter than the sinks, which the decoder then fills. The terrace's ring holds 2W tokens
    and its phase the tokens of the last block."""
    x = make_inputs(2, T, 2, 16, 16, 16)
    o, state = triton_window_hybrid_attention(*x.values(), window=8, output_final_state=True, sinks=5,
                                              terrace=terrace)
    ref_o, ref = window_hybrid_attention(*(t.double() for t in x.values()), window=8, output_final_state=True,
                                         backend="torch", sinks=5, terrace=terrace)
    assert rel_rms(o, ref_o) < FP32_TOL and rel_rms(state.kv, ref.kv) < FP32_TOL
    for name in ("k", "v", "fk", "sink_k", "sink_v"):
        assert getattr(state, name).dtype == torch.float32, name
        assert torch.equal(getattr(state, name).double(), getattr(ref, name)), name
    for name in ("valid", "sink_valid", "phase"):
        assert torch.equal(getattr(state, name), getattr(ref, name)), name
    assert state.next_slot == ref.next_slot and state.terrace == ref.terrace == terrace


def test_mixed_dtypes_follow_the_torch_form():
    """q, k float32 beside a bf16 v (RoPE in float32 under autocast): promoted, output in q's dtype."""
    x = make_inputs(1, 26, 2, 16, 16, 16)
    x["v"] = x["v"].bfloat16()
    o, _ = triton_window_hybrid_attention(*x.values(), window=6)
    ref, _ = window_hybrid_attention(*x.values(), window=6, backend="torch")
    assert o.dtype == ref.dtype == torch.float32 and rel_rms(o, ref) < FP32_TOL


def test_float64_uses_torch_form():
    """float64 inputs run the torch form whatever the backend (the dispatcher decides); the kernels refuse them."""
    x = {name: t.double() for name, t in make_inputs(1, 20, 2, 16, 16, 16).items()}
    o, _ = window_hybrid_attention(*x.values(), window=6, backend="triton")
    assert o.dtype == torch.float64 and rel_rms(o, parallel_window_hybrid_attention(*x.values(), window=6)) < 1e-12
    with pytest.raises(ValueError, match="float64"):
        triton_window_hybrid_attention(*x.values(), window=6)


def test_dispatch(monkeypatch):
    x = make_inputs(1, 40, 3, 16, 16, 16)
    o_triton, _ = window_hybrid_attention(*x.values(), window=8, backend="triton")
    o_torch, state = window_hybrid_attention(*x.values(), window=8, output_final_state=True, backend="torch")
    assert rel_rms(o_triton, o_torch) < FP32_TOL
    # Stateless calls with sinks take the kernels too.
    sinks_seen, kernels = [], triton_hybrid._fwd_op
    monkeypatch.setattr(triton_hybrid, "_fwd_op", lambda *a: sinks_seen.append(a[7]) or kernels(*a))
    o_sinks, _ = window_hybrid_attention(*x.values(), window=8, backend="triton", sinks=2)
    assert sinks_seen == [2]
    assert rel_rms(o_sinks, window_hybrid_attention(*x.values(), window=8, backend="torch", sinks=2)[0]) < FP32_TOL
    # With a state (decoding) the torch form runs, whatever the backend.
    step = {name: t[:, :1] if t.dim() == 4 else t for name, t in x.items()}
    window_hybrid_attention(*step.values(), window=8, state=state, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        window_hybrid_attention(*(t.cpu() for t in x.values()), window=8, backend="triton")


def test_bad_inputs_raise():
    x = make_inputs(1, 20, 2, 16, 16, 16)
    q, k, v, fq, fk, gate = x.values()
    with pytest.raises(ValueError, match="window_gate"):
        triton_window_hybrid_attention(q, k, v, fq, fk, gate[:1])
    with pytest.raises(ValueError, match="fq, fk"):
        triton_window_hybrid_attention(q, k, v, fq[..., :8], fk, gate)
    with pytest.raises(ValueError, match="chunk_size"):
        triton_window_hybrid_attention(q, k, v, fq, fk, gate, window=20, chunk_size=16)
    with pytest.raises(ValueError, match=r"chunk_size must be .* >= 2 x window \(24\), got 16"):
        triton_window_hybrid_attention(q, k, v, fq, fk, gate, window=12, chunk_size=16, terrace=True)
    with pytest.raises(ValueError, match="window"):
        triton_window_hybrid_attention(q, k, v, fq, fk, gate, window=0)


def test_custom_ops_opcheck():
    x = [t.requires_grad_() for t in make_inputs(1, 21, 2, 16, 16, 16).values()]
    torch.library.opcheck(torch.ops.supra.window_hybrid_fwd.default, (*x, 5, 2, True, 16))
    o, m, z = torch.ops.supra.window_hybrid_fwd(*(t.detach() for t in x), 5, 2, True, 16)
    torch.library.opcheck(torch.ops.supra.window_hybrid_bwd.default,
                          (*(t.detach() for t in x), o, m, z, torch.randn_like(o), 5, 2, True, 16))


def test_tied_window_max():
    """All keys equal: every window score ties for the max. torch's amax spreads dL/dc_n evenly over
    the tied keys, the kernels give it to the first; every other gradient and the sum of dk agree."""
    B, T, H, D, W = 1, 30, 2, 16, 6
    inputs = make_inputs(B, T, H, D, 16, 16)
    inputs["k"] = torch.randn(1, 1, H, D).expand(B, T, H, D).contiguous()
    weights = torch.randn(B, T, H, 16)
    o, grads = output_and_grads(lambda *x: triton_window_hybrid_attention(*x, window=W)[0], inputs, weights, {})
    ref_o, ref_grads = output_and_grads(lambda *x: parallel_window_hybrid_attention(*x, window=W), inputs, weights,
                                        dict.fromkeys(inputs, torch.float64))
    grads["k"], ref_grads["k"] = grads["k"].sum(1), ref_grads["k"].sum(1)
    assert rel_rms(o, ref_o) < FP32_TOL
    for name, ref in ref_grads.items():
        assert rel_rms(grads[name], ref) < FP32_TOL, name


def test_torch_compile_fullgraph():
    """The op stays in one graph under torch.compile and trains through it (forward and backward)."""
    torch._dynamo.reset()

    def loss_fn(q, k, v, fq, fk, gate):
        o, _ = window_hybrid_attention(q, k, v, fq, fk, gate, window=5, backend="triton")
        return (o * o).sum()

    inputs = list(make_inputs(2, 19, 2, 16, 16, 16).values())
    eager = [x.clone().requires_grad_() for x in inputs]
    compiled = [x.clone().requires_grad_() for x in inputs]
    loss_fn(*eager).backward()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for a, b in zip(compiled, eager):
        assert rel_rms(a.grad, b.grad) < FP32_TOL


@pytest.mark.parametrize("terrace, sinks", [(False, 0), (True, 3)])
def test_programs_split_a_chunk(monkeypatch, terrace, sinks):
    """Blocks of rows and of keys smaller than the chunk, as on a GPU (C = 128 in programs of 64 rows that
    step over keys 32 at a time): chunks of 64 in programs of 32 rows, 16 keys a step; odd T, window and
    block edges that differ."""
    monkeypatch.setattr(triton_hybrid._HybridLayout, "BLOCK", 32)
    monkeypatch.setattr(triton_hybrid._HybridLayout, "KEYS", 16)
    errors = compare_with_reference(1, 151, 2, 16, 16, 24, 29 if terrace else 50, 64, sinks=sinks, terrace=terrace)
    assert max(errors.values()) < FP32_TOL, errors
