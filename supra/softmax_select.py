"""`softmax_layers=auto:K`: which K layers a hybrid keeps as softmax attention, chosen by measurement.

fla-org/hybrid-distillation (ANCHORS section 8) ranks layers by how much restoring each one alone to
softmax lowers the distillation loss. Without a trained student at conversion time we measure the
same thing on the converted model itself: the next-token loss on calibration text with every layer
converted, and again with each layer alone restored to its original softmax attention. The K layers
whose restoration lowers the loss most are kept. That is L + 1 forward passes over the calibration
text (`calibration_tokens`, as `supra skip` uses), no training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layers.attention import RecurrentAttention
from .layers.linearize import LinearizeSpec, decoder_layers, linearize, record_spec


def parse_auto(value: Any) -> int | None:
    """K for "auto:K", None for an explicit list of layers; ValueError for anything else."""
    match = re.fullmatch(r"auto:(\d+)", value.strip()) if isinstance(value, str) else None
    if match is not None:
        return int(match.group(1))
    if not isinstance(value, str) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return None
    raise ValueError(f"softmax_layers must be a list of layer indices or auto:K (K layers chosen by "
                     f"measurement), got {value!r}")


@torch.no_grad()
def next_token_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        n = batch[:, 1:].numel()
        total += model(input_ids=batch.to(device), labels=batch.to(device), use_cache=False).loss.item() * n
        tokens += n
    return total / tokens


@torch.no_grad()
def choose_softmax_layers(model: nn.Module, spec: LinearizeSpec, k: int,
                          batches: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Convert `model` (softmax, possibly with skipped sublayers) per `spec` with the K layers whose
    restoration to softmax lowers the next-token loss on `batches` most kept as softmax.

    Returns the record of the choice: every candidate's loss with it alone restored, the all-converted
    loss, and the chosen layers (sorted). The model's spec records the chosen layers as softmax_layers
    and this record as softmax_choice."""
    layers = decoder_layers(model)
    originals = [layer.self_attn for layer in layers]
    spec.softmax_layers = []
    linearize(model, spec)
    candidates = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, RecurrentAttention)]
    if not 0 <= k <= len(candidates):
        raise ValueError(f"softmax_layers=auto:{k} is out of range: {len(candidates)} layers are converted, "
                         f"so K must be in 0..{len(candidates)}")
    was_training = model.training
    model.eval()
    converted = next_token_loss(model, batches)
    restored = {}
    for i in candidates:
        student = layers[i].self_attn
        layers[i].self_attn = originals[i]
        restored[i] = next_token_loss(model, batches)
        layers[i].self_attn = student
    model.train(was_training)
    chosen = sorted(sorted(candidates, key=lambda i: restored[i])[:k])  # stable: ties go to the earlier layer
    for i in chosen:
        layers[i].self_attn = originals[i]
    choice = {"k": k, "criterion": "next-token loss on calibration text with the layer alone restored to softmax",
              "tokens": sum(b.numel() for b in batches), "loss_all_converted": converted,
              "loss_restored": {str(i): loss for i, loss in restored.items()}, "chosen": chosen}
    spec.softmax_layers, spec.softmax_choice = chosen, choice
    record_spec(model, spec)
    return choice
