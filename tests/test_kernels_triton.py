"""Triton linear-attention kernels (under TRITON_INTERPRET=1 on CPU) against the float64 recurrence.

Every test draws fresh random inputs. Output buffers are NaN-poisoned (POISON_OUTPUTS) so an element
a kernel never writes fails the comparison. Gradients: autograd of the Triton op against autograd of
the float64 reference, for q, k, v, the initial state and the log decay, through a random weighting
of both the output and the final state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from supra.kernels import (
    linear_attention,
    linear_attention_step,
    recurrent_linear_attention,
    recurrent_step,
    triton_common,
    use_triton,
)
from supra.kernels.triton_chunk import triton_linear_attention
from supra.kernels.triton_decode import triton_linear_attention_step

FP32_TOL = 1e-5
# On a CUDA machine the same tests run the compiled kernels on the GPU (the interpreter is off there).
CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative RMS error; a NaN (a poisoned element never written) counts as infinite, so that `max`
    over a test's errors cannot skip it."""
    actual, expected = actual.double(), expected.double()
    if not actual.isfinite().all():
        return float("inf")
    return ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def make_decay(kind: str, B: int, T: int, H: int) -> torch.Tensor | None:
    """Log decays drawn like fla's tests: logsigmoid of a normal, so between strong and almost none."""
    if kind == "none":
        return None
    if kind == "head":
        return F.logsigmoid(torch.randn(H) + 2)
    return F.logsigmoid(torch.randn(B, T, H) + 2)


def compare_with_reference(B, T, H, K, V, decay, chunk_size, with_h0, with_final, cu_seqlens=None,
                           dtype=torch.float32):
    """Run forward and backward through Triton and the float64 recurrence; return relative RMS errors."""
    docs = B if cu_seqlens is None else len(cu_seqlens) - 1
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    inputs = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V),
              "g": make_decay(decay, B, T, H), "h0": torch.randn(docs, H, K, V) if with_h0 else None}
    w_out, w_final = torch.randn(B, T, H, V), torch.randn(docs, H, K, V)

    def run(fn, cast, **overrides):
        leaves = {name: None if x is None else cast(x).requires_grad_()
                  for name, x in {**inputs, **overrides}.items()}
        o, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], None, leaves["h0"], with_final, cu)
        assert (final is not None) == with_final
        loss = (o.double() * w_out.double()).sum()
        if with_final:
            loss = loss + (final.double() * w_final.double()).sum()
        loss.backward()
        grads = {name: x.grad for name, x in leaves.items() if x is not None}
        return o, final, grads

    triton_fn = lambda *a: triton_linear_attention(*a, chunk_size=chunk_size)  # noqa: E731
    o, final, grads = run(triton_fn, lambda x: x.to(dtype).clone())
    ref_o, ref_final, ref_grads = run(recurrent_linear_attention, lambda x: x.double().clone())
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    errors = {"o": rel_rms(o, ref_o)}
    if with_final:
        assert final.dtype == torch.float32 and final.shape == (docs, H, K, V)
        errors["final"] = rel_rms(final, ref_final)
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape, name
        errors["d" + name] = rel_rms(grads[name], ref)
    if decay == "head":
        # A per-head decay gradient is the sum of B*T per-token gradients, which can cancel to a small
        # number; float32 (the torch chunked form as much as the kernels) then keeps ~1e-5 of the
        # summands' size, not of the sum. So this one error is measured against the summands' norm.
        *_, token_grads = run(recurrent_linear_attention, lambda x: x.double().clone(),
                              g=inputs["g"].expand(B, T, H))
        summands = token_grads["g"].pow(2).sum((0, 1)).sqrt()
        errors["dg"] = ((grads["g"].double() - ref_grads["g"]).pow(2).mean().sqrt()
                        / summands.pow(2).mean().sqrt()).item()
    return errors


@pytest.mark.parametrize(
    "decay, B, T, H, K, V, chunk_size, with_h0, with_final",
    [
        ("none", 2, 50, 1, 16, 16, 16, False, False),
        ("none", 1, 45, 3, 32, 32, 16, True, True),
        ("head", 2, 77, 3, 32, 16, 32, True, True),
        ("head", 1, 100, 1, 16, 32, 16, False, True),
        ("token", 1, 130, 3, 16, 32, 32, True, True),
        ("token", 2, 61, 1, 32, 32, 16, False, True),
        ("token", 2, 40, 3, 16, 16, 16, True, False),
        # K, V above the 64-wide block and not powers of two: several masked blocks per program.
        ("head", 1, 70, 2, 80, 72, 32, True, True),
        ("token", 1, 53, 1, 72, 80, 16, True, True),
    ],
)
def test_matches_recurrence(decay, B, T, H, K, V, chunk_size, with_h0, with_final):
    errors = compare_with_reference(B, T, H, K, V, decay, chunk_size, with_h0, with_final)
    assert max(errors.values()) < FP32_TOL, errors


