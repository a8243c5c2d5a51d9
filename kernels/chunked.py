"""Chunked causal linear attention in plain torch: the CPU path and the Triton kernels' algorithm.

Same contract as `reference.recurrent_linear_attention`. The sequence is cut into chunks of C
tokens. Inside a chunk the output is a small masked quadratic product; across chunks a K x V
state is carried. Work is O(T * C) instead of O(T^2), and autograd flows through it, so it also
trains on CPU. Every decay factor is exp() of a difference that is <= 0, so nothing overflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import expand_log_decay, per_document, state_dtype


def chunk_linear_attention(
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
    if cu_seqlens is not None:
        op = lambda *a: chunk_linear_attention(*a, chunk_size=chunk_size)  # noqa: E731
        return per_document(op, (q, k, v), log_decay, scale, initial_state, output_final_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q.dtype)
    if T == 0:  # an empty document (cu_seqlens [0, 0, ...]): no output, the state passes through
        state = None if initial_state is None else initial_state.to(acc)
        if output_final_state and state is None:
            state = torch.zeros(B, H, K, V, device=q.device, dtype=acc)
        return v.new_zeros(B, 0, H, V), (state if output_final_state else None)
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B, H, N, C, D)
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))  # padded tokens have zero k and v: they add nothing
        return x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(q) * scale, chunks(k), chunks(v)
    g = expand_log_decay(log_decay, B, T, H, q.device, acc)
    g = F.pad(g, (0, 0, 0, pad)).view(B, N, C, H).permute(0, 3, 1, 2)  # (B, H, N, C)
    G = g.cumsum(-1)  # log decay from the chunk start up to and including each token
    G_last = G[..., -1:]

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    intra_decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    intra = (qc @ kc.transpose(-1, -2) * intra_decay) @ vc

    # Each chunk's own contribution to the state at its end, and how much the entering state decays.
    chunk_state = (kc * (G_last - G).exp()[..., None]).transpose(-1, -2) @ vc  # (B, H, N, K, V)
    chunk_decay = G_last.squeeze(-1).exp()  # (B, H, N)
    state = (torch.zeros(B, H, K, V, device=q.device, dtype=acc) if initial_state is None
             else initial_state.to(acc))
    entering = []
    for n in range(N):
        entering.append(state)
        state = chunk_decay[:, :, n, None, None] * state + chunk_state[:, :, n]
    inter = (qc * G.exp()[..., None]) @ torch.stack(entering, dim=2)

    out = (intra + inter).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return out.to(q.dtype), (state if output_final_state else None)
