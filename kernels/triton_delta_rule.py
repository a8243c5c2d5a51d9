"""Triton chunked gated delta rule: forward and backward, as torch custom ops with an autograd rule.

Contract: the one of `delta_rule.chunk_delta_rule` (and of its definition `recurrent_delta_rule`):
q, k (B, T, H, K), v (B, T, H, V), beta (B, T, H), log_decay None, (H,) or (B, T, H), initial and
final states (B, H, K, V), or (N, H, K, V) with `cu_seqlens` (N+1,) over a batch of one packed row.
Callers L2-normalise q and k, as for the torch form (this op normalises nothing). Output o in q's
dtype; final state float32. q, k, v of different dtypes are promoted to float32 (their gradients
come back in their own dtypes); beta, log decay and initial state are used in float32; float64
inputs raise (`delta_rule` runs the torch form for them). K <= 256 (one block of K per program); C a
power of two >= 16.

Algorithm (fla's chunk_gated_delta_rule; the notation of `delta_rule.py`): per chunk of C tokens,
with G the running log decay, beta b and S the state entering the chunk,

    A = strict_lower(b_i exp(G_i - G_j) k_i.k_j),  T = (I + A)^-1
    W = T diag(b exp G) K,   U = T diag(b) V          (per chunk, in parallel: `_wy_kernel`)
    Vn = U - W S                                       (the corrected values u_t of the chunk)
    S' = exp(G_last) S + (K * exp(G_last - G))^T Vn    (sequential over chunks: `_delta_states_kernel`)
    o = scale (exp(G) Q S + (Q K^T * D) Vn)            (D_ij = exp(G_i - G_j), j <= i)

Given Vn, the output and the state update are those of linear attention with values Vn, so the
output kernel and the dq/dk kernel of `triton_chunk.py` run unchanged on (q, k, Vn).

Backward: the chunk states are recomputed (W, U, S, Vn), then
  `_delta_dstates_kernel`  walks the chunks backwards: dVn = scale (Q K^T * D)^T dO + (K * exp(G_last - G)) dS'
                           and dS = exp(G_last) dS' + scale Q^T diag(exp G) dO - W^T dVn, ending with
                           dL/d(initial state);
  `dqdk_kernel` (triton_chunk.py) on (q, k, Vn): dq, the direct part of dk, the log-decay gradient of the
                           linear-attention terms;
  `_wy_backward_kernel`    the rest, through (I + A) Vn = R with R = diag(b)(V - diag(exp G) K S):
                           dR = T^T dVn, dA = -strict_lower(dR Vn^T), dV = diag(b) dR, and from A and R
                           the remaining dk, dbeta and dlog_decay (sums inside the chunk only).
Grids: [chunks, H] for the per-chunk kernels, [NV, documents * H] for the two walks.

What is exact: nothing beyond float32 arithmetic. float32 inputs take each product as three tf32
ones (tf32x3, on the tensor cores: about float32's accuracy); against the float64 recurrence the
output, final state and every gradient agree to about 2e-7 relative on the tests' shapes under the
interpreter, which computes in float32 (they allow 1e-5). bf16 inputs keep W, U, Vn and the chunk
states in bf16, as fla does (about 1e-2 relative). (I + A)^-1 is computed by forward substitution,
one row per step: C steps on a C x C tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_chunk import dqdk_kernel, output_kernel
from .triton_common import ChunkLayout, alloc, check_dtypes, chunk_log_decay, dot, last_entry

MAX_K = 256  # one block of K per program: W S and K^T Vn contract over all of K at once


# ----------------------------------------------------------------------------------------------
# Kernels (BK is the whole head dimension K, padded to a power of two)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _inverse(A, C: tl.constexpr):
    """(I + A)^-1 and its transpose for a strictly lower triangular A (C x C, float32).

    Forward substitution: row i of N = (I + A)^-1 - I is -A_i + sum_{j<i} (-A_ij) N_j, and rows
    j < i are final when row i is computed. The transpose is written column by column alongside,
    so that no dot needs a transposed operand (see triton_chunk.py).
    """
    rc = tl.arange(0, C)
    N = -A
    Nt = tl.zeros([C, C], dtype=tl.float32)
    for i in range(1, C):
        row = tl.sum(tl.where(rc[:, None] == i, N, 0.0), 0)
        row += tl.sum(row[:, None] * N, 0)
        N = tl.where(rc[:, None] == i, row[None, :], N)
        Nt = tl.where(rc[None, :] == i, row[:, None], Nt)
    eye = tl.where(rc[:, None] == rc[None, :], 1.0, 0.0)
    return N + eye, Nt + eye


@triton.jit
def _load_chunk_keys(k_ptr, b_ptr, tok, L, K, C: tl.constexpr, BK: tl.constexpr):
    """k (C, BK), k transposed (BK, C) and beta (C,) of one chunk; zero past its L tokens."""
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    kb = tl.load(k_ptr + tok[:, None] * K + rk[None, :], mask=(rc[:, None] < L) & (rk[None, :] < K), other=0.0)
    kt = tl.load(k_ptr + tok[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < L), other=0.0)
    beta = tl.load(b_ptr + tok, mask=rc < L, other=0.0)
    return kb, kt, beta


@triton.jit
def _wy_kernel(k_ptr, v_ptr, b_ptr, g_ptr, w_ptr, u_ptr, chunk_start_ptr, chunk_len_ptr,
               H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               DECAY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    chunk, h = tl.program_id(0), tl.program_id(1)
    t0, L = tl.load(chunk_start_ptr + chunk), tl.load(chunk_len_ptr + chunk)
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    tok = (t0 + rc).to(tl.int64) * H + h
    G = chunk_log_decay(g_ptr, t0, L, h, H, C, DECAY)
    kb, kt, beta = _load_chunk_keys(k_ptr, b_ptr, tok, L, K, C, BK)
    strict = rc[:, None] > rc[None, :]
    A = dot(kb, kt, PREC, UPCAST) * tl.exp(tl.where(strict, G[:, None] - G[None, :], float("-inf"))) * beta[:, None]
    T, _ = _inverse(A, C)
    w = dot(T.to(kb.dtype), (kb * (beta * tl.exp(G))[:, None]).to(kb.dtype), PREC, UPCAST)
    tl.store(w_ptr + tok[:, None] * K + rk[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(rc[:, None] < L) & (rk[None, :] < K))
    for iv in range(tl.cdiv(V, BV)):
        rv = iv * BV + tl.arange(0, BV)
        m_tv = (rc[:, None] < L) & (rv[None, :] < V)
        vb = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        u = dot(T.to(vb.dtype), (vb * beta[:, None]).to(vb.dtype), PREC, UPCAST)
        tl.store(u_ptr + tok[:, None] * V + rv[None, :], u.to(u_ptr.dtype.element_ty), mask=m_tv)


@triton.jit
def _delta_states_kernel(k_ptr, w_ptr, u_ptr, g_ptr, h0_ptr, h_ptr, vn_ptr, ht_ptr, cu_ptr, chunk_off_ptr,
                         H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         DECAY: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr,
                         UPCAST: tl.constexpr):
    iv, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    start, end = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    first_chunk = tl.load(chunk_off_ptr + n)
    rk, rv, rc = tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, C)
    m_kv = (rk[:, None] < K) & (rv[None, :] < V)
    kv_off = rk[:, None] * V + rv[None, :]

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
        m_tv = (rc[:, None] < L) & (rv[None, :] < V)
        wb = tl.load(w_ptr + tok[:, None] * K + rk[None, :], mask=(rc[:, None] < L) & (rk[None, :] < K), other=0.0)
        ub = tl.load(u_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        vn = (ub.to(tl.float32) - dot(wb, state.to(wb.dtype), PREC, UPCAST)).to(vn_ptr.dtype.element_ty)
        tl.store(vn_ptr + tok[:, None] * V + rv[None, :], vn, mask=m_tv)
        kt = tl.load(k_ptr + tok[None, :] * K + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < L), other=0.0)
        kt = (kt * tl.exp(G_last - G)[None, :]).to(vn.dtype)  # how much of each write survives the chunk
        state = state * tl.exp(G_last) + dot(kt, vn, PREC, UPCAST)
    tl.store(ht_ptr + nh.to(tl.int64) * K * V + kv_off, state, mask=m_kv)


@triton.jit
def _delta_dstates_kernel(q_ptr, k_ptr, w_ptr, do_ptr, g_ptr, dht_ptr, dh_ptr, dvn_ptr, dh0_ptr, cu_ptr,
                          chunk_off_ptr, scale, H, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          DECAY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    iv, nh = tl.program_id(0), tl.program_id(1)
    n, h = nh // H, nh % H
    start, end = tl.load(cu_ptr + n), tl.load(cu_ptr + n + 1)
    first_chunk = tl.load(chunk_off_ptr + n)
    rk, rv, rc = tl.arange(0, BK), iv * BV + tl.arange(0, BV), tl.arange(0, C)
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
        G_last = last_entry(G, C)
        tok = (t0 + rc).to(tl.int64) * H + h
        m_tk, m_kt = (rc[:, None] < L) & (rk[None, :] < K), (rk[:, None] < K) & (rc[None, :] < L)
        m_tv = (rc[:, None] < L) & (rv[None, :] < V)
        kb = tl.load(k_ptr + tok[:, None] * K + rk[None, :], mask=m_tk, other=0.0)
        qt = tl.load(q_ptr + tok[None, :] * K + rk[:, None], mask=m_kt, other=0.0)
        wt = tl.load(w_ptr + tok[None, :] * K + rk[:, None], mask=m_kt, other=0.0)
        dob = tl.load(do_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        # Vn_j feeds the outputs i >= j of its chunk and, through the state update, the leaving state.
        decay_t = tl.exp(tl.where(rc[:, None] <= rc[None, :], G[None, :] - G[:, None], float("-inf")))
        scores_t = dot(kb, qt, PREC, UPCAST) * decay_t * scale  # [j, i] = k_j . q_i exp(G_i - G_j)
        kd = (kb * tl.exp(G_last - G)[:, None]).to(kb.dtype)
        dvn = (dot(scores_t.to(dob.dtype), dob, PREC, UPCAST)
               + dot(kd, dstate.to(kd.dtype), PREC, UPCAST))
        tl.store(dvn_ptr + tok[:, None] * V + rv[None, :], dvn, mask=m_tv)
        # The entering state is read by the outputs (exp(G_i) q_i) and by Vn = U - W S.
        qt = (qt * (tl.exp(G) * scale)[None, :]).to(dob.dtype)
        dstate = (dstate * tl.exp(G_last) + dot(qt, dob, PREC, UPCAST)
                  - dot(wt, dvn.to(wt.dtype), PREC, UPCAST))
    tl.store(dh0_ptr + nh.to(tl.int64) * K * V + kv_off, dstate, mask=m_kv)


@triton.jit
def _wy_backward_kernel(k_ptr, v_ptr, b_ptr, g_ptr, h_ptr, vn_ptr, dvn_ptr, dk_ptr, dv_ptr, db_ptr, dg_ptr,
                        chunk_start_ptr, chunk_len_ptr, H, K, V, C: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, DECAY: tl.constexpr, NEED_DG: tl.constexpr, PREC: tl.constexpr,
                        UPCAST: tl.constexpr):
    chunk, h = tl.program_id(0), tl.program_id(1)
    t0, L = tl.load(chunk_start_ptr + chunk), tl.load(chunk_len_ptr + chunk)
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    tok = (t0 + rc).to(tl.int64) * H + h
    h_base = h_ptr + (chunk.to(tl.int64) * H + h) * K * V
    G = chunk_log_decay(g_ptr, t0, L, h, H, C, DECAY)
    kb, kt, beta = _load_chunk_keys(k_ptr, b_ptr, tok, L, K, C, BK)
    kb, kt = kb.to(tl.float32), kt.to(tl.float32)
    strict, strict_t = rc[:, None] > rc[None, :], rc[:, None] < rc[None, :]
    E = tl.exp(tl.where(strict, G[:, None] - G[None, :], float("-inf")))  # [i, j] = exp(G_i - G_j), j < i
    E_t = tl.exp(tl.where(strict_t, G[None, :] - G[:, None], float("-inf")))  # the same, transposed
    kk = dot(kb, kt, PREC, UPCAST)  # symmetric
    A = kk * E * beta[:, None]
    T, T_t = _inverse(A, C)

    # (I + A) Vn = R: dR = T^T dVn and dA = -dR Vn^T (strictly lower), built in both orientations.
    dA = tl.zeros([C, C], dtype=tl.float32)
    dA_t = tl.zeros([C, C], dtype=tl.float32)
    dRS = tl.zeros([C, BK], dtype=tl.float32)  # dR S^T
    dbeta = tl.zeros([C], dtype=tl.float32)
    for iv in range(tl.cdiv(V, BV)):
        rv = iv * BV + tl.arange(0, BV)
        m_tv, m_vt = (rc[:, None] < L) & (rv[None, :] < V), (rv[:, None] < V) & (rc[None, :] < L)
        dvn = tl.load(dvn_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0)
        dvn_t = tl.load(dvn_ptr + tok[None, :] * V + rv[:, None], mask=m_vt, other=0.0)
        vn = tl.load(vn_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0).to(tl.float32)
        vn_t = tl.load(vn_ptr + tok[None, :] * V + rv[:, None], mask=m_vt, other=0.0).to(tl.float32)
        s_t = tl.load(h_base + rk[None, :] * V + rv[:, None], mask=(rv[:, None] < V) & (rk[None, :] < K),
                      other=0.0).to(tl.float32)
        vb = tl.load(v_ptr + tok[:, None] * V + rv[None, :], mask=m_tv, other=0.0).to(tl.float32)
        dR = dot(T_t, dvn, PREC, UPCAST)
        dR_t = dot(dvn_t, T, PREC, UPCAST)
        dA -= dot(dR, vn_t, PREC, UPCAST)
        dA_t -= dot(vn, dR_t, PREC, UPCAST)
        dRS += dot(dR, s_t, PREC, UPCAST)
        tl.store(dv_ptr + tok[:, None] * V + rv[None, :], (dR * beta[:, None]).to(dv_ptr.dtype.element_ty),
                 mask=m_tv)
        dbeta += tl.sum(dR * vb, 1)

    # R = diag(b) (V - diag(exp G) K S)
    eG = tl.exp(G)
    k_dRS = tl.sum(kb * dRS, 1)
    dk = -dRS * (beta * eG)[:, None]
    dbeta -= eG * k_dRS
    # A_ij = b_i exp(G_i - G_j) k_i.k_j: k_i enters as row and as column; E and E_t are 0 off the strict triangle.
    dk += dot(dA * E * beta[:, None], kb, PREC, UPCAST) + dot(dA_t * E_t * beta[None, :], kb, PREC, UPCAST)
    dbeta += tl.sum(dA * E * kk, 1)
    m_tk = (rc[:, None] < L) & (rk[None, :] < K)
    tl.store(dk_ptr + tok[:, None] * K + rk[None, :], dk, mask=m_tk)
    tl.store(db_ptr + tok, dbeta, mask=rc < L)
    if NEED_DG:
        # dL/dG_i (the running sum) from A (through G_i - G_j) and from R; then dg_t = sum_{i >= t} dL/dG_i.
        P = dA * A
        dG = tl.sum(P, 1) - tl.sum(P, 0) - beta * eG * k_dRS
        tl.store(dg_ptr + tok, tl.cumsum(dG, 0, reverse=True), mask=rc < L)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _meta(lay: ChunkLayout, **launch) -> dict:
    """Launch constants of this module's kernels: BK spans the whole head dimension. The walks and the
    WY backward hold several C x K tiles per step (float32 ones too, as the gdn layer passes float32
    q, k), so they run one pipeline stage: buffering those tiles three times over would need more
    than a Hopper SM's 227 KB of shared memory at C = 64, K = 128 (chosen from the tile sizes, not
    yet measured on a GPU)."""
    return {**lay.meta(), "BK": max(16, triton.next_power_of_2(lay.K)), **launch}


def _chunk_states(kf, vf, b, g, h0, lay: ChunkLayout):
    """W, U per chunk, then the walk: states entering each chunk, Vn, final states."""
    tables, dtype = lay.tables, kf.dtype
    w = alloc(kf.shape, lay.state_dtype, kf.device)
    u = alloc(vf.shape, lay.state_dtype, kf.device)
    h = alloc((lay.chunks, lay.H, lay.K, lay.V), lay.state_dtype, kf.device)
    vn = alloc(vf.shape, dtype, kf.device)
    ht = alloc((lay.docs, lay.H, lay.K, lay.V), torch.float32, kf.device)
    if lay.chunks > 0:
        _wy_kernel[(lay.chunks, lay.H)](kf, vf, b, g, w, u, tables["chunk_start"], tables["chunk_len"], **_meta(lay))
    if lay.docs * lay.H > 0:
        _delta_states_kernel[(lay.NV, lay.docs * lay.H)](
            kf, w, u, g, h0 if h0 is not None else ht, h, vn, ht, tables["cu"], tables["chunk_off"],
            HAS_H0=h0 is not None, **_meta(lay, num_stages=1))
    return w, h, vn, ht


def _prepare(q, k, v, beta, log_decay, cu_seqlens, chunk_size):
    lay = ChunkLayout(q, v, log_decay, cu_seqlens, chunk_size)
    qf, kf, vf = lay.flat(q), lay.flat(k), lay.flat(v)
    b = beta.reshape(-1).contiguous()
    g = log_decay.reshape(-1).contiguous() if log_decay is not None else b  # b: never read when DECAY=0
    return lay, qf, kf, vf, b, g


def _forward(q, k, v, beta, log_decay, initial_state, cu_seqlens, scale, chunk_size):
    lay, qf, kf, vf, b, g = _prepare(q, k, v, beta, log_decay, cu_seqlens, chunk_size)
    _, h, vn, ht = _chunk_states(kf, vf, b, g, initial_state, lay)
    o = alloc(vf.shape, q.dtype, q.device)
    if lay.chunks > 0:  # linear attention's output kernel, on the corrected values Vn
        output_kernel[(lay.NV, lay.chunks, lay.H)](
            qf, kf, vn, g, h, o, lay.tables["chunk_start"], lay.tables["chunk_len"], scale, **lay.meta())
    return o.view(lay.B, lay.T, lay.H, lay.V), ht


def _backward(q, k, v, beta, log_decay, initial_state, cu_seqlens, do, dht, scale, chunk_size, need_dg):
    lay, qf, kf, vf, b, g = _prepare(q, k, v, beta, log_decay, cu_seqlens, chunk_size)
    dof = lay.flat(do)
    w, h, vn, _ = _chunk_states(kf, vf, b, g, initial_state, lay)  # recomputed, as fla does
    tables, TT = lay.tables, lay.B * lay.T
    dh = alloc(h.shape, lay.state_dtype, q.device)
    dvn = alloc(vf.shape, torch.float32, q.device)
    dh0 = alloc((lay.docs, lay.H, lay.K, lay.V), torch.float32, q.device)
    dq, dk = alloc(qf.shape, q.dtype, q.device), alloc(kf.shape, k.dtype, q.device)
    dk_wy, dv = alloc(kf.shape, torch.float32, q.device), alloc(vf.shape, v.dtype, q.device)
    dbeta = alloc(b.shape, torch.float32, q.device)
    dg = alloc((lay.NK, TT, lay.H), torch.float32, q.device) if need_dg else dbeta  # per K block
    dg_wy = alloc((TT, lay.H), torch.float32, q.device) if need_dg else dbeta
    if lay.docs * lay.H > 0:
        _delta_dstates_kernel[(lay.NV, lay.docs * lay.H)](
            qf, kf, w, dof, g, dht.float().contiguous(), dh, dvn, dh0, tables["cu"], tables["chunk_off"], scale,
            **_meta(lay, num_stages=1))
    if lay.chunks > 0:
        dqdk_kernel[(lay.NK, lay.chunks, lay.H)](
            qf, kf, vn, dof, g, h, dh, dq, dk, dg, tables["chunk_start"], tables["chunk_len"], scale, TT,
            NEED_DG=need_dg, **lay.dqdk_meta())
        _wy_backward_kernel[(lay.chunks, lay.H)](
            kf, vf, b, g, h, vn, dvn, dk_wy, dv, dbeta, dg_wy, tables["chunk_start"], tables["chunk_len"],
            NEED_DG=need_dg, **_meta(lay, num_stages=1, num_warps=8))
    dk = (dk.float() + dk_wy).to(k.dtype)
    dg = (dg.sum(0) + dg_wy).view(lay.B, lay.T, lay.H) if need_dg else None
    shape = lambda x, d: x.view(lay.B, lay.T, lay.H, d)  # noqa: E731
    return shape(dq, lay.K), shape(dk, lay.K), shape(dv, lay.V), dbeta.view(lay.B, lay.T, lay.H), dg, dh0


# ----------------------------------------------------------------------------------------------
# Custom ops (so torch.compile keeps them in one graph, as triton_chunk.py's) and their autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("supra::chunk_delta_rule_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor | None,
            initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, scale: float,
            chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, beta, log_decay, initial_state, cu_seqlens, scale, chunk_size)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, beta, log_decay, initial_state, cu_seqlens, scale, chunk_size):
    B, T, H, K = q.shape
    docs = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(docs, H, K, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("supra::chunk_delta_rule_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, log_decay: torch.Tensor | None,
            initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor,
            scale: float, chunk_size: int, need_dg: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dbeta, dg, dh0 = _backward(q, k, v, beta, log_decay, initial_state, cu_seqlens, do, dht, scale,
                                           chunk_size, need_dg)
    return dq, dk, dv, dbeta, (dg if need_dg else q.new_empty(0, dtype=torch.float32)), dh0


@_bwd_op.register_fake
def _bwd_fake(q, k, v, beta, log_decay, initial_state, cu_seqlens, do, dht, scale, chunk_size, need_dg):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta),
            q.new_empty(beta.shape if need_dg else (0,), dtype=torch.float32),
            torch.empty_like(dht, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, beta, log_decay, initial_state, cu_seqlens, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, beta, log_decay, initial_state, cu_seqlens)
    ctx.scale, ctx.chunk_size = scale, chunk_size


def _backward_rule(ctx, do, dht):
    q, k, v, beta, log_decay, initial_state, cu_seqlens = ctx.saved_tensors
    need_dg = log_decay is not None and ctx.needs_input_grad[4]
    if do is None:
        do = torch.zeros_like(v)
    if dht is None:
        docs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        dht = q.new_zeros(docs, q.shape[2], q.shape[3], v.shape[-1], dtype=torch.float32)
    dq, dk, dv, dbeta, dg, dh0 = _bwd_op(q, k, v, beta, log_decay, initial_state, cu_seqlens, do.contiguous(),
                                         dht.contiguous(), ctx.scale, ctx.chunk_size, need_dg)
    if need_dg and log_decay.dim() == 1:
        dg = dg.sum((0, 1))  # a per-head decay is shared by every token
    return (dq, dk, dv, dbeta, dg if need_dg else None, dh0 if initial_state is not None else None,
            None, None, None)


torch.library.register_autograd("supra::chunk_delta_rule_fwd", _backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def triton_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule through the Triton kernels; contract of `delta_rule.py` (see above).

    With `cu_seqlens` the boundaries are read on the host (one sync) to size the launch grid.
    """
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"q, k must be (B, T, H, K), v (B, T, H, V) and beta (B, T, H); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed row, got batch size {B}")
    if log_decay is not None and log_decay.shape not in ((H,), (B, T, H)):
        raise ValueError(f"log_decay must be (H,)={H,} or (B, T, H)={B, T, H}; got {tuple(log_decay.shape)}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 (tl.dot tiles), got {chunk_size}")
    if K > MAX_K:
        raise ValueError(f"the Triton delta rule holds all of K in one block: K <= {MAX_K}, got {K}")
    check_dtypes("delta_rule", q, k, v)
    out_dtype = q.dtype
    if not (q.dtype == k.dtype == v.dtype):  # as the torch form, which computes in float32
        q, k, v = q.float(), k.float(), v.float()
    scale = K**-0.5 if scale is None else float(scale)
    o, final = _fwd_op(
        q.contiguous(), k.contiguous(), v.contiguous(), beta.float().contiguous(),
        None if log_decay is None else log_decay.float().contiguous(),
        None if initial_state is None else initial_state.float().contiguous(), cu_seqlens, scale, chunk_size)
    return o.to(out_dtype), (final if output_final_state else None)
