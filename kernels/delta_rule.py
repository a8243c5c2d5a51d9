"""The gated delta rule: a float64-able token loop (the definition), its chunked WY form, a decode step.

Shapes follow `reference.py`: q, k (B, T, H, K), v (B, T, H, V), state (B, H, K, V) with o = q S.
Per head, with beta_t in (0, 1) and a_t = exp(g_t) in (0, 1] (Gated DeltaNet, Yang et al. 2024):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

i.e. the state first decays, then is corrected towards v_t along k_t: writing u_t = beta_t (v_t -
a_t S_{t-1}^T k_t), S_t = a_t S_{t-1} + k_t u_t^T. Callers L2-normalise k (so I - beta k k^T is a
contraction). `log_decay` g is None (plain delta rule), per head (H,) or per token (B, T, H); `beta`
is (B, T, H). `cu_seqlens` (N+1,) packs documents into a batch of one row; the state restarts at each
document, and initial/final states are (N, H, K, V).

Chunked form (the WY/UT representation, as in fla's chunk_gated_delta_rule): inside a chunk of C
tokens with G the running log decay and S0 the entering state, every u_t depends on the earlier u_j
of its chunk only through one unit lower-triangular system,

    (I + A) U = diag(beta) (V - diag(exp G) K S0),   A_ij = beta_i exp(G_i - G_j) k_i.k_j  (j < i),

so U = W_v - W_k S0 with W_v, W_k solved once per chunk in parallel. Only the S0 -> S_C walk is
sequential; outputs and states are then small matrix products, O(T C) work as for linear attention.
`triton_delta_rule.py` is the same form as Triton kernels (what `delta_rule` runs on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import expand_log_decay, per_document, state_dtype


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence: the definition every other form is tested against."""
    if cu_seqlens is not None:
        return per_document(recurrent_delta_rule, (q, k, v, beta), log_decay, scale, initial_state,
                             output_final_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q.dtype)
    g = expand_log_decay(log_decay, B, T, H, q.device, acc)
    state = (torch.zeros(B, H, K, V, device=q.device, dtype=acc) if initial_state is None
             else initial_state.to(acc).clone())
    out = []
    for t in range(T):  # as `delta_rule_step`, without its in-place update (autograd runs through this)
        k_t, v_t = k[:, t].to(acc), v[:, t].to(acc)
        state = state * g[:, t].exp()[..., None, None]
        u = beta[:, t].to(acc)[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, state))
        state = state + k_t[..., :, None] * u[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc) * scale, state))
    out = torch.stack(out, dim=1) if T else v.new_zeros(B, 0, H, V, dtype=acc)
    return out.to(q.dtype), (state if output_final_state else None)


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode token: q, k (B, H, K), v (B, H, V), beta (B, H); `state` (B, H, K, V) updated in place.

    log_decay is None, per head (H,) or per sequence (B, H). Returns o (B, H, V) in q's dtype.
    """
    acc = state.dtype
    if log_decay is not None:
        state.mul_(log_decay.to(device=state.device, dtype=acc).exp().expand(state.shape[:2])[..., None, None])
    k, v = k.to(acc), v.to(acc)
    u = beta.to(acc)[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, state))
    state.add_(k[..., :, None] * u[..., None, :])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.einsum("bhk,bhkv->bhv", q.to(acc) * scale, state).to(q.dtype)


def chunk_delta_rule(
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
    """The chunked WY form in torch (the CPU path); autograd gives the backward."""
    if cu_seqlens is not None:
        op = lambda *a: chunk_delta_rule(*a, chunk_size=chunk_size)  # noqa: E731
        return per_document(op, (q, k, v, beta), log_decay, scale, initial_state, output_final_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = state_dtype(q.dtype)
    state = (torch.zeros(B, H, K, V, device=q.device, dtype=acc) if initial_state is None
             else initial_state.to(acc))
    if T == 0:  # an empty document: no output, the state passes through
        return v.new_zeros(B, 0, H, V), (state if output_final_state else None)
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, ...) -> (B, H, N, C, ...)
        x = F.pad(x.to(acc), (0, 0) * (x.dim() - 2) + (0, pad))  # padded tokens: zero k, v and beta
        return x.view(B, N, C, H, *x.shape[3:]).transpose(1, 3).transpose(2, 3)

    qc, kc, vc, bc = chunks(q) * scale, chunks(k), chunks(v), chunks(beta)[..., None]
    g = F.pad(expand_log_decay(log_decay, B, T, H, q.device, acc), (0, 0, 0, pad))
    G = g.view(B, N, C, H).permute(0, 3, 1, 2).cumsum(-1)[..., None]  # (B, H, N, C, 1)

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G - G.transpose(-1, -2)).masked_fill(~causal, float("-inf")).exp()  # exp(G_i - G_j), j <= i
    system = torch.eye(C, device=q.device, dtype=acc) + bc * (kc @ kc.transpose(-1, -2)) * decay.tril(-1)
    w_v = torch.linalg.solve_triangular(system, bc * vc, upper=False, unitriangular=True)
    w_k = torch.linalg.solve_triangular(system, bc * G.exp() * kc, upper=False, unitriangular=True)
    scores = qc @ kc.transpose(-1, -2) * decay  # q_i.k_j exp(G_i - G_j), j <= i
    key_to_end = kc * (G[..., -1:, :] - G).exp()  # how much of each key's write survives the chunk

    outs = []
    for n in range(N):
        u = w_v[:, :, n] - w_k[:, :, n] @ state
        outs.append(qc[:, :, n] * G[:, :, n].exp() @ state + scores[:, :, n] @ u)
        state = G[:, :, n, -1:].exp() * state + key_to_end[:, :, n].transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return out.to(q.dtype), (state if output_final_state else None)
