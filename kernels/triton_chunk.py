"""Triton chunked causal linear attention with decay: forward and backward, as a torch custom op.

Same contract as `reference.recurrent_linear_attention`. The algorithm is the one in `chunked.py`
(and fla's chunk_simple_gla): cut every document into chunks of C tokens, carry a K x V float32
state from chunk to chunk, and inside a chunk use the small masked quadratic form.

Every batch is handled as packed documents: (B, T, H, D) without `cu_seqlens` is viewed as one row
of B documents of length T (a free reshape), so one set of kernels covers both layouts.

Kernels (grids in brackets; NK, NV are the counts of K and V blocks):
  _states_kernel   [NK, NV, docs*H]    walk a document's chunks in order, store the state entering
                                        each chunk, end with the final state. Sequential in chunks.
  output_kernel    [NV, chunks, H]     o = inter-chunk read of the entering state + intra-chunk part.
  _dstates_kernel  [NK, NV, docs*H]    the same walk backwards for dL/d(state leaving each chunk),
                                        ending with dL/d(initial state).
  _dv_kernel       [NV, chunks, H]     dv.
  dqdk_kernel      [NK, chunks, H]     dq, dk, and per-token partial sums for the log-decay gradient.
The backward recomputes the chunk states instead of keeping them from the forward (memory).
`output_kernel` and `dqdk_kernel` are public: the delta rule (`triton_delta_rule.py`) runs them on its
corrected values. Helpers and the launch layout shared with it are in `triton_common.py`.

Decay: with G the running sum of the log decay inside a chunk, every factor is exp(G_i - G_j) with
j <= i, or exp(G_last - G_j), or exp(G_i): the exponent is never positive for a decay, so nothing
overflows. Masked entries take exp(-inf) = 0 rather than multiplying a possibly huge value by 0.

No `tl.trans` inside `tl.dot`: a transposed operand is loaded transposed through its pointers
(Triton 3.4-3.7.0 miscompiled a transposed dot on Hopper; this layout sidesteps the whole class).

Gradient of the log decay (per token (B, T, H), or per head (H,) as the sum over tokens): computed
chunk by chunk in `dqdk_kernel` from the terms in which g_t appears, all sums local to the chunk;
the state carried across the chunk boundary enters through one <dL/dstate, state> product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import ChunkLayout, alloc, check_dtypes, chunk_log_decay, dot, last_entry

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _states_kernel(k_ptr, v_ptr, g_ptr, h0_ptr, h_ptr, ht_ptr, cu_ptr, chunk_off_ptr,
                   H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   DECAY: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    ik, iv, nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, h = nh // H, nh % H
    start, end = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    first_chunk = tl.load(chunk_off_ptr + n)
    rk, rv, rc = ik * BK + tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, C)
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    kv_off = rk[:, None] * V + rv[None, :]  # offsets of this program's block in one K x V state

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0_ptr + nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.0)
    for c in range(tl.cdiv(end - start, C)):
        t0 = start + c * C
        L = tl.minimum(C, end - t0)
        chunk = (first_chunk + c).to(tl.int64)
        tl.store(h_ptr + (chunk * H + h) * K * V + kv_off, state.to(h_ptr.dtype.element_ty), mask=m_kv)
        G = chunk_log_decay(g_ptr, t0, L, h, H, C, DECAY)
        G_last = last_entry(G, C)
        tok = (t0 + rc).to(tl.int64) * H + h
        # k loaded transposed (BK, C) so the update is a plain dot: state += k^T diag(w) v.
        kt = tl.load(k_ptr + tok[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < L),
                     other=0.0)
        vb = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=(rc[:, None] < L) & (rv[None, :] < V),
                     other=0.0)
        kt = (kt * tl.exp(G_last - G)[None, :]).to(vb.dtype)  # how much of each key survives the chunk
        state = state * tl.exp(G_last) + dot(kt, vb, PREC, UPCAST)
    tl.store(ht_ptr + nh.to(tl.int64) * K * V + kv_off, state, mask=m_kv)


@triton.jit
def output_kernel(q_ptr, k_ptr, v_ptr, g_ptr, h_ptr, o_ptr, chunk_start_ptr, chunk_len_ptr, scale,
                   H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   DECAY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    iv, chunk, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = tl.load(chunk_start_ptr + chunk), tl.load(chunk_len_ptr + chunk)
    rv, rc = iv * BV + tl.arange(0, BV), tl.arange(0, C)
    tok = (t0 + rc).to(tl.int64) * H + h
    h_base = h_ptr + (chunk.to(tl.int64) * H + h) * K * V
    G = chunk_log_decay(g_ptr, t0, L, h, H, C, DECAY)

    inter = tl.zeros([C, BV], dtype=tl.float32)  # q . (entering state), before its decay
    scores = tl.zeros([C, C], dtype=tl.float32)  # q_i . k_j
    for ik in range(tl.cdiv(K, BK)):
        rk = ik * BK + tl.arange(0, BK)
        qb = tl.load(q_ptr + tok[:, None] * K + rk[None, :], mask=(rc[:, None] < L) & (rk[None, :] < K),
                     other=0.0)
        kt = tl.load(k_ptr + tok[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < L),
                     other=0.0)
        hb = tl.load(h_base + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & (rv[None, :] < V),
                     other=0.0)
        inter += dot(qb, hb.to(qb.dtype), PREC, UPCAST)
        scores += dot(qb, kt, PREC, UPCAST)
    causal = rc[:, None] >= rc[None, :]
    decay = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    m_out = (rc[:, None] < L) & (rv[None, :] < V)
    vb = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=m_out, other=0.0)
    o = inter * tl.exp(G)[:, None] + dot((scores * decay).to(vb.dtype), vb, PREC, UPCAST)
    tl.store(o_ptr + tok[:, None] * V + rv[None, :], (o * scale).to(o_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def _dstates_kernel(q_ptr, do_ptr, g_ptr, dht_ptr, dh_ptr, dh0_ptr, cu_ptr, chunk_off_ptr, scale,
                    H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    DECAY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    ik, iv, nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, h = nh // H, nh % H
    start, end = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    first_chunk = tl.load(chunk_off_ptr + n)
    rk, rv, rc = ik * BK + tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, C)
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    kv_off = rk[:, None] * V + rv[None, :]

    # dstate: dL/d(state leaving the current chunk); it starts as dL/d(final state).
    dstate = tl.load(dht_ptr + nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0.0).to(tl.float32)
    num_chunks = tl.cdiv(end - start, C)
    for i in range(num_chunks):
        c = num_chunks - 1 - i
        t0 = start + c * C
        L = tl.minimum(C, end - t0)
        chunk = (first_chunk + c).to(tl.int64)
        tl.store(dh_ptr + (chunk * H + h) * K * V + kv_off, dstate.to(dh_ptr.dtype.element_ty), mask=m_kv)
        G = chunk_log_decay(g_ptr, t0, L, h, H, C, DECAY)
        tok = (t0 + rc).to(tl.int64) * H + h
        qt = tl.load(q_ptr + tok[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < L),
                     other=0.0)
        dob = tl.load(do_ptr + tok[:, None] * V + rv[None, :], mask=(rc[:, None] < L) & (rv[None, :] < V),
                      other=0.0)
        # o_i reads exp(G_i) * (entering state), so the entering state gets scale * q^T diag(exp G) do.
        qt = (qt * (tl.exp(G) * scale)[None, :]).to(dob.dtype)
        dstate = dstate * tl.exp(last_entry(G, C)) + dot(qt, dob, PREC, UPCAST)
    tl.store(dh0_ptr + nh.to(tl.int64) * K * V + kv_off, dstate, mask=m_kv)


@triton.jit
def _dv_kernel(q_ptr, k_ptr, do_ptr, g_ptr, dh_ptr, dv_ptr, chunk_start_ptr, chunk_len_ptr, scale,
               H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               DECAY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    iv, chunk, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = tl.load(chunk_start_ptr + chunk), tl.load(chunk_len_ptr + chunk)
    rv, rc = iv * BV + tl.arange(0, BV), tl.arange(0, C)
    tok = (t0 + rc).to(tl.int64) * H + h
    dh_base = dh_ptr + (chunk.to(tl.int64) * H + h) * K * V
    G = chunk_log_decay(g_ptr, t0, L, h, H, C, DECAY)

    scores_t = tl.zeros([C, C], dtype=tl.float32)  # [j, i] = k_j . q_i, built transposed directly
    from_state = tl.zeros([C, BV], dtype=tl.float32)  # k_j . dL/d(state leaving the chunk)
    for ik in range(tl.cdiv(K, BK)):
        rk = ik * BK + tl.arange(0, BK)
        kb = tl.load(k_ptr + tok[:, None] * K + rk[None, :], mask=(rc[:, None] < L) & (rk[None, :] < K),
                     other=0.0)
        qt = tl.load(q_ptr + tok[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < L),
                     other=0.0)
        dhb = tl.load(dh_base + rk[:, None] * V + rv[None, :], mask=(rk[:, None] < K) & (rv[None, :] < V),
                      other=0.0)
        scores_t += dot(kb, qt, PREC, UPCAST)
        from_state += dot(kb, dhb.to(kb.dtype), PREC, UPCAST)
    anticausal = rc[:, None] <= rc[None, :]  # row j feeds output i >= j
    decay_t = tl.exp(tl.where(anticausal, G[None, :] - G[:, None], float("-inf")))
    m_out = (rc[:, None] < L) & (rv[None, :] < V)
    dob = tl.load(do_ptr + tok[:, None] * V + rv[None, :], mask=m_out, other=0.0)
    dv = (dot((scores_t * decay_t * scale).to(dob.dtype), dob, PREC, UPCAST)
          + from_state * tl.exp(last_entry(G, C) - G)[:, None])
    tl.store(dv_ptr + tok[:, None] * V + rv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m_out)


@triton.jit
def dqdk_kernel(q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, dg_ptr,
                 chunk_start_ptr, chunk_len_ptr, scale, T_total,
                 H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 DECAY: tl.constexpr, NEED_DG: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    ik, chunk, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = tl.load(chunk_start_ptr + chunk), tl.load(chunk_len_ptr + chunk)
    rk, rc = ik * BK + tl.arange(0, BK), tl.arange(0, C)
    tok = (t0 + rc).to(tl.int64) * H + h
    state_off = (chunk.to(tl.int64) * H + h) * K * V
    G = chunk_log_decay(g_ptr, t0, L, h, H, C, DECAY)

    dq_state = tl.zeros([C, BK], dtype=tl.float32)  # do_i . h^T (entering state)
    dk_state = tl.zeros([C, BK], dtype=tl.float32)  # v_j . dh^T (grad of the leaving state)
    dscores = tl.zeros([C, C], dtype=tl.float32)  # [i, j] = do_i . v_j
    dscores_t = tl.zeros([C, C], dtype=tl.float32)  # [j, i] = v_j . do_i
    carry = 0.0  # <dh, h> over this K block: for the log-decay gradient
    m_k_t = (rk[None, :] < K)
    for iv in range(tl.cdiv(V, BV)):
        rv = iv * BV + tl.arange(0, BV)
        m_tv = (rc[:, None] < L) & (rv[None, :] < V)
        m_vt = (rv[:, None] < V) & (rc[None, :] < L)
        dob = tl.load(do_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        do_t = tl.load(do_ptr + tok[None, :] * V + rv[:, None], mask=m_vt, other=0.0)
        vb = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        vt = tl.load(v_ptr + tok[None, :] * V + rv[:, None], mask=m_vt, other=0.0)
        m_st = (rv[:, None] < V) & m_k_t
        ht = tl.load(h_ptr + state_off + rk[None, :] * V + rv[:, None], mask=m_st, other=0.0)
        dht = tl.load(dh_ptr + state_off + rk[None, :] * V + rv[:, None], mask=m_st, other=0.0)
        dq_state += dot(dob, ht.to(dob.dtype), PREC, UPCAST)
        dk_state += dot(vb, dht.to(vb.dtype), PREC, UPCAST)
        dscores += dot(dob, vt, PREC, UPCAST)
        dscores_t += dot(vb, do_t, PREC, UPCAST)
        if NEED_DG:
            carry += tl.sum(tl.sum(ht.to(tl.float32) * dht.to(tl.float32), 1), 0)
    causal = rc[:, None] >= rc[None, :]
    decay = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    decay_t = tl.exp(tl.where(rc[:, None] <= rc[None, :], G[None, :] - G[:, None], float("-inf")))
    m_tk = (rc[:, None] < L) & m_k_t
    qb = tl.load(q_ptr + tok[:, None] * K + rk[None, :], mask=m_tk, other=0.0)
    kb = tl.load(k_ptr + tok[:, None] * K + rk[None, :], mask=m_tk, other=0.0)
    dq = scale * (dq_state * tl.exp(G)[:, None]
                  + dot((dscores * decay).to(kb.dtype), kb, PREC, UPCAST))
    dk = (scale * dot((dscores_t * decay_t).to(qb.dtype), qb, PREC, UPCAST)
          + dk_state * tl.exp(last_entry(G, C) - G)[:, None])
    tl.store(dq_ptr + tok[:, None] * K + rk[None, :], dq.to(dq_ptr.dtype.element_ty), mask=m_tk)
    tl.store(dk_ptr + tok[:, None] * K + rk[None, :], dk.to(dk_ptr.dtype.element_ty), mask=m_tk)
    if NEED_DG:
        # dL/dg_t for the tokens of this chunk, this K block's share (float32; the host sums blocks).
        # g_t enters exp(G_i - G_j) for j < t <= i, exp(G_i) for i >= t (reads of the entering state),
        # exp(G_last - G_j) for j < t (writes to the leaving state) and exp(G_last) (carry of the state):
        #   dg_t = sum_{i>=t>j} P_ij + sum_{i>=t} R_i + sum_{j<t} W_j + exp(G_last) <dh, h>
        # P: intra-chunk pair terms, R: state reads, W: state writes. Every sum stays inside the chunk,
        # so no rounding accumulates along the sequence (a global suffix sum of q.dq - k.dk did, and
        # lost three digits of a per-head decay gradient at T ~ 100).
        kt = tl.load(k_ptr + tok[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < L),
                     other=0.0)
        pairs = tl.where(rc[:, None] > rc[None, :], dot(qb, kt, PREC, UPCAST) * dscores * decay * scale, 0.0)
        reads = tl.sum(qb.to(tl.float32) * dq_state, 1) * tl.exp(G) * scale
        writes = tl.sum(kb.to(tl.float32) * dk_state, 1) * tl.exp(last_entry(G, C) - G)
        # sum_{s>=t} (rowsum_s - colsum_s) of the strictly lower pairs = sum over i >= t > j of P_ij.
        part = (tl.cumsum(tl.sum(pairs, 1) - tl.sum(pairs, 0) + reads, 0, reverse=True)
                + tl.cumsum(writes, 0) - writes + tl.exp(last_entry(G, C)) * carry)
        tl.store(dg_ptr + ik.to(tl.int64) * T_total * H + tok, part, mask=rc < L)


# ----------------------------------------------------------------------------------------------
# Host side: layout, chunk tables, launches
# ----------------------------------------------------------------------------------------------


def _decay_arg(log_decay: torch.Tensor | None, lay: ChunkLayout, fallback: torch.Tensor) -> torch.Tensor:
    if log_decay is None:
        return fallback  # never read: the kernels are compiled with DECAY=0
    return log_decay.float().reshape(-1).contiguous()  # (H,) or packed (B*T*H,)


def _states(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h0: torch.Tensor | None,
            lay: ChunkLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """State entering every chunk (chunks, H, K, V) and the final state per document (docs, H, K, V)."""
    h = alloc((lay.chunks, lay.H, lay.K, lay.V), lay.state_dtype, k.device)
    ht = alloc((lay.docs, lay.H, lay.K, lay.V), torch.float32, k.device)
    if lay.docs * lay.H > 0:
        _states_kernel[(lay.NK, lay.NV, lay.docs * lay.H)](
            k, v, g, h0 if h0 is not None else ht, h, ht, lay.tables["cu"], lay.tables["chunk_off"],
            HAS_H0=h0 is not None, **lay.meta())
    return h, ht


def _forward(q, k, v, log_decay, initial_state, cu_seqlens, scale, chunk_size):
    lay = ChunkLayout(q, v, log_decay, cu_seqlens, chunk_size)
    qf, kf, vf = lay.flat(q), lay.flat(k), lay.flat(v)
    g = _decay_arg(log_decay, lay, qf)
    h0 = initial_state.contiguous() if initial_state is not None else None
    h, ht = _states(kf, vf, g, h0, lay)
    o = alloc(vf.shape, q.dtype, q.device)
    if lay.chunks > 0:
        output_kernel[(lay.NV, lay.chunks, lay.H)](
            qf, kf, vf, g, h, o, lay.tables["chunk_start"], lay.tables["chunk_len"], scale, **lay.meta())
    return o.view(lay.B, lay.T, lay.H, lay.V), ht


def _backward(q, k, v, log_decay, initial_state, cu_seqlens, do, dht, scale, chunk_size, need_dg):
    lay = ChunkLayout(q, v, log_decay, cu_seqlens, chunk_size)
    qf, kf, vf, dof = lay.flat(q), lay.flat(k), lay.flat(v), lay.flat(do)
    g = _decay_arg(log_decay, lay, qf)
    h0 = initial_state.contiguous() if initial_state is not None else None
    h, _ = _states(kf, vf, g, h0, lay)  # recomputed: cheaper in memory than keeping them

    dh = alloc(h.shape, lay.state_dtype, q.device)
    dh0 = alloc((lay.docs, lay.H, lay.K, lay.V), torch.float32, q.device)
    TT = lay.B * lay.T
    dq, dk, dv = alloc(qf.shape, q.dtype, q.device), alloc(kf.shape, k.dtype, q.device), alloc(
        vf.shape, v.dtype, q.device)
    need_dg = need_dg and log_decay is not None
    dg = alloc((lay.NK, TT, lay.H), torch.float32, q.device) if need_dg else dh0  # per K block
    tables = lay.tables
    if lay.docs * lay.H > 0:
        _dstates_kernel[(lay.NK, lay.NV, lay.docs * lay.H)](
            qf, dof, g, dht.float().contiguous(), dh, dh0, tables["cu"], tables["chunk_off"], scale,
            **lay.meta())
    if lay.chunks > 0:
        _dv_kernel[(lay.NV, lay.chunks, lay.H)](
            qf, kf, dof, g, dh, dv, tables["chunk_start"], tables["chunk_len"], scale, num_stages=2,
            **lay.meta())
        dqdk_kernel[(lay.NK, lay.chunks, lay.H)](
            qf, kf, vf, dof, g, h, dh, dq, dk, dg, tables["chunk_start"], tables["chunk_len"], scale,
            TT, NEED_DG=need_dg, **lay.dqdk_meta())
    shape = lambda x, d: x.view(lay.B, lay.T, lay.H, d)  # noqa: E731
    dg = dg.sum(0).view(lay.B, lay.T, lay.H) if need_dg else q.new_empty(0, dtype=torch.float32)
    return shape(dq, lay.K), shape(dk, lay.K), shape(dv, lay.V), dg, dh0


# ----------------------------------------------------------------------------------------------
# Custom ops (so torch.compile keeps them in one graph) and their autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("supra::chunk_linear_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
            initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, scale: float,
            chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, log_decay, initial_state, cu_seqlens, scale, chunk_size)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, log_decay, initial_state, cu_seqlens, scale, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    docs = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(B, T, H, V), q.new_empty(docs, H, K, V, dtype=torch.float32)


@torch.library.custom_op("supra::chunk_linear_attention_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
            initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, do: torch.Tensor,
            dht: torch.Tensor, scale: float, chunk_size: int,
            need_dg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q, k, v, log_decay, initial_state, cu_seqlens, do, dht, scale, chunk_size, need_dg)


@_bwd_op.register_fake
def _bwd_fake(q, k, v, log_decay, initial_state, cu_seqlens, do, dht, scale, chunk_size, need_dg):
    B, T, H, _ = q.shape
    dg_shape = (B, T, H) if need_dg and log_decay is not None else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(dg_shape, dtype=torch.float32), torch.empty_like(dht, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, log_decay, initial_state, cu_seqlens, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, log_decay, initial_state, cu_seqlens)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _backward_rule(ctx, do, dht):
    q, k, v, log_decay, initial_state, cu_seqlens = ctx.saved_tensors
    need_dg = log_decay is not None and ctx.needs_input_grad[3]
    if do is None:
        do = v.new_zeros(v.shape)
    if dht is None:
        docs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        dht = q.new_zeros(docs, q.shape[2], q.shape[3], v.shape[-1], dtype=torch.float32)
    dq, dk, dv, dg, dh0 = _bwd_op(q, k, v, log_decay, initial_state, cu_seqlens, do.contiguous(), dht,
                                  ctx.scale, ctx.chunk_size, need_dg)
    if need_dg and log_decay.dim() == 1:
        dg = dg.sum((0, 1))  # a per-head decay is shared by every token
    return (dq, dk, dv, dg if need_dg else None, dh0 if initial_state is not None else None,
            None, None, None)


torch.library.register_autograd("supra::chunk_linear_attention_fwd", _backward_rule,
                                setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def triton_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked causal linear attention through the Triton kernels; contract of `reference.py`.

    float64 inputs raise: `linear_attention` runs the torch form for them (`dispatch.py`).
    With `cu_seqlens` the boundaries are read on the host (one sync) to size the launch grid.
    """
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be (B, T, H, K) and v (B, T, H, V); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed row, got batch size {B}")
    if log_decay is not None and log_decay.shape not in ((H,), (B, T, H)):
        raise ValueError(f"log_decay must be (H,)={H,} or (B, T, H)={B, T, H}; got {tuple(log_decay.shape)}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 (tl.dot tiles), got {chunk_size}")
    check_dtypes("linear_attention", q, k, v)
    # The kernels take one dtype: mixed inputs (GLA in a bf16 model passes float32 feature maps beside
    # bf16 values) run in the promoted one, as the torch form computes; the output is in q's dtype and
    # each gradient comes back in its input's dtype.
    out_dtype = q.dtype
    act = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(act), k.to(act), v.to(act)
    scale = K**-0.5 if scale is None else float(scale)
    if log_decay is not None:
        log_decay = log_decay.float()
    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), log_decay, initial_state,
                       cu_seqlens, scale, chunk_size)
    return o.to(out_dtype), (final if output_final_state else None)
