"""Prefill and decode speed, and the memory a sequence holds, as the context grows.

For each context length L: one prefill of L random tokens into a fresh cache (tokens/s), then
`decode_tokens` single-token steps continuing from that cache. The per-token decode time is the
median over those steps, which a noisy shared machine disturbs far less than the mean. A recurrent
model's step costs the same at any L (its state has a fixed size); softmax attention's step reads
a KV cache that grows with L.

Memory: on CUDA, the peak allocated during the measurement. On CPU there is no allocator peak to
ask for, so we report what can be measured honestly: the bytes of the cache after the run (the
recurrent state, or the keys and values) and the change in the process's resident set size.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..layers.cache import cache_kwargs


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor inside nested tuples/lists/NamedTuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def cache_bytes_per_layer(cache: Any) -> list[int]:
    """What one cache holds per layer: a recurrent state (a slot with `.state`) or softmax keys/values."""
    return [tensor_bytes(slot.state) if hasattr(slot, "state")
            else tensor_bytes(getattr(slot, "keys", None)) + tensor_bytes(getattr(slot, "values", None))
            for slot in getattr(cache, "layers", [])]


def cache_bytes(cache: Any) -> int:
    return sum(cache_bytes_per_layer(cache))


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: nn.Module, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, dict]:
    """Run the prompt into a fresh cache: (cache, next greedy token, wall and process CPU seconds)."""
    device = ids.device
    cache = DynamicCache(config=model.config)
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    # Logits of the last position only: a 64k-token prompt's full logits would take gigabytes.
    logits = model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
    _sync(device)
    seconds = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    return cache, logits[:, -1:].argmax(-1), seconds


@torch.no_grad()
def decode(model: nn.Module, cache: DynamicCache, token: torch.Tensor, steps: int) -> tuple[torch.Tensor, dict]:
    """`steps` greedy single-token steps continuing `cache`: (last token, per-step wall and CPU seconds).
    Process CPU time counts the work of every thread of this process and not the time other processes
    hold the cores, so it is the steadier measure on a shared machine."""
    device = token.device
    times: dict[str, list[float]] = {"wall_s": [], "cpu_s": []}
    for _ in range(steps):
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        logits = model(input_ids=token, **cache_kwargs(cache), use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        times["wall_s"].append(time.perf_counter() - wall)
        times["cpu_s"].append(time.process_time() - cpu)
    return token, times


@torch.no_grad()
def measure(model: nn.Module, length: int, decode_tokens: int, seed: int = 0) -> dict:
    """One context length: prefill time, median decode step time, cache bytes, memory."""
    device = next(model.parameters()).device
    ids = random_prompt(model, length, seed).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_allocated = torch.cuda.memory_allocated(device)
    rss_before = rss_bytes()
    cache, token, prefill_time = prefill(model, ids)
    _, steps = decode(model, cache, token, decode_tokens)
    prefill_s = prefill_time["wall_s"]
    decode_s = statistics.median(steps["wall_s"])
    result = {
        "context": length,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": length / prefill_s,
        "decode_ms_per_token": decode_s * 1e3,
        "decode_tokens_per_s": 1.0 / decode_s,
        "state_bytes": cache_bytes(cache),  # per sequence: the batch is one sequence
        "rss_delta_bytes": rss_bytes() - rss_before,
    }
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_memory_over_weights_bytes"] = result["peak_memory_bytes"] - base_allocated
    return result


def random_prompt(model: nn.Module, length: int, seed: int = 0) -> torch.Tensor:
    """(1, length) random token ids: prefill and decode cost do not depend on the text."""
    return torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def speed(model: nn.Module, lengths: list[int], decode_tokens: int = 32) -> dict:
    """`measure` at each length, after one short warm-up run (first calls pay for lazy init)."""
    if not lengths:
        raise ValueError("eval.speed_lengths is empty")
    if decode_tokens < 1:
        raise ValueError(f"eval.speed_decode_tokens must be >= 1, got {decode_tokens}")
    measure(model, min(lengths), min(decode_tokens, 4))
    device = next(model.parameters()).device
    points = [measure(model, length, decode_tokens, seed=i) for i, length in enumerate(sorted(lengths))]
    first, last = points[0], points[-1]
    return {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "decode_tokens": decode_tokens,
        "points": points,
        # How decode cost scales: ~1 for a recurrent model, growing with context for softmax attention.
        "decode_time_ratio_longest_vs_shortest": last["decode_ms_per_token"] / first["decode_ms_per_token"],
        "state_bytes_ratio_longest_vs_shortest": last["state_bytes"] / max(first["state_bytes"], 1),
    }
