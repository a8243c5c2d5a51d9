"""The three ops model code calls for linear attention and the delta rule: each picks the Triton
kernel or the torch form for the device (`backend.use_triton`); see the package docstring."""

from __future__ import annotations

import torch

from .backend import use_triton
from .chunked import chunk_linear_attention
from .delta_rule import chunk_delta_rule
from .reference import recurrent_step


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with decay; see `reference.py` for the exact contract."""
    if use_triton(backend, q.device):
        from .triton_chunk import triton_linear_attention

        return triton_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state,
                                       cu_seqlens)
    return chunk_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode token: q, k (B, H, K), v (B, H, V); contiguous `state` (B, H, K, V) updated in place.

    log_decay is None, per head (H,) or per sequence (B, H). Returns o (B, H, V) in q's dtype. A
    float64 state (the float64 tests) takes the torch form, as `linear_attention` does.
    """
    if use_triton(backend, q.device) and state.dtype == torch.float32:
        from .triton_decode import triton_linear_attention_step

        return triton_linear_attention_step(q, k, v, state, log_decay, scale)
    return recurrent_step(q, k, v, state, log_decay, scale)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule (training, prefill, decode); see `delta_rule.py` for the contract."""
    if use_triton(backend, q.device):
        from .triton_delta_rule import triton_delta_rule

        return triton_delta_rule(q, k, v, beta, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_delta_rule(q, k, v, beta, log_decay, scale, initial_state, output_final_state, cu_seqlens)
