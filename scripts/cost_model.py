"""What one kernel call should cost: FLOPs and bytes moved through HBM, and the roofline time they give
on an H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s HBM3: NVIDIA's H100 datasheet).

The roofline time max(FLOPs / peak, bytes / bandwidth) is a floor no implementation beats by much;
a measured time is read against it (`roofline`), so a first GPU run says how far from the floor each
kernel is and whether bytes or arithmetic bound it. FLOPs count what our kernels compute (full C x C
tiles, masks not skipped); bytes count every tile load with no L2 reuse, so both are upper estimates
of the work that is strictly needed.
"""

from __future__ import annotations

import math

H100_FLOPS = 989e12  # dense bf16 tensor-core peak, FLOP/s
H100_BYTES = 3.35e12  # HBM3, bytes/s


def roofline(flops: float, nbytes: float, ms: float | None = None) -> dict[str, float | str]:
    """The call's expected time on an H100 and, given a measured `ms`, the fraction of it that the
    floor is (1.0: at the roofline)."""
    compute_ms, memory_ms = flops / H100_FLOPS * 1e3, nbytes / H100_BYTES * 1e3
    out: dict[str, float | str] = {"flops": flops, "bytes": nbytes, "h100_roofline_ms": max(compute_ms, memory_ms),
                                   "bound": "compute" if compute_ms > memory_ms else "memory"}
    if ms:
        out["fraction_of_h100_roofline"] = out["h100_roofline_ms"] / ms
    return out


def linear_flops(B: int, T: int, H: int, K: int, V: int, C: int, backward: bool) -> float:
    """Chunked linear attention as our kernels compute it.

    Forward per token and head: state update 2KV, read of the state 2KV, scores 2CK, scores.v 2CV.
    Backward: recomputed states 2KV, dstates 2KV, dv 2CK+2KV+2CV, dq/dk 4KV+4CV+4CK.
    """
    fwd = 4 * K * V + 2 * C * (K + V)
    bwd = 10 * K * V + 6 * C * (K + V)
    return B * T * H * (fwd + (bwd if backward else 0))


def linear_bytes(B: int, T: int, H: int, K: int, V: int, C: int, elem: int, backward: bool) -> float:
    """HBM traffic of our linear-attention kernels, counting every block load."""
    BK, BV = min(64, K), min(64, V)
    NK, NV = math.ceil(K / BK), math.ceil(V / BV)
    tok = B * T * H
    states = B * math.ceil(T / C) * H * K * V * elem  # one pass over the chunk states, stored in bf16
    fwd_states = tok * (K * NV + V * NK) * elem + states  # read k, v; write h
    fwd_output = tok * (2 * K * NV + 2 * V) * elem + states  # read q, k, v, h; write o
    if not backward:
        return fwd_states + fwd_output
    dstates = tok * (K * NV + V * NK) * elem + states  # read q, do; write dh
    dv = tok * (2 * K * NV + 2 * V) * elem + states  # read k, q, dh, do; write dv
    dqdk = tok * (4 * V * NK + 4 * K) * elem + 2 * states  # read do, v twice; q, k; h, dh; write dq, dk
    return fwd_states + fwd_output + fwd_states + dstates + dv + dqdk


def hybrid_flops(B: int, T: int, H: int, D: int, F: int, V: int, C: int, backward: bool) -> float:
    """The fused LoLCATs hybrid (two full C x C tiles per query chunk).

    Forward per token and head: scores 4CD, feature products 4CF, weights.v 4CV, state read and
    update 4FV. Backward: states and dstates 4FV; dq kernel 8CD+4CF+4CV+2FV; dkv kernel 8CD+8CF+8CV+4FV.
    """
    fwd = 4 * C * (D + F + V) + 4 * F * V
    bwd = 16 * C * D + 12 * C * F + 12 * C * V + 10 * F * V
    return B * T * H * (fwd + (bwd if backward else 0))


def hybrid_bytes(B: int, T: int, H: int, D: int, F: int, V: int, C: int, elem: int, backward: bool) -> float:
    """HBM traffic of the hybrid kernels (keys twice: two query chunks read them); float32 features."""
    tok, states = B * T * H, B * math.ceil(T / C) * H * F * (V + 1) * 4
    walk = tok * (4 * F + elem * V) + states  # read fk, v; write the states
    fwd = walk + tok * (elem * (3 * D + 3 * V) + 4 * 3 * F + 8) + states  # q, k x2, v x2, o; fq, fk x2; c, z
    if not backward:
        return fwd
    dstates = tok * (4 * F + elem * V + 8) + states
    dq = tok * (elem * (4 * D + 3 * V) + 4 * 4 * F + 20) + states  # + do, dq, dfq, per-token scalars
    dkv = tok * (elem * (5 * D + 6 * V) + 4 * 4 * F + 32) + states
    return fwd + walk + dstates + dq + dkv


def delta_rule_flops(B: int, T: int, H: int, K: int, V: int, C: int, backward: bool) -> float:
    """The chunked gated delta rule (triton_delta_rule.py). Forward per token and head: K K^T 2CK,
    the C x C inverse C^2, W and U 2C(K+V), W S and the state update 4KV, output 2KV+2C(K+V).
    Backward (recomputing the forward's W, U, S): about 2.5 times the forward, as in fla."""
    fwd = 2 * C * K + C * C + 2 * C * (K + V) + 4 * K * V + 2 * K * V + 2 * C * (K + V)
    return B * T * H * fwd * (3.5 if backward else 1.0)


def delta_rule_bytes(B: int, T: int, H: int, K: int, V: int, C: int, elem: int, backward: bool) -> float:
    """q, k, v, beta, decay read, W, U, Vn written and read, chunk states written and read, o written;
    the backward about three times that (recompute, dstates, gradients)."""
    tok = B * T * H
    states = 2 * B * math.ceil(T / C) * H * K * V * elem
    fwd = tok * (elem * (2 * K + 2 * V) + 8 + elem * 2 * (2 * K + 2 * V)) + states
    return fwd * (4.0 if backward else 1.0)


def decode_step(B: int, H: int, K: int, V: int) -> tuple[float, float]:
    """One decode token: FLOPs 4KV per head; bytes: the float32 state read and written, q, k, v, o in bf16."""
    return 4 * B * H * K * V, B * H * (2 * K * V * 4 + (2 * K + 2 * V) * 2)


def sdpa_flops(B: int, T: int, H: int, D: int, backward: bool) -> float:
    fwd = 2 * B * H * T * T * D  # two T x T x D products, half of them masked by causality
    return fwd * (3.5 if backward else 1.0)  # FlashAttention's convention: backward = 2.5 x forward


def sdpa_bytes(B: int, T: int, H: int, D: int, elem: int, backward: bool) -> float:
    return B * T * H * D * elem * (9 if backward else 4)  # q, k, v, o (+ do, dq, dk, dv, o again)
