"""`softmax_layers=auto:K`: which K layers a hybrid keeps as softmax attention, chosen by measurement.

fla-org/hybrid-distillation ("Distilling to Hybrid Attention Models via KL-Guided Layer Selection",
ICLR 2026) ranks layers by how much restoring each one alone to
softmax lowers the distillation loss. On a trained student (`supra uptrain ... softmax_layers=auto:K`
after its stages, or `supra convert model=RUN/model softmax_layers=auto:K`) the measure is its own:
the KL divergence of the next-token distribution from the model's teacher (every layer computing the
softmax attention it replaced, with its own q/k/v/o), with each layer alone restored. The K layers
whose restoration lowers it most become softmax attention again: L + 2 forward passes over the
calibration text (`calibration_tokens`, as `supra skip` uses).

Converting an original model (`supra convert softmax_layers=auto:K`) there is no trained student, so
a proxy is measured on the untrained conversion: the next-token loss with every layer converted, and
again with each layer alone restored to its original softmax attention. Measured on SmolLM2-135M
(benchmarks/results/cpu/softmax_choice.json) it does not predict what matters after training
(Spearman 0.28 with the trained criterion, top-2 sets disjoint): it favours the first layers, whose
untrained error every later layer inherits, while after attention transfer the layers the linear
form fits worst are deep ones. That is why uptrain measures after training.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers.attention import RecurrentAttention
from .layers.linearize import LinearizeSpec, SkippedAttention, decoder_layers, linearize, record_spec, recorded_spec
from .train.transfer import teacher_layers


def converted_layers(model: nn.Module) -> dict[int, RecurrentAttention]:
    """The layers whose attention is converted (not softmax, not skipped), by index."""
    return {i: layer.self_attn for i, layer in enumerate(decoder_layers(model))
            if isinstance(layer.self_attn, RecurrentAttention)}


def check_k(k: int, converted: int) -> None:
    if not 0 <= k <= converted:
        raise ValueError(f"softmax_layers=auto:{k} is out of range: {converted} layers are converted, "
                         f"so K must be in 0..{converted}")


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
    check_k(k, len(candidates))
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


def softmax_attention(model: nn.Module, idx: int, recurrent: RecurrentAttention) -> nn.Module:
    """The architecture's own softmax attention for layer `idx` around `recurrent`'s q/k/v/o (e.g.
    LlamaAttention beside LlamaDecoderLayer): what a checkpoint that keeps the layer as softmax loads."""
    block = decoder_layers(model)[idx]
    name = type(block).__name__.replace("DecoderLayer", "Attention")
    cls = getattr(sys.modules[type(block).__module__], name, None)
    if cls is None:
        raise ValueError(f"cannot restore softmax attention: {type(block).__module__} has no {name}")
    with torch.device("meta"):
        attention = cls(model.config, idx)
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(attention, projection, getattr(recurrent, projection))
    return attention


@torch.no_grad()
def restore_softmax_layers(model: nn.Module, k: int, batches: Sequence[torch.Tensor],
                           report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """On a converted (trained) model, turn back into softmax attention the K converted layers whose
    restoration alone lowers KL(teacher || model) on the next token over `batches` most; the
    teacher is the model with every converted layer computing the softmax attention it replaced.
    `report` hears a line after each batch (L + 2 forwards each: minutes on a CPU).
    Returns the record of the choice, also kept in the spec (softmax_layers, softmax_choice)."""
    converted = converted_layers(model)
    check_k(k, len(converted))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    kl_all, restored, positions = 0.0, dict.fromkeys(converted, 0.0), 0

    def kl(batch: torch.Tensor, teacher: torch.Tensor) -> float:
        student = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        return (teacher.exp() * (teacher - student)).sum().item()

    started = time.monotonic()
    for done, batch in enumerate(batches, 1):  # one batch's teacher distribution in memory at a time
        batch = batch.to(device)
        with teacher_layers(list(converted.values())):
            teacher = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        kl_all += kl(batch, teacher)
        for i, layer in converted.items():
            with teacher_layers([layer]):
                restored[i] += kl(batch, teacher)
        positions += batch.numel()
        if report is not None:
            report(f"softmax_layers=auto:{k}: calibration batch {done}/{len(batches)}, {len(converted)} layers "
                   f"tried ({time.monotonic() - started:.0f} s)")
    model.train(was_training)
    restored = {i: total / positions for i, total in restored.items()}
    chosen = sorted(sorted(converted, key=lambda i: restored[i])[:k])  # stable: ties go to the earlier layer
    choice = {"k": k, "criterion": "KL(teacher || model) on the next token with the layer alone restored to "
              "softmax (the teacher: every converted layer in softmax mode)", "tokens": positions,
              "kl_all_converted": kl_all / positions, "kl_restored": {str(i): v for i, v in restored.items()},
              "chosen": chosen}
    restore_layers(model, chosen, choice)
    return choice


def restore_layers(model: nn.Module, chosen: Sequence[int], choice: dict[str, Any] | None = None) -> None:
    """Turn the converted layers `chosen` of a converted model back into softmax attention (their
    feature maps are dropped) and record them in the spec's softmax_layers (with `choice`, if given)."""
    layers = decoder_layers(model)
    for i in chosen:
        if not 0 <= i < len(layers):
            raise ValueError(f"softmax_layers has layer {i}; valid layers are 0..{len(layers) - 1}")
        if isinstance(layers[i].self_attn, SkippedAttention):
            raise ValueError(f"layer {i}'s attention sublayer is skipped: it cannot be kept as softmax")
        if isinstance(layers[i].self_attn, RecurrentAttention):
            layers[i].self_attn = softmax_attention(model, i, layers[i].self_attn)
    spec = recorded_spec(model)
    spec.softmax_layers = sorted(set(spec.softmax_layers) | set(chosen))
    if choice is not None:
        spec.softmax_choice = choice
    record_spec(model, spec)
