"""Uptraining stages as data: which parameters train, and the loss of one micro-batch.

- attention_transfer (LoLCATs stage 1): base frozen; feature maps (+ window factors) learn to
  reproduce each layer's softmax output, MSE summed over layers, x1000, teacher-forced.
- lora (LoLCATs stage 2): peft LoRA adapters on the attention projections; next-token loss;
  merged into the weights when the run's model is saved.
- full (SUPRA): every parameter; next-token loss.
- distill (RADLADS, hybrid-distillation): `train: lora | new | all`; KL divergence from the
  teacher's next-token distribution, optionally mixed with next-token loss (`ce_weight`). The teacher
  is the same model with softmax attention and no adapters (`teacher_mode`): no second copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ..data.packing import IGNORE_INDEX
from ..layers.attention import RecurrentAttention, teacher_only
from ..layers.factorized import FACTORIZED, factor_parameter_names
from ..layers.linearize import new_parameter_names

TRANSFER_LOSS_SCALE = 1000.0  # LoLCATs multiplies the attention MSE by 1000


def add_lora(model: nn.Module, stages: list[DictConfig]) -> nn.Module:
    """Wrap the model with LoRA adapters up front when a stage trains them. B starts at zero, so
    the adapters change nothing until their stage, and the module tree (which FSDP shards once)
    stays the same for the whole run."""
    lora = next((s for s in stages if trains_lora(s)), None)
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    targets = list(lora.lora_targets)
    if any(isinstance(m, FACTORIZED) for m in model.modules()):  # peft cannot wrap those; their factors
        targets = [name for name, m in model.named_modules()  # train in the lora stage instead
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
        if not targets:
            return model
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=targets, bias="none")
    return get_peft_model(model, config)


def trains_lora(stage: DictConfig) -> bool:
    return stage.name == "lora" or (stage.name == "distill" and stage.train == "lora")


def trained_set(stage: DictConfig) -> str:
    """new (feature maps, window factors), lora (adapters) or all, for every stage."""
    return {"attention_transfer": "new", "lora": "lora", "full": "all"}.get(stage.name) or stage.train


def set_trainable(model: nn.Module, stage: DictConfig) -> None:
    which = trained_set(stage)
    if which == "new":
        new = set(new_parameter_names(model))
        if not new:
            raise ValueError(f"{stage.name} has nothing to train: the model has no converted layers")
        trainable = lambda name: name in new
    elif which == "lora":  # LoRA adapters, and the factors of factorized layers (low-rank already)
        factors = set(factor_parameter_names(model))
        trainable = lambda name: "lora_" in name or name in factors
    else:
        trainable = lambda name: True
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))


def merge_lora(model: nn.Module) -> nn.Module:
    """Plain weights for saving and export: W + (alpha / r) B A folded in."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def recurrent_layers(model: nn.Module) -> list[RecurrentAttention]:
    return [m for m in model.modules() if isinstance(m, RecurrentAttention)]


def micro_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], stage: DictConfig, loss_scale: float,
                     layerwise: bool) -> torch.Tensor:
    """Backpropagate the loss of one micro-batch (scaled by loss_scale); returns it, detached.

    Attention transfer needs no LM head (logits for one position only). With `layerwise`, each
    layer's backward runs as soon as its loss exists, so one layer's graph is alive at a time;
    under FSDP, whose gradient-reduction hooks expect one backward per forward, the layer losses
    are summed and backpropagated together."""
    if stage.name == "distill":
        loss = distill_loss(model, batch, stage.ce_weight)
        (loss * loss_scale).backward()
        return loss.detach()
    if stage.name != "attention_transfer":
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     labels=batch["labels"], use_cache=False).loss
        (loss * loss_scale).backward()
        return loss.detach()

    with transfer_losses(recurrent_layers(model), loss_scale, layerwise) as losses:
        with torch.set_grad_enabled(not layerwise):
            # Through the root module (FSDP's hooks live there); logits for one position only.
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           logits_to_keep=1).logits
    if not layerwise:
        (logits.float().sum() * 0).backward()  # reaches every AttachLoss through the residual stream
    return torch.stack(losses).sum() * TRANSFER_LOSS_SCALE


@contextmanager
def teacher_mode(model: nn.Module) -> Iterator[None]:
    """The original model, without a second copy of its weights: every converted layer computes the
    softmax attention it replaced, and LoRA adapters (if any) are off."""
    with teacher_layers(recurrent_layers(model)):
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield


@contextmanager
def teacher_layers(layers: list[RecurrentAttention]) -> Iterator[None]:
    """The converted `layers` compute the softmax attention they replaced, and nothing else."""
    for layer in layers:
        layer.transfer = teacher_only
    try:
        yield
    finally:
        for layer in layers:
            layer.transfer = None


def distill_loss(model: nn.Module, batch: dict[str, torch.Tensor], ce_weight: float) -> torch.Tensor:
    """Mean over scored positions of KL(teacher || student) on the next-token distribution, mixed
    with the next-token cross-entropy as (1 - ce_weight) KL + ce_weight CE. Positions whose next
    token starts a document (labels -100 after the shift) are not scored, as in the next-token loss."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    with torch.no_grad(), teacher_mode(model):
        teacher = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    student = F.log_softmax(model(**inputs).logits[:, :-1].float(), dim=-1)
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    kl = (teacher.exp() * (teacher - student)).sum(-1)[scored].mean()
    if not ce_weight:
        return kl
    ce = F.nll_loss(student[scored], targets[scored])
    return (1 - ce_weight) * kl + ce_weight * ce


@contextmanager
def transfer_losses(layers: list[RecurrentAttention], loss_scale: float, layerwise: bool) -> Iterator[list]:
    """Put `layers` in attention-transfer mode; yields the list their (detached) MSEs land in.
    Layerwise, each loss is backpropagated at once; otherwise it is attached to the layer's output."""
    losses: list[torch.Tensor] = []

    def collect(loss: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        losses.append(loss.detach())
        scaled = loss * TRANSFER_LOSS_SCALE * loss_scale
        if layerwise:
            scaled.backward()
            return output
        return AttachLoss.apply(output, scaled)

    for layer in layers:
        layer.transfer = collect
    try:
        yield losses
    finally:
        for layer in layers:
            layer.transfer = None


class AttachLoss(torch.autograd.Function):
    """Identity on `output` whose backward also gives `loss` a gradient of one. Under FSDP the
    gradient must flow through each layer's output for its hooks to reduce the layer's gradients;
    attaching the layer's loss to its output routes the transfer loss that way."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.loss_meta
        return grad_output, torch.ones(shape, dtype=dtype, device=device)
