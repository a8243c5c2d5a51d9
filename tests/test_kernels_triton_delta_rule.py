"""The Triton gated delta rule (under TRITON_INTERPRET=1 on CPU) against the float64 token loop.

Fresh random inputs, odd lengths that leave a partial last chunk, head dims that are no powers of
two and more than one block of V, packed documents of uneven lengths (one empty) with initial and
final states, and every gradient (q, k, v, beta, log decay, initial state) through a random weighting
of the output and the final state. Output buffers are NaN-poisoned, so an element a kernel never
writes fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from supra.kernels import chunk_delta_rule, delta_rule, recurrent_delta_rule, triton_delta_rule
from supra.kernels.triton_delta_rule import triton_delta_rule as triton_op

FP32_TOL = 1e-5
CUDA = torch.cuda.is_available()  # on a CUDA machine the same tests run the compiled kernels


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error; a NaN counts as infinite, so that `max` over a test's errors cannot skip it."""
    if not actual.isfinite().all():
        return float("inf")
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def inputs(B: int, T: int, H: int, K: int, V: int, decay: str, docs: int) -> dict:
    """float32 inputs; log decays drawn like fla's tests (logsigmoid of a normal), q and k L2-normalised."""
    g = {"none": None, "head": F.logsigmoid(torch.randn(H) + 2), "token": F.logsigmoid(torch.randn(B, T, H) + 2)}
    return {"q": F.normalize(torch.randn(B, T, H, K), dim=-1), "k": F.normalize(torch.randn(B, T, H, K), dim=-1),
            "v": torch.randn(B, T, H, V), "beta": torch.rand(B, T, H), "g": g[decay],
            "h0": torch.randn(docs, H, K, V)}


def run(op, x: dict, cu_seqlens: torch.Tensor | None, weights: tuple[torch.Tensor, torch.Tensor], dtype=None):
    """Forward, and the gradients of <weights, (output, final state)> for every input."""
    leaves = {n: t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for n, t in x.items() if t is not None}
    out, final = op(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves.get("g"), 0.9, leaves["h0"], True,
                    cu_seqlens)
    ((out.double() * weights[0]).sum() + (final.double() * weights[1]).sum()).backward()
    return out, final, {n: t.grad for n, t in leaves.items()}


def compare(x: dict, cu_seqlens: torch.Tensor | None, chunk_size: int = 16) -> dict[str, float]:
    """Relative errors of the Triton op (float32) against the float64 recurrence: output, state, gradients."""
    B, T, H, V = x["v"].shape
    weights = (torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(*x["h0"].shape, dtype=torch.float64))
    out, final, grads = run(lambda *a: triton_op(*a, chunk_size=chunk_size), x, cu_seqlens, weights)
    ref_out, ref_final, ref_grads = run(recurrent_delta_rule, x, cu_seqlens, weights, torch.float64)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    errors = {"o": rel(out, ref_out), "final": rel(final, ref_final)}
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape and grads[name].dtype == x[name].dtype, name
        errors["d" + name] = rel(grads[name], ref)
    return errors


@pytest.mark.parametrize(
    "decay, T, K, V",
    [
        ("token", 37, 8, 12),  # per-token decay, 37 = 2 chunks of 16 + 5
        ("head", 21, 24, 12),  # per-head decay, K no power of two
        ("none", 19, 8, 72),  # plain delta rule, two blocks of V
    ],
)
def test_matches_the_recurrence(decay, T, K, V):
    errors = compare(inputs(2, T, 2, K, V, decay, 2), None)
    assert max(errors.values()) < FP32_TOL, errors


def test_packed_documents_of_uneven_lengths():
    cu = torch.tensor([0, 13, 13, 40, 45])  # 13 tokens, an empty document, 27 (two chunks), 5
    errors = compare(inputs(1, 45, 2, 8, 12, "token", 4), cu)
    assert max(errors.values()) < FP32_TOL, errors


def test_bf16_activations():
    """bf16 q, k, v against the float64 recurrence on the same rounded values (W, U, Vn and the
    chunk states are bf16, as in fla; the interpreter truncates where the GPU rounds)."""
    x = inputs(1, 33, 2, 16, 16, "token", 1)
    for name in ("q", "k", "v"):
        x[name] = x[name].bfloat16()
    weights = (torch.randn(1, 33, 2, 16, dtype=torch.float64), torch.randn(1, 2, 16, 16, dtype=torch.float64))
    out, final, grads = run(lambda *a: triton_op(*a, chunk_size=16), x, None, weights)
    ref_out, ref_final, ref_grads = run(recurrent_delta_rule, x, None, weights, torch.float64)
    assert out.dtype == torch.bfloat16 and grads["q"].dtype == torch.bfloat16
    errors = {"o": rel(out, ref_out), "final": rel(final, ref_final),
              **{"d" + n: rel(grads[n], ref) for n, ref in ref_grads.items()}}
    assert max(errors.values()) < 3e-2, errors


