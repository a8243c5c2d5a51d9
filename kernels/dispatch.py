"""The ops model code calls (linear attention, the delta rule, the LoLCATs hybrid): each picks the
implementation a call runs, here and nowhere else: the Triton kernels where the backend runs them on
the device (`backend.use_triton`) and they compute in the inputs' dtypes (`backend.triton_dtypes`: not
float64), the torch forms otherwise; see the package docstring. The Triton modules are imported on
first use, so a CPU install without triton imports this one.
"""

from __future__ import annotations

import torch

from .backend import triton_dtypes, use_triton
from .chunked import chunk_linear_attention
from .delta_rule import chunk_delta_rule
from .hybrid import CacheRule, HybridState, blocked_hybrid_attention, check_hybrid_call, ring_step
from .reference import recurrent_step
from .sparse_cache import cached_hybrid_attention, decide_at_block_start


def runs_triton(backend: str, device: torch.device, *tensors: torch.Tensor) -> bool:
    """Whether a call with these inputs runs the Triton kernels. `backend` is asked first, so a setting
    that cannot run (backend='triton' with neither CUDA nor the interpreter) raises whatever the dtypes."""
    return use_triton(backend, device) and triton_dtypes(*tensors)


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
    if runs_triton(backend, q.device, q, k, v):
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

    log_decay is None, per head (H,) or per sequence (B, H). Returns o (B, H, V) in q's dtype. The
    kernel updates a float32 state; a state of another dtype (float64 in the tests) takes the torch form.
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
    if runs_triton(backend, q.device, q, k, v):
        from .triton_delta_rule import triton_delta_rule

        return triton_delta_rule(q, k, v, beta, log_decay, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_delta_rule(q, k, v, beta, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def window_hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    window: int = 64,
    state: HybridState | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    sinks: int = 0,
    terrace: bool = False,
    log_decay: torch.Tensor | None = None,
    cache_budget: int = 0,
    cache_chunk: int = 1,
    cache_recall: int = 0,
    cache_groups: int = 1,
) -> tuple[torch.Tensor, HybridState | None]:
    """The LoLCATs hybrid (`hybrid.py`). q, k (B, T, H, D) after RoPE; v (B, T, H, V); fq, fk (B, T, H, F);
    window_gate (H,) in (0, 1); T >= 1; log_decay (H,) <= 0 or None (the linear part's decay). A state
    carried in keeps its own number of sink slots, window kind and cache (`sinks`, `terrace` and the
    `cache_*` arguments then must match it), and must come from calls with the same decay.

    A stateless call on CUDA (backend auto|triton) runs the fused kernels of `triton_hybrid.py`,
    unless it has a decay, which they lack, or float64 inputs: then it runs the torch blocked form, as
    every call with a state does. With a sparse cache (`cache_budget` > 0 pairs per key/value head, either window,
    with or without a decay) every call runs `sparse_cache.py`'s torch form; the cache keeps runs of
    `cache_chunk` consecutive tokens, `cache_recall` of its pairs by recall error; `cache_groups` heads
    in a row (those a grouped-query model fed the same keys and values) share their choice and one copy
    of their pairs (`CacheRule`).
    """
    cache = CacheRule(cache_budget, cache_chunk, cache_recall, cache_groups) if cache_budget else None
    check_hybrid_call(state, sinks, terrace, window, cache, log_decay)
    if cache is not None:
        return cached_hybrid_attention(q, k, v, fq, fk, window_gate, window, state, output_final_state, sinks,
                                       cache, log_decay, terrace)
    if state is None and runs_triton(backend, q.device, q, k, v, fq, fk) and log_decay is None:
        from .triton_hybrid import triton_window_hybrid_attention

        return triton_window_hybrid_attention(q, k, v, fq, fk, window_gate, window, output_final_state,
                                              sinks=sinks, terrace=terrace)
    return blocked_hybrid_attention(q, k, v, fq, fk, window_gate, window, state, output_final_state, sinks, terrace,
                                    log_decay)


def window_hybrid_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    window_gate: torch.Tensor,
    state: HybridState,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridState]:
    """One decode token of the hybrid (`hybrid.ring_step`: its contract), torch on every device. With a
    sparse cache, a row entering a block first decides which of block b-2 join the cache and which the
    linear state (`sparse_cache.decide_at_block_start`)."""
    if state.cache_k is not None:
        decide_at_block_start(state, log_decay)
    return ring_step(q, k, v, fq, fk, window_gate, state, log_decay)
