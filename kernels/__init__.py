"""Linear-attention ops: readable references, the torch chunked form (CPU path), and Triton kernels.

`linear_attention` is what model code calls; it picks the implementation for the device.
"""

from __future__ import annotations

import torch

from .chunked import chunk_linear_attention
from .hybrid import HybridState, parallel_window_hybrid_attention, window_hybrid_attention
from .reference import parallel_linear_attention, recurrent_linear_attention

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS", "HybridState", "chunk_linear_attention", "linear_attention", "parallel_linear_attention",
    "parallel_window_hybrid_attention", "recurrent_linear_attention", "window_hybrid_attention",
]


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
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return chunk_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)