def test_one_output_alone():
    """Only the output, or only the final state, in the loss: the other gradient arrives as None."""
    x = inputs(1, 20, 1, 8, 8, "token", 1)
    leaves = [t.clone().requires_grad_() for t in (x["q"], x["k"], x["v"], x["beta"], x["g"], x["h0"])]
    out, _ = triton_op(*leaves[:5], None, leaves[5], False, chunk_size=16)
    ref, _ = recurrent_delta_rule(*(t.double() for t in leaves[:5]), None, leaves[5].double())
    out.sum().backward()
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    assert all(rel(t.grad, r) < FP32_TOL for t, r in zip(leaves, ref_grads))
    for t in leaves:
        t.grad = None
    _, final = triton_op(*leaves[:5], None, leaves[5], True, chunk_size=16)
    final.sum().backward()
    assert leaves[0].grad is not None and not leaves[0].grad.any()  # the final state never reads q


def test_dispatch(monkeypatch):
    x = inputs(1, 20, 2, 8, 8, "token", 1)
    args = (x["q"], x["k"], x["v"], x["beta"], x["g"], None, x["h0"], True)
    ref_o, ref_state = chunk_delta_rule(*args)
    o, state = delta_rule(*args, backend="triton")
    assert rel(o, ref_o) < FP32_TOL and rel(state, ref_state) < FP32_TOL
    calls = []
    monkeypatch.setattr(triton_delta_rule, "triton_delta_rule", lambda *a, **kw: calls.append(1) or triton_op(*a))
    delta_rule(*args, backend="auto")
    assert len(calls) == int(CUDA)  # auto runs Triton on CUDA only
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        delta_rule(*(t.cpu() for t in args[:5]), backend="triton")


def test_dtypes_follow_the_torch_form():
    x = inputs(1, 18, 2, 8, 8, "head", 1)
    args = (x["q"], x["k"], x["v"].bfloat16(), x["beta"], x["g"], None, x["h0"], True)
    o, state = triton_op(*args)  # float32 q, k beside a bf16 v: computed in float32, output in q's dtype
    ref_o, ref_state = chunk_delta_rule(*args)
    assert o.dtype == ref_o.dtype == torch.float32 and rel(o, ref_o) < FP32_TOL and rel(state, ref_state) < FP32_TOL
    o64, _ = delta_rule(*(t.double() for t in args[:5]), backend="triton")  # float64: the torch form
    assert o64.dtype == torch.float64 and rel(o64, recurrent_delta_rule(*(t.double() for t in args[:5]))[0]) < 1e-12
    with pytest.raises(ValueError, match="float64"):  # the dispatcher decides; the kernels refuse float64
        triton_op(*(t.double() for t in args[:5]))


def test_bad_inputs_raise():
    x = inputs(1, 10, 2, 8, 8, "token", 1)
    q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["g"]
    with pytest.raises(ValueError, match="beta"):
        triton_op(q, k, v, beta[..., :1], g)
    with pytest.raises(ValueError, match="log_decay"):
        triton_op(q, k, v, beta, g[..., :1])
    with pytest.raises(ValueError, match="chunk_size"):
        triton_op(q, k, v, beta, g, chunk_size=24)
    with pytest.raises(ValueError, match="K <= 256"):
        big = torch.randn(1, 2, 1, 300)
        triton_op(big, big, torch.randn(1, 2, 1, 4), torch.rand(1, 2, 1))


def test_custom_ops_opcheck():
    x = inputs(1, 16, 1, 8, 8, "token", 1)
    args = [x[n].requires_grad_() for n in ("q", "k", "v", "beta", "g", "h0")]
    torch.library.opcheck(torch.ops.supra.chunk_delta_rule_fwd.default, (*args, None, 0.5, 16))
    detached = [t.detach() for t in args]
    torch.library.opcheck(torch.ops.supra.chunk_delta_rule_bwd.default,
                          (*detached, None, torch.randn_like(x["v"]), torch.randn_like(x["h0"]), 0.5, 16, True))


def test_torch_compile_fullgraph():
    """The op stays in one graph under torch.compile and trains through it (forward and backward)."""
    torch._dynamo.reset()

    def loss_fn(q, k, v, beta, g, h0):
        o, final = delta_rule(q, k, v, beta, g, None, h0, True, backend="triton")
        return (o * o).sum() + final.sum()

    x = inputs(1, 18, 1, 8, 8, "token", 1)
    eager = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "beta", "g", "h0")]
    compiled = [t.detach().clone().requires_grad_() for t in eager]
    loss_fn(*eager).backward()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for a, b in zip(compiled, eager):
        assert rel(a.grad, b.grad) < FP32_TOL
