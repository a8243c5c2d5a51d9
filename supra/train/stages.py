"""Uptraining stages as data: which parameters train, and the loss of one micro-batch.

- attention_transfer (LoLCATs stage 1): base frozen; feature maps (+ window factors) learn to
  reproduce each layer's softmax output, MSE summed over layers, x1000, teacher-forced.
- lora (LoLCATs stage 2): peft LoRA adapters on the attention projections; next-token loss;
  merged into the weights when the run's model is saved.
- full (SUPRA): every parameter; next-token loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from ..layers.attention import RecurrentAttention
from ..layers.linearize import new_parameter_names

TRANSFER_LOSS_SCALE = 1000.0  # LoLCATs multiplies the attention MSE by 1000


def add_lora(model: nn.Module, stages: list[DictConfig]) -> nn.Module:
    """Wrap the model with LoRA adapters up front when a stage trains them. B starts at zero, so
    the adapters change nothing until their stage, and the module tree (which FSDP shards once)
    stays the same for the whole run."""
    lora = next((s for s in stages if s.name == "lora"), None)
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=list(lora.lora_targets), bias="none")
    return get_peft_model(model, config)


def set_trainable(model: nn.Module, stage: DictConfig) -> None:
    if stage.name == "attention_transfer":
        new = set(new_parameter_names(model))
        if not new:
            raise ValueError("attention_transfer has nothing to train: the model has no converted layers")
        trainable = lambda name: name in new
    elif stage.name == "lora":
        trainable = lambda name: "lora_" in name
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
                     backward_now: bool) -> torch.Tensor:
    """The loss of one micro-batch, already backpropagated (scaled by loss_scale) when backward_now.

    Attention transfer stops at the last decoder layer (the LM head is not needed) and, when
    backward_now, runs each layer's backward as soon as its loss exists. Under FSDP the gradient
    reduction hooks need one backward after the forward, so there the layer losses are summed."""
    if stage.name != "attention_transfer":
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     labels=batch["labels"], use_cache=False).loss
        if backward_now:
            (loss * loss_scale).backward()
        return loss.detach() if backward_now else loss

    layers = recurrent_layers(model)
    losses: list[torch.Tensor] = []
    collect: Callable[[torch.Tensor], None]
    if backward_now:
        def collect(loss: torch.Tensor) -> None:
            (loss * TRANSFER_LOSS_SCALE * loss_scale).backward()
            losses.append(loss.detach())
    else:
        collect = losses.append
    for layer in layers:
        layer.transfer = collect
    try:
        with torch.set_grad_enabled(not backward_now):
            model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    finally:
        for layer in layers:
            layer.transfer = None
    total = torch.stack(losses).sum() * TRANSFER_LOSS_SCALE
    if not backward_now:
        return total
    return total.detach()
