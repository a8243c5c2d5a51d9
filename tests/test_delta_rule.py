"""The gated delta rule: the chunked WY form and the decode step against the float64 token loop.

Fresh random inputs, odd lengths that leave a partial last chunk, packed documents with initial and
final states, and every gradient (q, k, v, beta, log decay, initial state) through a random weighting
of the output and the final state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from supra.kernels import chunk_delta_rule, delta_rule, delta_rule_step, recurrent_delta_rule


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def inputs(B: int, T: int, H: int, K: int, V: int, decay: str, docs: int, dtype: torch.dtype) -> dict:
    """Fresh inputs; log decays drawn like fla's tests (logsigmoid of a normal), keys L2-normalised."""
    g = {"none": None, "head": F.logsigmoid(torch.randn(H) + 2), "token": F.logsigmoid(torch.randn(B, T, H) + 2)}
    x = {"q": torch.randn(B, T, H, K), "k": F.normalize(torch.randn(B, T, H, K), dim=-1),
         "v": torch.randn(B, T, H, V), "beta": torch.rand(B, T, H), "g": g[decay], "h0": torch.randn(docs, H, K, V)}
    return {name: None if t is None else t.to(dtype) for name, t in x.items()}


def run(op, x: dict, cu_seqlens: torch.Tensor | None, weights: tuple[torch.Tensor, torch.Tensor], **kw):
    """Forward, and the gradients of <weights, (output, final state)> for every input."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items() if t is not None}
    out, final = op(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves.get("g"), 0.7, leaves["h0"], True,
                    cu_seqlens, **kw)
    ((out.double() * weights[0]).sum() + (final.double() * weights[1]).sum()).backward()
    return out, final, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("T,chunk_size", [(1, 16), (37, 16), (50, 64), (67, 32)])
def test_chunked_form_matches_the_recurrence(T, chunk_size, decay):
    B, H, K, V = 2, 3, 8, 5
    x = inputs(B, T, H, K, V, decay, B, torch.float64)
    weights = (torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, K, V, dtype=torch.float64))
    ref_out, ref_final, ref_grads = run(recurrent_delta_rule, x, None, weights)
    out, final, grads = run(chunk_delta_rule, x, None, weights, chunk_size=chunk_size)
    assert rel(out, ref_out) < 1e-10 and rel(final, ref_final) < 1e-10
    for name, grad in ref_grads.items():
        assert rel(grads[name], grad) < 1e-10, name
    # float32 inputs: the chunked form against the float64 recurrence
    x32 = {n: (None if t is None else t.float()) for n, t in x.items()}
    out32, final32, grads32 = run(chunk_delta_rule, x32, None, weights, chunk_size=chunk_size)
    assert out32.dtype == torch.float32
    assert rel(out32, ref_out) < 1e-5 and rel(final32, ref_final) < 1e-5
    for name, grad in ref_grads.items():
        assert rel(grads32[name], grad) < 1e-5, name


def test_packed_documents_restart_and_carry_their_states():
    H, K, V = 2, 8, 4
    cu = torch.tensor([0, 13, 13, 40, 71])  # an empty document too
    x = inputs(1, 71, H, K, V, "token", 4, torch.float64)
    weights = (torch.randn(1, 71, H, V, dtype=torch.float64), torch.randn(4, H, K, V, dtype=torch.float64))
    ref_out, ref_final, ref_grads = run(recurrent_delta_rule, x, cu, weights)
    out, final, grads = run(chunk_delta_rule, x, cu, weights, chunk_size=16)
    assert rel(out, ref_out) < 1e-10 and rel(final, ref_final) < 1e-10
    for name, grad in ref_grads.items():
        assert rel(grads[name], grad) < 1e-10, name
    # each document alone gives the same output and state
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, state = recurrent_delta_rule(x["q"][:, s:e], x["k"][:, s:e], x["v"][:, s:e], x["beta"][:, s:e],
                                            x["g"][:, s:e], 0.7, x["h0"][n:n + 1], True)
        assert torch.allclose(ref_out[:, s:e], alone) and torch.allclose(ref_final[n:n + 1], state)


def test_decode_steps_continue_a_chunked_prefill():
    B, T, H, K, V = 2, 29, 3, 8, 6
    x = inputs(B, T, H, K, V, "token", B, torch.float64)
    whole, _ = recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], None, x["h0"])
    prefill, state = delta_rule(x["q"][:, :20], x["k"][:, :20], x["v"][:, :20], x["beta"][:, :20], x["g"][:, :20],
                                None, x["h0"], True, backend="torch")
    steps = [delta_rule_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], state, x["g"][:, t])
             for t in range(20, T)]
    assert rel(torch.cat([prefill, torch.stack(steps, 1)], 1), whole) < 1e-12


def test_beta_one_writes_the_value_exactly():
    """The delta rule's point: with beta = 1 and no decay, reading a just-written key gives its value."""
    B, T, H, K, V = 1, 10, 1, 16, 4
    k = F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    _, state = recurrent_delta_rule(k, k, v, torch.ones(B, T, H, dtype=torch.float64), None, 1.0, None, True)
    read = torch.einsum("hk,hkv->hv", k[0, -1], state[0])
    assert torch.allclose(read, v[0, -1])
