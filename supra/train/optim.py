"""The optimizer of a stage and its one step, shared by every training loop (whole model, cached
transfer, block-wise transfer)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .settings import StageConfig


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to floor (= min_lr / lr) at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, stage: StageConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
    floor = stage.min_lr / stage.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, stage.warmup_steps, steps, floor))
    return optimizer, scheduler


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any | None, loss: float,
                   grad_clip: float) -> float:
    """Clip the accumulated gradients of `model`'s trainable parameters; when loss and gradient are
    finite, step the optimizer and the schedule (a skipped step does not advance the learning rate;
    None: no schedule, as in a benchmark's steps). Returns the gradient norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if finite and scheduler is not None:
        scheduler.step()
    return grad_norm
