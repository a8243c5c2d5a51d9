"""Readable references for causal linear attention with decay; every fast path is tested against these.

Shapes follow fla: q, k are (B, T, H, K), v is (B, T, H, V). The recurrence, per head, is

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t        (a K x V matrix, kept in float32 or float64)
    o_t = scale * q_t S_t

`log_decay` g is None (no decay), a per-head tensor (H,) (SUPRA/RetNet: fixed decay), or a
per-token tensor (B, T, H) (gated variants). `cu_seqlens` (N+1,) marks the documents packed into a
batch of one row; the state restarts at each document and initial/final states are (N, H, K, V).
"""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decay and state are float32 whatever the activations are, float64 when the inputs are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_log_decay(log_decay: torch.Tensor | None, batch: int, length: int, heads: int,
                     device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-token log decay (B, T, H) from None, a per-head (H,) or a per-token (B, T, H) tensor."""
    if log_decay is None:
        return torch.zeros(batch, length, heads, device=device, dtype=dtype)
    log_decay = log_decay.to(device=device, dtype=dtype)
    if log_decay.dim() == 1:
        return log_decay.view(1, 1, heads).expand(batch, length, heads)
    return log_decay


def split_documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence: the definition, and the decode path's twin."""
    if cu_seqlens is not None:
        return per_document(recurrent_linear_attention, (q, k, v), log_decay, scale, initial_state,
                             output_final_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q.dtype)
    g = expand_log_decay(log_decay, B, T, H, q.device, acc)
    state = (torch.zeros(B, H, K, V, device=q.device, dtype=acc) if initial_state is None
             else initial_state.to(acc).clone())
    out = torch.empty(B, T, H, V, device=q.device, dtype=acc)
    for t in range(T):
        update = k[:, t].to(acc)[..., :, None] * v[:, t].to(acc)[..., None, :]
        state = state * g[:, t].exp()[..., None, None] + update
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc) * scale, state)
    return out.to(q.dtype), (state if output_final_state else None)


def parallel_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked quadratic form: o = (scale * q k^T * D) v + decayed read of the initial state.

    D[i, j] = exp(G_i - G_j) for j <= i, with G the running sum of the log decay.
    """
    if cu_seqlens is not None:
        return per_document(parallel_linear_attention, (q, k, v), log_decay, scale, initial_state,
                             output_final_state, cu_seqlens)
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q.dtype)
    G = expand_log_decay(log_decay, B, T, H, q.device, acc).cumsum(1).transpose(1, 2)  # (B, H, T)
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # (B, H, T, .)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    out = (qf @ kf.transpose(-1, -2) * scale * decay) @ vf
    if initial_state is not None:
        out = out + (qf * scale * G.exp()[..., None]) @ initial_state.to(acc)
    final = None
    if output_final_state:
        weight = (G[..., -1:] - G).exp()[..., None]  # how much of each key survives to the end
        final = (kf * weight).transpose(-1, -2) @ vf
        if initial_state is not None:
            final = final + G[..., -1].exp()[..., None, None] * initial_state.to(acc)
    return out.transpose(1, 2).to(q.dtype), final


def per_document(op, tokens: tuple[torch.Tensor, ...], log_decay, scale, initial_state, output_final_state,
                 cu_seqlens):
    """Run `op(*tokens, log_decay, scale, h0, output_final_state)` on each document of one packed row;
    `tokens` are the per-token inputs (q, k, v, and the delta rule's beta), sliced like the row."""
    if tokens[0].shape[0] != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed row, got batch size {tokens[0].shape[0]}")
    outs, finals = [], []
    for n, (start, end) in enumerate(split_documents(cu_seqlens)):
        g = log_decay[:, start:end] if log_decay is not None and log_decay.dim() == 3 else log_decay
        h0 = initial_state[n:n + 1] if initial_state is not None else None
        o, h = op(*(x[:, start:end] for x in tokens), g, scale, h0, output_final_state)
        outs.append(o)
        finals.append(h)
    return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step: q, k (B, H, K), v (B, H, V); contiguous `state` (B, H, K, V) is updated in place.

    log_decay is None, per head (H,) or per sequence (B, H) for this token. Returns o (B, H, V) in
    q's dtype: o = scale * q . (exp(g) * state + k^T v).
    """
    B, H, K = q.shape
    V = v.shape[-1]
    acc = state.dtype
    if log_decay is not None:
        decay = log_decay.to(device=state.device, dtype=acc).exp()
        state.mul_(decay.expand(B, H)[..., None, None])
    # Rank-one update and read as batched products on the state's own memory: no K x V temporary.
    flat = state.view(B * H, K, V)
    flat.baddbmm_(k.to(acc).reshape(B * H, K, 1), v.to(acc).reshape(B * H, 1, V))
    scale = K**-0.5 if scale is None else scale
    out = torch.bmm(q.to(acc).reshape(B * H, 1, K), flat).view(B, H, V) * scale
    return out.to(q.dtype)
