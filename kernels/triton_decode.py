"""Triton decode step: one new token per sequence, the float32 state updated in place.

Contract of `reference.recurrent_step`: q, k (B, H, K), v (B, H, V), state (B, H, K, V) float32,
log_decay None, per head (H,) or per sequence (B, H). Per (sequence, head) and block of V columns a
program streams its K x BV slice of the state once: decay, add k^T v, write back, and reduce q.S.
Decoding is memory bound (the state is read and written once per token), so there is no tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import alloc, decay_mode


@triton.jit
def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, s_ptr, o_ptr, scale, H, K, V,
                 BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    rv = iv * BV + tl.arange(0, BV)
    m_v = rv < V
    if DECAY == 1:
        decay = tl.exp(tl.load(g_ptr + bh % H).to(tl.float32))
    elif DECAY == 2:
        decay = tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    else:
        decay = 1.0
    vb = tl.load(v_ptr + bh * V + rv, mask=m_v, other=0.0).to(tl.float32)
    o = tl.zeros([BV], dtype=tl.float32)
    s_base = s_ptr + bh.to(tl.int64) * K * V
    for ik in range(tl.cdiv(K, BK)):
        rk = ik * BK + tl.arange(0, BK)
        m_k = rk < K
        kb = tl.load(k_ptr + bh * K + rk, mask=m_k, other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + bh * K + rk, mask=m_k, other=0.0).to(tl.float32)
        offs = rk[:, None] * V + rv[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        s = tl.load(s_base + offs, mask=m_kv, other=0.0) * decay + kb[:, None] * vb[None, :]
        tl.store(s_base + offs, s, mask=m_kv)
        o += tl.sum(qb[:, None] * s, 0)
    tl.store(o_ptr + bh * V + rv, (o * scale).to(o_ptr.dtype.element_ty), mask=m_v)


@torch.library.custom_op("supra::linear_attention_step", mutates_args=("state",))
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
             state: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, K = q.shape
    V = v.shape[-1]
    decay = decay_mode(log_decay)
    g = log_decay.float().contiguous() if log_decay is not None else state
    o = alloc((B, H, V), q.dtype, q.device)
    BK, BV = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(V))
    if B * H > 0:
        _step_kernel[(triton.cdiv(V, BV), B * H)](
            q.contiguous(), k.contiguous(), v.contiguous(), g, state, o, scale, H, K, V,
            BK=BK, BV=BV, DECAY=decay)
    return o


@_step_op.register_fake
def _step_fake(q, k, v, log_decay, state, scale):
    return q.new_empty(*q.shape[:2], v.shape[-1])


def triton_linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                                 log_decay: torch.Tensor | None = None,
                                 scale: float | None = None) -> torch.Tensor:
    """One decode step through the Triton kernel; `state` (contiguous float32) is updated in place."""
    B, H, K = q.shape
    if state.dtype != torch.float32 or not state.is_contiguous() or state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"state must be a contiguous float32 (B, H, K, V) tensor, got {state.dtype} "
                         f"{tuple(state.shape)}")
    if log_decay is not None and log_decay.shape not in ((H,), (B, H)):
        raise ValueError(f"log_decay must be (H,) or (B, H) for a decode step; got {tuple(log_decay.shape)}")
    return _step_op(q, k, v, log_decay, state, K**-0.5 if scale is None else float(scale))
