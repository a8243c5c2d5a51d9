"""Triton LoLCATs hybrid attention, forward and backward, as a torch custom op.

Same contract as `hybrid.window_hybrid_attention` for the stateless call (training, prefill): q, k
(B, T, H, D) after RoPE, v (B, T, H, V), features fq, fk (B, T, H, F), window_gate g (H,). Per query n
and key j, with s_nj = q_n.k_j / sqrt(D) and c_n the largest s_nj over soft(n):

    w_nj = g exp(s_nj - c_n) [j in soft(n)]  +  fq_n.fk_j [j in old(n)]
    y_n  = sum_j w_nj v_j / z_n,   z_n = sum_j w_nj           (one shared denominator)
    soft(n) = {first(n) <= j <= n} + {j < S, j <= n},   old(n) = {S <= j < first(n)}
    first(n) = n - W + 1 (sliding window),  or  W (floor(n / W) - 1) (terrace)

with S sinks (the sequence's first S tokens, `hybrid.py`).

Chunks of C >= W tokens, C >= 2W for the terrace (like fla's chunked kernels). Query chunk i meets the
keys of chunks i-1 and i as masked tiles (the window part, and the linear part for those already older
than the window); every key before chunk i-1 is older than the window (n - j > C), so it enters only
through the linear state hs[i] = sum_{j < (i-1)C} fk_j [v_j, 1] (F x V numerator, F denominator).
A program holds BR rows of a chunk (queries; keys in _dkv_kernel) and steps over the other side BK at a
time (`_HybridLayout`: 64 rows, 32 at D = 128, and 32 keys, so that a bf16 model's launches spill little).
c_n is exact, not an online running max: a first pass over the key blocks finds it before any exp. With
sinks, a tile of its own holds keys 0..S-1 for the queries they have left the window of (a sink inside
the window counts there, once); sinks never enter the linear state.

Kernels (grids in brackets; NF, NV count the F and V blocks of a state; P = chunks x C / BR programs):
  _states_kernel   [NF, NV, B*H]  walk the chunks in order, store hs[i] for every query chunk.
  _forward_kernel  [P, B*H]      y, and per query c_n and z_n, kept for the backward.
  _dstates_kernel  [NF, NV, B*H]  walk backwards: dhs[c] = dL/d(sum over key chunk c of fk [v, 1]),
                                   fed by the queries of chunks >= c + 2.
  _dq_kernel       [P, B*H]      dq, dfq, the gate's gradient per program, and per query dL/dc_n with
                                   the key that holds the max.
  _dsinks_kernel   [B*H]          with sinks: dk, dv of the sink tile, over every query chunk.
  _dkv_kernel      [P, B*H, 1 | NV]  dk, dv, dfk: keys of chunk c against query chunks c and c + 1, plus
                                   dhs[c] (and the sink tile's share for the first S keys); launched twice,
                                   for dk and dfk, then for dv per block of V (shared memory at D = 128).

Backward: with do' = do_n / z_n and delta_n = do_n.y_n / z_n, dL/dw_nj = do'_n.v_j - delta_n. c_n is no
normaliser here (the linear part does not share it), so it has a gradient of its own,
dL/dc_n = -sum_soft(n) dL/dw_nj g exp(s_nj - c_n), which reaches q_n and the key holding the max (torch's
amax splits it evenly between tied keys; here the first of them takes it, also a valid subgradient).
The backward recomputes the states and the score tiles instead of keeping them (memory).

States are float32 (the Hedgehog features are float32 even under bf16 autocast). As in
`triton_chunk.py`, no `tl.trans` inside `tl.dot`: a transposed operand is loaded transposed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .hybrid import HybridState, take_sinks
from .reference import state_dtype
from .triton_common import alloc, check_dtypes, dot_precision, interpreter_upcast
from .triton_common import dot as _dot

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows(ptr, b, t, h, T, H, cols, D):
    """Tile (tokens t, columns cols) of row b, head h of a (B, T, H, D) tensor; 0 outside the tensor."""
    tok = (b * T + t).to(tl.int64) * H + h
    mask = ((t >= 0) & (t < T))[:, None] & (cols[None, :] < D)
    return tl.load(ptr + tok[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _cols(ptr, b, t, h, T, H, cols, D):
    """The same tile transposed, (columns cols, tokens t), loaded through its pointers."""
    tok = (b * T + t).to(tl.int64) * H + h
    mask = (cols[:, None] < D) & ((t >= 0) & (t < T))[None, :]
    return tl.load(ptr + tok[None, :] * D + cols[:, None], mask=mask, other=0.0)


@triton.jit
def _per_token(ptr, b, t, h, T, H, other):
    """A (B, T, H) per-token value for tokens t."""
    return tl.load(ptr + (b * T + t).to(tl.int64) * H + h, mask=(t >= 0) & (t < T), other=other)


@triton.jit
def _first(n, W, TERRACE: tl.constexpr):
    """The oldest key in query n's window: n - W + 1, or the start of the previous block (terrace)."""
    first = n - W + 1
    if TERRACE:
        first = (n // W - 1) * W
    return first


@triton.jit
def _masks(n, j, T, W, S, TERRACE: tl.constexpr):
    """(window, older) for queries n against keys j (global token indices, broadcast by the caller);
    a sink (j < S) is never older: it is softmax in the window, and in the sink tile past it."""
    live = (n < T) & (j >= 0)
    first = _first(n, W, TERRACE)
    return live & (j <= n) & (j >= first), live & (j < first) & (j >= S)


@triton.jit
def _sink_mask(n, j, T, W, S, TERRACE: tl.constexpr):
    """The sink tile: sinks j < S that have left query n's window (inside it they count there, once)."""
    return (n < T) & (j < S) & (j < _first(n, W, TERRACE))


@triton.jit
def _states_kernel(fk_ptr, v_ptr, hs_ptr, hden_ptr, T, H, F, V, NC, S,
                   C: tl.constexpr, BK: tl.constexpr, BFS: tl.constexpr, BVS: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    jf, jv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rf, rv = jf * BFS + tl.arange(0, BFS), jv * BVS + tl.arange(0, BVS)
    m_fv = (rf[:, None] < F) & (rv[None, :] < V)
    acc = tl.zeros([BFS, BVS], dtype=tl.float32)
    acc_den = tl.zeros([BFS], dtype=tl.float32)
    for i in range(NC):
        base = bh.to(tl.int64) * NC + i
        tl.store(hs_ptr + base * F * V + rf[:, None] * V + rv[None, :], acc, mask=m_fv)
        if jv == 0:
            tl.store(hden_ptr + base * F + rf, acc_den, mask=rf < F)
        for j0 in range(tl.maximum(i - 1, 0) * C, i * C, BK):  # query chunk i + 1 reads what chunk i - 1 adds
            j = j0 + tl.arange(0, BK)
            fkt = _cols(fk_ptr, b, tl.where(j >= S, j, -1), h, T, H, rf, F)  # sinks stay out of the state
            vb = _rows(v_ptr, b, j, h, T, H, rv, V)
            acc += _dot(fkt, vb.to(fkt.dtype), PREC, UPCAST)
            acc_den += tl.sum(fkt.to(tl.float32), 1)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, fq_ptr, fk_ptr, gate_ptr, hs_ptr, hden_ptr, o_ptr, m_ptr, z_ptr,
                    scale, T, H, D, F, V, W, NC, S: tl.constexpr, BS: tl.constexpr, TERRACE: tl.constexpr,
                    C: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                    BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    p, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rd, rf, rv = tl.arange(0, BD), tl.arange(0, BF), tl.arange(0, BV)
    n = p * BR + tl.arange(0, BR)  # BR queries of chunk i
    i = p * BR // C
    lo, hi = tl.maximum(i - 1, 0) * C, tl.minimum((p + 1) * BR, T)  # their keys not in the state hs[i]
    g = tl.load(gate_ptr + h).to(tl.float32)
    qb = _rows(q_ptr, b, n, h, T, H, rd, D)
    fqb = _rows(fq_ptr, b, n, h, T, H, rf, F)

    # A first pass over the key blocks finds c_n, the exact window max, before any exp.
    c = tl.full([BR], float("-inf"), dtype=tl.float32)
    if S > 0:  # the sinks that have left the window: a tile of their own, in the same max
        js = tl.arange(0, BS)
        sink = _sink_mask(n[:, None], js[None, :], T, W, S, TERRACE)
        ss = _dot(qb, _cols(k_ptr, b, js, h, T, H, rd, D), PREC, UPCAST) * scale
        c = tl.maximum(c, tl.max(tl.where(sink, ss, float("-inf")), 1))
    for j0 in range(lo, hi, BK):
        j = j0 + tl.arange(0, BK)
        s = _dot(qb, _cols(k_ptr, b, j, h, T, H, rd, D), PREC, UPCAST) * scale
        window, _ = _masks(n[:, None], j[None, :], T, W, S, TERRACE)
        c = tl.maximum(c, tl.max(tl.where(window, s, float("-inf")), 1))
    c = tl.where(n < T, c, 0.0)  # rows past T see no key

    # The second pass recomputes the scores (cheaper than keeping a row of them live) and sums the weights.
    num = tl.zeros([BR, BV], dtype=tl.float32)
    den = tl.zeros([BR], dtype=tl.float32)
    for j0 in range(lo, hi, BK):
        j = j0 + tl.arange(0, BK)
        s = _dot(qb, _cols(k_ptr, b, j, h, T, H, rd, D), PREC, UPCAST) * scale
        window, older = _masks(n[:, None], j[None, :], T, W, S, TERRACE)
        w = g * tl.exp(tl.where(window, s - c[:, None], float("-inf")))
        w += tl.where(older, _dot(fqb, _cols(fk_ptr, b, j, h, T, H, rf, F), PREC, UPCAST), 0.0)
        vb = _rows(v_ptr, b, j, h, T, H, rv, V)
        num += _dot(w.to(vb.dtype), vb, PREC, UPCAST)
        den += tl.sum(w, 1)

    base = bh.to(tl.int64) * NC + i
    hs = tl.load(hs_ptr + base * F * V + rf[:, None] * V + rv[None, :], mask=(rf[:, None] < F) & (rv[None, :] < V),
                 other=0.0)
    hden = tl.load(hden_ptr + base * F + rf, mask=rf < F, other=0.0)
    num += _dot(fqb, hs.to(fqb.dtype), PREC, UPCAST)
    den += tl.sum(fqb.to(tl.float32) * hden[None, :], 1)
    if S > 0:
        ws = g * tl.exp(tl.where(sink, ss - c[:, None], float("-inf")))
        vs = _rows(v_ptr, b, js, h, T, H, rv, V)
        num += _dot(ws.to(vs.dtype), vs, PREC, UPCAST)
        den += tl.sum(ws, 1)
    den = tl.where(n < T, den, 1.0)

    tok = (b * T + n).to(tl.int64) * H + h
    live = n < T
    tl.store(o_ptr + tok[:, None] * V + rv[None, :], (num / den[:, None]).to(o_ptr.dtype.element_ty),
             mask=live[:, None] & (rv[None, :] < V))
    tl.store(m_ptr + tok, c, mask=live)
    tl.store(z_ptr + tok, den, mask=live)


@triton.jit
def _dstates_kernel(fq_ptr, do_ptr, z_ptr, delta_ptr, dhs_ptr, dhden_ptr, T, H, F, V, NC,
                    C: tl.constexpr, BK: tl.constexpr, BFS: tl.constexpr, BVS: tl.constexpr, PREC: tl.constexpr,
                    UPCAST: tl.constexpr):
    jf, jv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rf, rv = jf * BFS + tl.arange(0, BFS), jv * BVS + tl.arange(0, BVS)
    m_fv = (rf[:, None] < F) & (rv[None, :] < V)
    acc = tl.zeros([BFS, BVS], dtype=tl.float32)
    acc_den = tl.zeros([BFS], dtype=tl.float32)
    for r in range(NC):
        i = NC - 1 - r
        base = bh.to(tl.int64) * NC + i
        tl.store(dhs_ptr + base * F * V + rf[:, None] * V + rv[None, :], acc, mask=m_fv)
        if jv == 0:
            tl.store(dhden_ptr + base * F + rf, acc_den, mask=rf < F)
        for n0 in range((i + 1) * C, tl.minimum((i + 2) * C, T), BK):  # key chunk i - 1 is first read by query
            n = n0 + tl.arange(0, BK)  # chunk i + 1
            fqt = _cols(fq_ptr, b, n, h, T, H, rf, F)
            z = _per_token(z_ptr, b, n, h, T, H, 1.0)
            dos = _rows(do_ptr, b, n, h, T, H, rv, V).to(tl.float32) / z[:, None]
            acc += _dot(fqt, dos.to(fqt.dtype), PREC, UPCAST)
            acc_den -= tl.sum(fqt.to(tl.float32) * _per_token(delta_ptr, b, n, h, T, H, 0.0)[None, :], 1)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, fq_ptr, fk_ptr, gate_ptr, hs_ptr, hden_ptr, m_ptr, z_ptr, delta_ptr,
               do_ptr, dq_ptr, dfq_ptr, dc_ptr, amax_ptr, dg_ptr,
               scale, T, H, D, F, V, W, NC, S: tl.constexpr, BS: tl.constexpr, TERRACE: tl.constexpr,
               C: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
               BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    p, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rd, rf, rv = tl.arange(0, BD), tl.arange(0, BF), tl.arange(0, BV)
    n = p * BR + tl.arange(0, BR)  # BR queries of chunk i, as in _forward_kernel
    i = p * BR // C
    lo, hi = tl.maximum(i - 1, 0) * C, tl.minimum((p + 1) * BR, T)
    g = tl.load(gate_ptr + h).to(tl.float32)
    qb = _rows(q_ptr, b, n, h, T, H, rd, D)
    fqb = _rows(fq_ptr, b, n, h, T, H, rf, F)
    c = _per_token(m_ptr, b, n, h, T, H, 0.0)
    delta = _per_token(delta_ptr, b, n, h, T, H, 0.0)
    dos = _rows(do_ptr, b, n, h, T, H, rv, V).to(tl.float32) / _per_token(z_ptr, b, n, h, T, H, 1.0)[:, None]

    # The state's share first: dos in float32 (a tf32 operand beside the float32 state) is then dead in the loop.
    base = bh.to(tl.int64) * NC + i
    hst = tl.load(hs_ptr + base * F * V + rf[None, :] * V + rv[:, None], mask=(rv[:, None] < V) & (rf[None, :] < F),
                  other=0.0)
    hden = tl.load(hden_ptr + base * F + rf, mask=rf < F, other=0.0)
    dfq = _dot(dos.to(fqb.dtype), hst.to(fqb.dtype), PREC, UPCAST) - delta[:, None] * hden[None, :]
    dos = dos.to(v_ptr.dtype.element_ty)
    dq = tl.zeros([BR, BD], dtype=tl.float32)
    dc = tl.zeros([BR], dtype=tl.float32)
    dg = tl.zeros([BR], dtype=tl.float32)
    best = tl.full([BR], float("-inf"), dtype=tl.float32)
    amax = tl.full([BR], -1, dtype=tl.int32)
    if S > 0:  # the sinks past the window first: the lowest keys, so they take a tied max
        js = tl.arange(0, BS)
        sink = _sink_mask(n[:, None], js[None, :], T, W, S, TERRACE)
        ss = _dot(qb, _cols(k_ptr, b, js, h, T, H, rd, D), PREC, UPCAST) * scale  # names of their own: a tile
        es = tl.exp(tl.where(sink, ss - c[:, None], float("-inf")))  # of another shape than the loop's
        vst = _cols(v_ptr, b, js, h, T, H, rv, V)
        dws = _dot(dos, vst, PREC, UPCAST) - delta[:, None]
        dpws = dws * g * es
        ks = _rows(k_ptr, b, js, h, T, H, rd, D)
        dq += _dot(dpws.to(ks.dtype), ks, PREC, UPCAST)
        dc -= tl.sum(dpws, 1)
        dg += tl.sum(dws * es, 1)
        masked_s = tl.where(sink, ss, float("-inf"))
        best = tl.max(masked_s, 1)
        amax = tl.where(best > float("-inf"), tl.argmax(masked_s, 1, tie_break_left=True).to(tl.int32), amax)
    for j0 in range(lo, hi, BK):  # key blocks in order, so that the first of tied keys takes the max
        j = j0 + tl.arange(0, BK)
        s = _dot(qb, _cols(k_ptr, b, j, h, T, H, rd, D), PREC, UPCAST) * scale
        window, older = _masks(n[:, None], j[None, :], T, W, S, TERRACE)
        e = tl.exp(tl.where(window, s - c[:, None], float("-inf")))
        vt = _cols(v_ptr, b, j, h, T, H, rv, V)
        dw = _dot(dos, vt, PREC, UPCAST) - delta[:, None]
        dpw = dw * g * e
        kb = _rows(k_ptr, b, j, h, T, H, rd, D)
        fkb = _rows(fk_ptr, b, j, h, T, H, rf, F)
        dq += _dot(dpw.to(kb.dtype), kb, PREC, UPCAST)
        dfq += _dot(tl.where(older, dw, 0.0).to(fkb.dtype), fkb, PREC, UPCAST)
        dc -= tl.sum(dpw, 1)
        dg += tl.sum(dw * e, 1)
        # The key holding the max: strict > keeps the first of tied keys.
        masked = tl.where(window, s, float("-inf"))
        tile_best = tl.max(masked, 1)
        tile_arg = j0 + tl.argmax(masked, 1, tie_break_left=True).to(tl.int32)
        amax = tl.where(tile_best > best, tile_arg, amax)
        best = tl.maximum(best, tile_best)
    live = n < T
    dq += dc[:, None] * _rows(k_ptr, b, amax, h, T, H, rd, D).to(tl.float32)


    tok = (b * T + n).to(tl.int64) * H + h
    tl.store(dq_ptr + tok[:, None] * D + rd[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=live[:, None] & (rd[None, :] < D))
    tl.store(dfq_ptr + tok[:, None] * F + rf[None, :], dfq.to(dfq_ptr.dtype.element_ty),
             mask=live[:, None] & (rf[None, :] < F))
    tl.store(dc_ptr + tok, dc, mask=live)
    tl.store(amax_ptr + tok, amax, mask=live)
    tl.store(dg_ptr + bh.to(tl.int64) * tl.num_programs(0) + p, tl.sum(tl.where(live, dg, 0.0), 0))


@triton.jit
def _dsinks_kernel(q_ptr, k_ptr, v_ptr, gate_ptr, m_ptr, z_ptr, delta_ptr, do_ptr, dc_ptr, amax_ptr, dks_ptr,
                   dvs_ptr, scale, T, H, D, V, W, S: tl.constexpr, BS: tl.constexpr, TERRACE: tl.constexpr,
                   BK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rd, rv = tl.arange(0, BD), tl.arange(0, BV)
    j = tl.arange(0, BS)
    g = tl.load(gate_ptr + h).to(tl.float32)
    kb = _rows(k_ptr, b, j, h, T, H, rd, D)
    vb = _rows(v_ptr, b, j, h, T, H, rv, V)
    dk = tl.zeros([BS, BD], dtype=tl.float32)
    dv = tl.zeros([BS, BV], dtype=tl.float32)
    for n0 in range(W // BK * BK, T, BK):  # [key, query] tiles; a sink leaves the window at query W at the earliest
        n = n0 + tl.arange(0, BK)
        c = _per_token(m_ptr, b, n, h, T, H, 0.0)
        z = _per_token(z_ptr, b, n, h, T, H, 1.0)
        delta = _per_token(delta_ptr, b, n, h, T, H, 0.0)
        sink = _sink_mask(n[None, :], j[:, None], T, W, S, TERRACE)
        s = _dot(kb, _cols(q_ptr, b, n, h, T, H, rd, D), PREC, UPCAST) * scale
        e = tl.exp(tl.where(sink, s - c[None, :], float("-inf")))
        dos = _rows(do_ptr, b, n, h, T, H, rv, V).to(tl.float32) / z[:, None]
        dos_t = _cols(do_ptr, b, n, h, T, H, rv, V).to(tl.float32) / z[None, :]
        dv += _dot((g * e).to(vb.dtype), dos.to(vb.dtype), PREC, UPCAST)
        dw = _dot(vb, dos_t.to(vb.dtype), PREC, UPCAST) - delta[None, :]
        holds_max = sink & (j[:, None] == _per_token(amax_ptr, b, n, h, T, H, -1)[None, :])
        ds = dw * g * e + tl.where(holds_max, _per_token(dc_ptr, b, n, h, T, H, 0.0)[None, :], 0.0)
        qb = _rows(q_ptr, b, n, h, T, H, rd, D)
        dk += _dot(ds.to(qb.dtype), qb, PREC, UPCAST)
    base = bh.to(tl.int64) * BS + j
    tl.store(dks_ptr + base[:, None] * BD + rd[None, :], dk)
    tl.store(dvs_ptr + base[:, None] * BV + rv[None, :], dv)


@triton.jit
def _dkv_kernel(q_ptr, k_ptr, v_ptr, fq_ptr, fk_ptr, gate_ptr, dhs_ptr, dhden_ptr, m_ptr, z_ptr, delta_ptr,
                do_ptr, dc_ptr, amax_ptr, dks_ptr, dvs_ptr, dk_ptr, dv_ptr, dfk_ptr,
                scale, T, H, D, F, V, W, NC, dvs_row, S: tl.constexpr, BS: tl.constexpr, TERRACE: tl.constexpr,
                C: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, DV: tl.constexpr):
    p, bh, jv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rd, rf, rv = tl.arange(0, BD), tl.arange(0, BF), jv * BV + tl.arange(0, BV)
    j = p * BR + tl.arange(0, BR)  # BR keys of chunk i
    i = p * BR // C
    g = tl.load(gate_ptr + h).to(tl.float32)
    kb = _rows(k_ptr, b, j, h, T, H, rd, D)
    fkb = _rows(fk_ptr, b, j, h, T, H, rf, F)
    vb = _rows(v_ptr, b, j, h, T, H, rv, V)

    # Tiles are transposed, [key, query]: these keys are "this chunk" for query chunk i, "previous" for i + 1;
    # later queries see them through the state (dhs[i], below). Query blocks from the first key on (causal).
    # DV: this launch computes dv, columns rv of it (BV is a block of V, axis 2 of the grid); otherwise dk and
    # dfk, with all of V (dw sums over it). One program doing all three held more C x D tiles than an H100's
    # shared memory at D = 128, C = 128; each half recomputes the scores s instead. The dv half with all of
    # V still needed 256 KB on sm_90 in a float32 model (tf32x3 operands); a block of 64 columns fits, at
    # the price of recomputing s and the linear scores once per block (scripts/compile_sweep.py).
    dk = tl.zeros([BR, BD], dtype=tl.float32)
    dv = tl.zeros([BR, BV], dtype=tl.float32)
    dfk = tl.zeros([BR, BF], dtype=tl.float32)
    for n0 in range(p * BR, tl.minimum((i + 2) * C, T), BK):
        n = n0 + tl.arange(0, BK)
        c = _per_token(m_ptr, b, n, h, T, H, 0.0)
        z = _per_token(z_ptr, b, n, h, T, H, 1.0)
        window, older = _masks(n[None, :], j[:, None], T, W, S, TERRACE)
        s = _dot(kb, _cols(q_ptr, b, n, h, T, H, rd, D), PREC, UPCAST) * scale
        e = tl.exp(tl.where(window, s - c[None, :], float("-inf")))
        if DV:
            a = tl.where(older, _dot(fkb, _cols(fq_ptr, b, n, h, T, H, rf, F), PREC, UPCAST), 0.0)
            dos = _rows(do_ptr, b, n, h, T, H, rv, V).to(tl.float32) / z[:, None]
            dv += _dot((g * e + a).to(vb.dtype), dos.to(vb.dtype), PREC, UPCAST)
        else:
            delta = _per_token(delta_ptr, b, n, h, T, H, 0.0)
            dos_t = _cols(do_ptr, b, n, h, T, H, rv, V).to(tl.float32) / z[None, :]
            dw = _dot(vb, dos_t.to(vb.dtype), PREC, UPCAST) - delta[None, :]
            # A sink past the window may hold the max: the sink tile (_dsinks_kernel) passes it on, not this one.
            holds_max = window & (j[:, None] == _per_token(amax_ptr, b, n, h, T, H, -1)[None, :])
            ds = dw * g * e + tl.where(holds_max, _per_token(dc_ptr, b, n, h, T, H, 0.0)[None, :], 0.0)
            qb = _rows(q_ptr, b, n, h, T, H, rd, D)
            dk += _dot(ds.to(qb.dtype), qb, PREC, UPCAST)
            fqb = _rows(fq_ptr, b, n, h, T, H, rf, F)
            dfk += _dot(tl.where(older, dw, 0.0).to(fqb.dtype), fqb, PREC, UPCAST)

    # What the linear state carries to query chunks >= i + 2.
    base = bh.to(tl.int64) * NC + i
    in_state = (j >= S)[:, None]  # sinks never enter the state
    sink_row = (j < S)[:, None]
    live = j < T
    tok = (b * T + j).to(tl.int64) * H + h
    if DV:
        m_fv = (rf[:, None] < F) & (rv[None, :] < V)
        dhs = tl.load(dhs_ptr + base * F * V + rf[:, None] * V + rv[None, :], mask=m_fv, other=0.0)
        dv += _dot(tl.where(in_state, fkb, 0.0).to(fkb.dtype), dhs.to(fkb.dtype), PREC, UPCAST)
        if S > 0:  # what the sink tile gave the first S keys (float32, added before the one rounding)
            dv += tl.load(dvs_ptr + (bh.to(tl.int64) * BS + j[:, None]) * dvs_row + rv[None, :], mask=sink_row,
                          other=0.0)
        tl.store(dv_ptr + tok[:, None] * V + rv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=live[:, None] & (rv[None, :] < V))
    else:
        dhst = tl.load(dhs_ptr + base * F * V + rf[None, :] * V + rv[:, None],
                       mask=(rv[:, None] < V) & (rf[None, :] < F), other=0.0)
        dhden = tl.load(dhden_ptr + base * F + rf, mask=rf < F, other=0.0)
        dfk += tl.where(in_state, _dot(vb.to(fkb.dtype), dhst.to(fkb.dtype), PREC, UPCAST) + dhden[None, :], 0.0)
        if S > 0:
            dk += tl.load(dks_ptr + (bh.to(tl.int64) * BS + j[:, None]) * BD + rd[None, :], mask=sink_row, other=0.0)
        tl.store(dk_ptr + tok[:, None] * D + rd[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
                 mask=live[:, None] & (rd[None, :] < D))
        tl.store(dfk_ptr + tok[:, None] * F + rf[None, :], dfk.to(dfk_ptr.dtype.element_ty),
                 mask=live[:, None] & (rf[None, :] < F))


# ----------------------------------------------------------------------------------------------
# Host side: layout and launches
# ----------------------------------------------------------------------------------------------


class _HybridLayout:
    """Shapes, block sizes and launch options shared by the forward and backward: the one place where the
    kernels' tiles, warps and stages are chosen."""

    # Rows (queries; keys in _dkv_kernel) per program of the chunk kernels, and the block of keys (queries)
    # their loops, and the state walks, step by. Whole chunks with both key chunks scored at once (two C x C
    # float32 tiles beside C x D ones) spilled up to 88 KB in a bf16 model at C = 128 and took ptxas minutes
    # per kernel (scripts/compile_sweep.py --ptxas); so did the walks' BFS x C feature tiles.
    BLOCK, KEYS = 64, 32
    # Rows per program at head dims over 64 (D = 128): at 64 rows, bf16 _dq_kernel spilled 88-26,438 B on sm_80
    # (ptxas fell back to 32 registers on one launch) and _forward_kernel ~5.5 KB; at 32 rows, 0-500 B
    # (scripts/compile_sweep.py --ptxas-only). Four warps at 32 rows spilled more (364-1,392 B).
    WIDE_BLOCK = 32
    # The chunk kernels: eight warps halve each thread's share of the BLOCK x D accumulators and operands;
    # two stages prefetch the next key block (three needed 245 KB of shared memory at D = 128), except where
    # a row of the head dim's tiles takes STAGE_ROW_BYTES or more (float32 at D = 128): there two stages of
    # _dq_kernel needed 182,272 B on an A100 (163 KB) and 229,376 B of an H100's 227 KB, so one stage.
    CHUNK_WARPS, CHUNK_STAGES, STAGE_ROW_BYTES = 8, 2, 512

    def __init__(self, q: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, window: int, sinks: int, terrace: bool,
                 chunk_size: int) -> None:
        self.B, self.T, self.H, self.D = q.shape
        self.F, self.V, self.W, self.C = fq.shape[-1], v.shape[-1], window, chunk_size
        self.S, self.BS = sinks, max(16, triton.next_power_of_2(sinks))  # the sink tile's rows
        self.terrace = terrace
        self.NC = triton.cdiv(self.T, self.C)
        # Whole head dims per tile in the chunk kernels (the denominator needs all of F, the max all of D);
        # the state walks split F and V into blocks of at most 64, and so does the dv launch V. tl.dot needs >= 16.
        self.BD, self.BF, self.BV = (max(16, triton.next_power_of_2(x)) for x in (self.D, self.F, self.V))
        self.BFS, self.BVS = min(64, self.BF), min(64, self.BV)
        self.BR, self.BK = min(self.C, self.BLOCK if self.BD <= 64 else self.WIDE_BLOCK), min(self.C, self.KEYS)
        self.programs = self.NC * (self.C // self.BR)  # the chunk kernels' grid axis 0
        self.NF, self.NV = triton.cdiv(self.F, self.BFS), triton.cdiv(self.V, self.BVS)
        self.prec, self.upcast = dot_precision(q.dtype), interpreter_upcast(q.dtype)
        self.stages = self.CHUNK_STAGES if q.element_size() * self.BD < self.STAGE_ROW_BYTES else 1
        self.scale = self.D**-0.5

    def chunk_meta(self) -> dict:
        return {"H": self.H, "D": self.D, "F": self.F, "V": self.V, "W": self.W, "NC": self.NC, "S": self.S,
                "BS": self.BS, "TERRACE": self.terrace, "C": self.C, "BR": self.BR, "BK": self.BK, "BD": self.BD,
                "BF": self.BF, "BV": self.BV, "PREC": self.prec, "UPCAST": self.upcast, "num_warps": self.CHUNK_WARPS,
                "num_stages": self.stages}

    def sinks_meta(self) -> dict:
        """`_dsinks_kernel`'s launch. One pipeline stage: its loop loads four BK x D tiles a step, and with
        whole chunks (C x D) buffering them three deep needed 273 KB of shared memory at D = 128
        (scripts/compile_sweep.py), over an H100's 227 KB."""
        return {"H": self.H, "D": self.D, "V": self.V, "W": self.W, "S": self.S, "BS": self.BS,
                "TERRACE": self.terrace, "BK": self.BK, "BD": self.BD, "BV": self.BV, "PREC": self.prec,
                "UPCAST": self.upcast, "num_stages": 1}

    def walk_meta(self) -> dict:
        return {"H": self.H, "F": self.F, "V": self.V, "NC": self.NC, "C": self.C, "BK": self.BK, "BFS": self.BFS,
                "BVS": self.BVS, "PREC": self.prec, "UPCAST": self.upcast}

    def state_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        BH = self.B * self.H
        return (alloc((BH, self.NC, self.F, self.V), torch.float32, device),
                alloc((BH, self.NC, self.F), torch.float32, device))


def _states(fk: torch.Tensor, v: torch.Tensor, lay: _HybridLayout) -> tuple[torch.Tensor, torch.Tensor]:
    hs, hden = lay.state_buffers(fk.device)
    _states_kernel[(lay.NF, lay.NV, lay.B * lay.H)](fk, v, hs, hden, lay.T, S=lay.S, **lay.walk_meta())
    return hs, hden


def _forward(q, k, v, fq, fk, gate, window, sinks, terrace, chunk_size):
    lay = _HybridLayout(q, v, fq, window, sinks, terrace, chunk_size)
    hs, hden = _states(fk, v, lay)
    o = alloc(v.shape, q.dtype, q.device)
    m = alloc(q.shape[:3], torch.float32, q.device)
    z = alloc(q.shape[:3], torch.float32, q.device)
    _forward_kernel[(lay.programs, lay.B * lay.H)](q, k, v, fq, fk, gate, hs, hden, o, m, z, lay.scale, lay.T,
                                            **lay.chunk_meta())
    return o, m, z


def _backward(q, k, v, fq, fk, gate, o, m, z, do, window, sinks, terrace, chunk_size):
    lay = _HybridLayout(q, v, fq, window, sinks, terrace, chunk_size)
    BH, dev = lay.B * lay.H, q.device
    delta = (do.float() * o.float()).sum(-1) / z  # do_n.y_n / z_n (B, T, H)
    hs, hden = _states(fk, v, lay)  # recomputed: cheaper in memory than keeping them
    dhs, dhden = lay.state_buffers(dev)
    _dstates_kernel[(lay.NF, lay.NV, BH)](fq, do, z, delta, dhs, dhden, lay.T, **lay.walk_meta())

    dq, dfq = alloc(q.shape, q.dtype, dev), alloc(fq.shape, fq.dtype, dev)
    dc = alloc(q.shape[:3], torch.float32, dev)
    amax = torch.empty(q.shape[:3], dtype=torch.int32, device=dev)
    dg = alloc((lay.B, lay.H, lay.programs), torch.float32, dev)  # per program; summed below
    _dq_kernel[(lay.programs, BH)](q, k, v, fq, fk, gate, hs, hden, m, z, delta, do, dq, dfq, dc, amax, dg,
                             lay.scale, lay.T, **lay.chunk_meta())
    # The sinks' gradient from the queries past the window, in float32 for the chunk kernel to add.
    dks, dvs = (torch.zeros(BH, lay.BS, x, dtype=torch.float32, device=dev) for x in (lay.BD, lay.BV))
    if lay.S:
        _dsinks_kernel[(BH,)](q, k, v, gate, m, z, delta, do, dc, amax, dks, dvs, lay.scale, lay.T,
                              **lay.sinks_meta())
    dk, dv, dfk = alloc(k.shape, k.dtype, dev), alloc(v.shape, v.dtype, dev), alloc(fk.shape, fk.dtype, dev)
    # dk and dfk with all of V, then dv in blocks of V (see the kernel)
    for part, blocks, bv in ((False, 1, lay.BV), (True, lay.NV, lay.BVS)):
        _dkv_kernel[(lay.programs, BH, blocks)](q, k, v, fq, fk, gate, dhs, dhden, m, z, delta, do, dc, amax, dks,
                                                dvs, dk, dv, dfk, lay.scale, lay.T, dvs_row=lay.BV, DV=part,
                                                **(lay.chunk_meta() | {"BV": bv}))
    return dq, dk, dv, dfq, dfk, dg.sum((0, 2))


# ----------------------------------------------------------------------------------------------
# Custom ops (so torch.compile keeps them in one graph) and their autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("supra::window_hybrid_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
            gate: torch.Tensor, window: int, sinks: int, terrace: bool, chunk_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, fq, fk, gate, window, sinks, terrace, chunk_size)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, fq, fk, gate, window, sinks, terrace, chunk_size):
    B, T, H, _ = q.shape
    return (q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, T, H, dtype=torch.float32),
            q.new_empty(B, T, H, dtype=torch.float32))


@torch.library.custom_op("supra::window_hybrid_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
            gate: torch.Tensor, o: torch.Tensor, m: torch.Tensor, z: torch.Tensor, do: torch.Tensor,
            window: int, sinks: int, terrace: bool, chunk_size: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q, k, v, fq, fk, gate, o, m, z, do, window, sinks, terrace, chunk_size)


@_bwd_op.register_fake
def _bwd_fake(q, k, v, fq, fk, gate, o, m, z, do, window, sinks, terrace, chunk_size):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(fq),
            torch.empty_like(fk), gate.new_empty(gate.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, fq, fk, gate, window, sinks, terrace, chunk_size = inputs
    o, m, z = output
    ctx.mark_non_differentiable(m, z)
    ctx.save_for_backward(q, k, v, fq, fk, gate, o, m, z)
    ctx.window, ctx.sinks, ctx.terrace, ctx.chunk_size = window, sinks, terrace, chunk_size


def _backward_rule(ctx, do, dm, dz):
    q, k, v, fq, fk, gate, o, m, z = ctx.saved_tensors
    if do is None:
        do = o.new_zeros(o.shape)
    dq, dk, dv, dfq, dfk, dgate = _bwd_op(q, k, v, fq, fk, gate, o, m, z, do.contiguous(), ctx.window,
                                          ctx.sinks, ctx.terrace, ctx.chunk_size)
    return dq, dk, dv, dfq, dfk, dgate.to(gate.dtype), None, None, None, None


torch.library.register_autograd("supra::window_hybrid_fwd", _backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def final_hybrid_state(k: torch.Tensor, v: torch.Tensor, fk: torch.Tensor, window: int, sinks: int = 0,
                       terrace: bool = False) -> HybridState:
    """The decoder's state after a stateless call, laid out as `window_hybrid_attention` leaves it:
    the last R tokens in the ring (R = W, 2W for the terrace; front slots invalid when T < R, oldest
    first, next_slot 0), the linear state over everything before them (one pass over fk and v, in
    torch), and the sinks: the first S tokens in their own slots, never in the linear state, invalid
    (zero fk) in the ring."""
    B, T, H = k.shape[:3]
    acc = state_dtype(k.dtype)
    ring_size = 2 * window if terrace else window
    keep = min(ring_size, T)
    leaving = T - keep
    sink_k, sink_v, sink_valid, _, is_sink = take_sinks(k, v, None, sinks, acc)
    fk = fk.to(acc).masked_fill(is_sink[:, :, None, None], 0.0)
    v_and_one = torch.cat([v.to(acc), v.new_ones(B, T, H, 1, dtype=acc)], dim=-1)
    kv = torch.einsum("bthf,bthe->bhfe", fk[:, :leaving], v_and_one[:, :leaving])

    def ring(x: torch.Tensor) -> torch.Tensor:  # (B, H, R, .), the last `keep` tokens at the back
        return F.pad(x[:, leaving:].to(acc), (0, 0, 0, 0, ring_size - keep, 0)).transpose(1, 2).contiguous()

    ring_v = ring(v_and_one)
    ring_v[..., -1] = 1  # every slot's ones column: a slot filled later by a decode step keeps it
    valid = torch.zeros(B, ring_size, dtype=torch.bool, device=k.device)
    valid[:, ring_size - keep:] = ~is_sink[:, leaving:]
    phase = torch.full((B,), T % window if terrace else 0, device=k.device)
    return HybridState(kv, ring(k), ring_v, ring(fk), valid, sink_k, sink_v, sink_valid, phase, 0, terrace)


def triton_window_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    window: int = 64,
    output_final_state: bool = False,
    chunk_size: int | None = None,
    sinks: int = 0,
    terrace: bool = False,
) -> tuple[torch.Tensor, HybridState | None]:
    """The LoLCATs hybrid through the Triton kernels; contract of `window_hybrid_attention` with no state.

    chunk_size (a power of two >= 16 and >= the window's reach, W or 2W for the terrace) defaults to
    the smallest such. T >= 1; float64 inputs raise (`window_hybrid_attention` runs the torch blocked
    form for them). Features may have their own dtype (Hedgehog's are float32 under bf16 autocast).
    """
    B, T, H, D = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or fq.shape[:3] != q.shape[:3] or fk.shape != fq.shape:
        raise ValueError(f"q, k must be (B, T, H, D), v (B, T, H, V), fq, fk (B, T, H, F); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(fq.shape)}, {tuple(fk.shape)}")
    if window_gate.shape != (H,):
        raise ValueError(f"window_gate must be (H,)={H,}, got {tuple(window_gate.shape)}")
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    if T == 0:
        raise ValueError("T must be >= 1, got 0")
    check_dtypes("window_hybrid_attention", q, k, v, fq, fk)
    reach = 2 * window if terrace else window  # a window key is never more than two chunks back
    chunk_size = max(16, triton.next_power_of_2(reach)) if chunk_size is None else chunk_size
    if chunk_size < max(16, reach) or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 and >= {'2 x ' if terrace else ''}window "
                         f"({reach}), got {chunk_size}")
    # One dtype for the activations, one for the features (RoPE in float32 under autocast can leave q, k
    # float32 beside a bf16 v); the output comes back in q's dtype, as from the torch form.
    act = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    feat = torch.promote_types(fq.dtype, fk.dtype)
    o, _, _ = _fwd_op(*(x.to(act).contiguous() for x in (q, k, v)), *(x.to(feat).contiguous() for x in (fq, fk)),
                      window_gate.float().contiguous(), window, sinks, terrace, chunk_size)
    return o.to(q.dtype), (final_hybrid_state(k, v, fk, window, sinks, terrace) if output_final_state else None)
