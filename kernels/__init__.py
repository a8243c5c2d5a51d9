"""Linear-attention ops: readable references, the torch chunked form (CPU path), and Triton kernels.

`linear_attention` (training, prefill) and `linear_attention_step` (decode) are what model code
calls; each picks the implementation for the device. Backends: "auto" uses Triton on CUDA tensors
when triton is installed and the torch forms otherwise; "torch" and "triton" force one. Forcing
Triton on CPU tensors works only through the interpreter (TRITON_INTERPRET=1 set before the first
use), which is what the tests do. The Triton modules are imported on first use, so a CPU install
without triton still imports this package. The LoLCATs hybrid (`window_hybrid_attention`) follows the
same rule for a stateless call (training, prefill: the fused kernels of `triton_hybrid.py`); a call
with a decoder state runs its blocked torch form on every device, and its decode step
(`window_hybrid_step`) is a few small torch products over a ring buffer of W tokens. The gated delta
rule (`delta_rule.py`, `delta_rule` here) follows the rule too: `triton_delta_rule.py` where Triton
runs, its chunked WY form in torch elsewhere; its decode step is torch on every device.
"""

from __future__ import annotations

import torch

from .backend import BACKENDS, use_triton
from .chunked import chunk_linear_attention
from .delta_rule import chunk_delta_rule, delta_rule_step, recurrent_delta_rule
from .hybrid import (
    HybridState,
    parallel_window_hybrid_attention,
    stack_states,
    state_row,
    window_hybrid_attention,
    window_hybrid_step,
)
from .reference import parallel_linear_attention, recurrent_linear_attention, recurrent_step

__all__ = [
    "BACKENDS", "HybridState", "chunk_delta_rule", "chunk_linear_attention", "delta_rule",
    "delta_rule_step", "linear_attention", "linear_attention_step", "recurrent_delta_rule",
    "parallel_linear_attention", "parallel_window_hybrid_attention", "recurrent_linear_attention",
    "recurrent_step", "stack_states", "state_row", "use_triton", "window_hybrid_attention", "window_hybrid_step",
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
