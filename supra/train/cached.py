"""Attention transfer from a cache of the frozen teacher's per-layer inputs and outputs.

Teacher forcing makes what each converted layer is trained on depend on frozen weights only: its
q/k/v (after projection, before RoPE) and the softmax attention output over them. So the frozen
model runs once over a chunk of `cache_tokens` training tokens, every layer's q/k/v and softmax
output are kept in memory (in `cache_dtype`), and the feature maps then train `epochs` passes over
the chunk: a step runs only the layers' new parts, not the MLPs, the projections or the softmax.

Resuming inside a chunk: the checkpoint holds the data loader's position at the chunk's start, the
rerun recomputes the chunk's cache (the teacher is deterministic) and continues at the saved step,
in the same micro-batch order (a permutation seeded by the run's seed, the chunk and the epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.attention import RecurrentAttention, document_starts, transfer_mse
from .stages import recurrent_layers
from .transfer import reported_transfer_loss, scaled_transfer_loss, teacher_layers


@dataclass
class CachedBatch:
    """One micro-batch of the cache: its position ids, and per converted layer (q, k, v, softmax
    output), each (B, T, heads * head_dim) as the projections give them."""

    position_ids: torch.Tensor
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def build_cache(model: nn.Module, batches: list[dict[str, torch.Tensor]], dtype: torch.dtype,
                device: torch.device) -> list[CachedBatch]:
    """Run the frozen teacher over `batches` once, keeping every converted layer's transfer inputs.
    The projections' outputs and o_proj's input (the softmax output in teacher mode) are read by
    forward hooks, so the layers need no cache-specific code."""
    layers = recurrent_layers(model)
    cache = []
    for batch in batches:
        captured: list[list[torch.Tensor]] = [[] for _ in layers]
        with _capturing(layers, captured, dtype), teacher_layers(layers):
            # logits for one position only: the LM head is not wanted
            model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                  use_cache=False, logits_to_keep=1)
        cache.append(CachedBatch(batch["position_ids"], [tuple(c) for c in captured]))
    return cache


def cached_micro_loss(model: nn.Module, item: CachedBatch, loss_scale: float, device: torch.device) -> float:
    """Backpropagate each layer's transfer loss (`transfer.scaled_transfer_loss`) on one cached
    micro-batch, one layer's graph at a time; returns the loss as reported. Same loss and gradient as
    `stages.micro_batch_loss` on the batch the cache was made from."""
    layers = recurrent_layers(model)
    position_ids = item.position_ids.to(device)
    weight = next(layers[0].parameters())
    probe = torch.empty(0, dtype=weight.dtype, device=device)
    position_embeddings = model.get_decoder().rotary_emb(probe, position_ids)
    losses = []
    for layer, (q, k, v, teacher) in zip(layers, item.layers):
        B, T = q.shape[:2]
        q, k, v, teacher = (x.to(device, weight.dtype) for x in (q, k, v, teacher))
        shape = (B, T, -1, layer.head_dim)
        student, _ = layer.mix(q.view(shape), k.view(shape), v.view(shape), position_embeddings, None,
                               document_starts(position_ids, B), want_state=False)
        loss = transfer_mse(student, teacher.view(shape))
        scaled_transfer_loss(loss, loss_scale).backward()
        losses.append(loss.detach())
    return reported_transfer_loss(losses).item()


def epoch_order(count: int, seed: int, chunk: int, epoch: int) -> list[int]:
    """The micro-batch order of one pass over a chunk: fixed by (seed, chunk, epoch), so a resumed
    run replays it; the first epoch keeps the data order."""
    if epoch == 0:
        return list(range(count))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk * 1009 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def teacher_cache_bytes(cache: list[CachedBatch]) -> int:
    return sum(x.numel() * x.element_size() for item in cache for layer in item.layers for x in layer)


def chunk_position(stage_step: int, chunk_steps: int, epochs: int) -> tuple[int, int, int]:
    """(chunk, epoch, step inside the epoch) of the stage's step `stage_step` (0-based)."""
    chunk, within = divmod(stage_step, chunk_steps * epochs)
    epoch, step = divmod(within, chunk_steps)
    return chunk, epoch, step


@contextmanager
def _capturing(layers: list[RecurrentAttention], captured: list[list[torch.Tensor]],
               dtype: torch.dtype) -> Iterator[None]:
    def keep(i: int, tensor: torch.Tensor) -> None:
        captured[i].append(tensor.detach().to("cpu", dtype))

    handles = []
    for i, layer in enumerate(layers):
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
            handles.append(proj.register_forward_hook(lambda m, args, out, i=i: keep(i, out)))
        handles.append(layer.o_proj.register_forward_pre_hook(lambda m, args, i=i: keep(i, args[0])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