@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("H, K, V", [(1, 16, 32), (3, 32, 16)])
def test_varlen_documents(decay, H, K, V):
    # Documents of length 1, longer than a chunk (16), empty, an exact chunk, and a short tail.
    cu_seqlens = [0, 1, 40, 41, 41, 57, 90, 97]
    errors = compare_with_reference(1, 97, H, K, V, decay, 16, True, True, cu_seqlens)
    assert max(errors.values()) < FP32_TOL, errors


def test_varlen_state_resets_between_documents():
    """A document's output must not depend on the documents packed before it."""
    H, K, V = 3, 16, 16
    q, k, v = torch.randn(1, 60, H, K), torch.randn(1, 60, H, K), torch.randn(1, 60, H, V)
    packed, _ = triton_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 23, 60]), chunk_size=16)
    alone, _ = triton_linear_attention(q[:, 23:], k[:, 23:], v[:, 23:], chunk_size=16)
    assert rel_rms(packed[:, 23:], alone) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    errors = compare_with_reference(1, 70, 3, 32, 32, "token", 32, True, True, dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert max(errors.values()) < tol, errors


def test_float64_uses_torch_form():
    """float64 inputs run the torch form whatever the backend (the dispatcher decides); the kernels refuse them."""
    q, k, v = (torch.randn(1, 20, 2, 16, dtype=torch.float64) for _ in range(3))
    o, final = linear_attention(q, k, v, output_final_state=True, backend="triton")
    ref_o, ref_final = recurrent_linear_attention(q, k, v, output_final_state=True)
    assert o.dtype == torch.float64 and rel_rms(o, ref_o) < 1e-12 and rel_rms(final, ref_final) < 1e-12
    with pytest.raises(ValueError, match="float64"):
        triton_linear_attention(q, k, v)


def test_poisoned_buffers_are_nan():
    buffer = triton_common.alloc((4, 3), torch.float32, torch.device("cpu"))
    assert torch.isnan(buffer).all()


def test_mixed_dtypes_run_in_the_promoted_one():
    """GLA in a bf16 model passes float32 feature maps beside bf16 values: computed in float32, the output in
    q's dtype, each gradient in its input's."""
    q, k = (torch.randn(1, 20, 2, 16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 20, 2, 16).bfloat16().requires_grad_()
    o, _ = triton_linear_attention(q, k, v, chunk_size=16)
    o.sum().backward()
    expected, _ = triton_linear_attention(q, k, v.float(), chunk_size=16)
    assert o.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert rel_rms(o, expected) == 0.0


def test_bad_inputs_raise():
    q, v = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        triton_linear_attention(q, q, v, cu_seqlens=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="log_decay"):
        triton_linear_attention(q, q, v, log_decay=torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_size"):
        triton_linear_attention(q, q, v, chunk_size=24)


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    assert not use_triton("auto", cpu) and not use_triton("torch", cpu)
    assert use_triton("auto", torch.device("cuda")) and use_triton("triton", torch.device("cuda"))
    assert use_triton("triton", cpu) == (not CUDA)  # CPU tensors through the interpreter only
    with pytest.raises(ValueError, match="unknown attention backend"):
        use_triton("flash", cpu)
    q, k, v = torch.randn(1, 40, 3, 16), torch.randn(1, 40, 3, 16), torch.randn(1, 40, 3, 32)
    g = make_decay("head", 1, 40, 3)
    o_triton, h_triton = linear_attention(q, k, v, g, output_final_state=True, backend="triton")
    o_torch, h_torch = linear_attention(q, k, v, g, output_final_state=True, backend="torch")
    assert rel_rms(o_triton, o_torch) < FP32_TOL and rel_rms(h_triton, h_torch) < FP32_TOL
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_attention(q.cpu(), k.cpu(), v.cpu(), backend="triton")


@pytest.mark.parametrize("decay", ["none", "head", "sequence"])
@pytest.mark.parametrize("H, K, V", [(1, 16, 32), (3, 80, 16)])
def test_decode_step(decay, H, K, V):
    """Steps of both backends agree with each other and with the full recurrence, state in place."""
    B, T = 2, 5
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    g = {"none": None, "head": F.logsigmoid(torch.randn(H) + 2),
         "sequence": F.logsigmoid(torch.randn(B, T, H) + 2)}[decay]
    h0 = torch.randn(B, H, K, V)
    ref_o, ref_state = recurrent_linear_attention(q.double(), k.double(), v.double(),
                                                  None if g is None else g.double(), None, h0.double(), True)
    state_triton, state_torch = h0.clone(), h0.clone()
    for t in range(T):
        g_t = g if g is None or g.dim() == 1 else g[:, t]
        o_triton = linear_attention_step(q[:, t], k[:, t], v[:, t], state_triton, g_t, backend="triton")
        o_torch = linear_attention_step(q[:, t], k[:, t], v[:, t], state_torch, g_t, backend="torch")
        assert rel_rms(o_triton, ref_o[:, t]) < FP32_TOL and rel_rms(o_torch, ref_o[:, t]) < FP32_TOL
    assert rel_rms(state_triton, ref_state) < FP32_TOL and rel_rms(state_torch, ref_state) < FP32_TOL


def test_decode_step_bf16_and_bad_state():
    q, k, v = (torch.randn(2, 3, 32, dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(2, 3, 32, 32)
    expected = recurrent_step(q, k, v, state.clone())
    o = triton_linear_attention_step(q, k, v, state)
    assert o.dtype == torch.bfloat16 and rel_rms(o, expected) < 1e-2
    with pytest.raises(ValueError, match="float32"):
        triton_linear_attention_step(q, k, v, state.to(torch.bfloat16))


def test_custom_ops_opcheck():
    B, T, H, K, V = 1, 37, 2, 16, 16
    q, k, v = (torch.randn(B, T, H, d, requires_grad=True) for d in (K, K, V))
    g = make_decay("token", B, T, H).requires_grad_()
    h0 = torch.randn(2, H, K, V, requires_grad=True)
    cu = torch.tensor([0, 20, 37])
    torch.library.opcheck(torch.ops.supra.chunk_linear_attention_fwd.default, (q, k, v, g, h0, cu, 0.25, 16))
    torch.library.opcheck(torch.ops.supra.chunk_linear_attention_fwd.default,
                          (q, k, v, None, None, None, 0.25, 16))
    do, dht = torch.randn(B, T, H, V), torch.randn(2, H, K, V)
    torch.library.opcheck(torch.ops.supra.chunk_linear_attention_bwd.default,
                          (q.detach(), k.detach(), v.detach(), g.detach(), h0.detach(), cu, do, dht, 0.25, 16,
                           True))
    step_args = [x[:, 0].detach() for x in (q, k, v, g)]
    torch.library.opcheck(torch.ops.supra.linear_attention_step.default,
                          (*step_args, torch.randn(B, H, K, V), 0.25))


def test_torch_compile_fullgraph():
    """The op stays in one graph under torch.compile and trains through it (forward and backward)."""
    torch._dynamo.reset()
    B, T, H, K, V = 2, 41, 3, 16, 16

    def loss_fn(q, k, v, g, h0):
        o, final = linear_attention(q, k, v, g, None, h0, True, backend="triton")
        return (o * o).sum() + final.sum()

    inputs = [torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V),
              make_decay("token", B, T, H), torch.randn(B, H, K, V)]
    eager = [x.clone().requires_grad_() for x in inputs]
    compiled = [x.clone().requires_grad_() for x in inputs]
    loss_fn(*eager).backward()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for a, b in zip(compiled, eager):
        assert rel_rms(a.grad, b.grad) < FP32_TOL

    def decode(q, k, v, state):
        return linear_attention_step(q, k, v, state, backend="triton") * 2

    q, k, v = torch.randn(B, H, K), torch.randn(B, H, K), torch.randn(B, H, V)
    state = torch.randn(B, H, K, V)
    ref_state = state.clone()
    out = torch.compile(decode, fullgraph=True, backend="aot_eager")(q, k, v, state)
    expected = recurrent_step(q, k, v, ref_state) * 2
    assert rel_rms(out, expected) < FP32_TOL and rel_rms(state, ref_state) < FP32_TOL
