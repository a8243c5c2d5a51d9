"""How a recipe's token budgets turn into steps, and what a run will cost (the dry run)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..layers.linearize import new_parameter_names
from .settings import StageConfig, TrainConfig
from .stages import stage_loop, trained_set


@dataclass
class StagePlan:
    name: str
    steps: int  # optimizer steps, epochs included
    accumulation: int
    tokens_per_step: int
    epochs: int = 1
    chunk_steps: int = 0  # cached transfer: steps per pass over one cached chunk

    @property
    def tokens(self) -> int:
        """Tokens drawn from the data (each used `epochs` times)."""
        return self.steps * self.tokens_per_step // self.epochs


def plan_stages(train: TrainConfig, seq_len: int, world_size: int) -> list[StagePlan]:
    """Gradient accumulation is derived from batch_tokens, rows per micro-batch of seq_len tokens and
    the world size (rounded to the nearest whole number; the plan reports the batch it really uses)."""
    tokens_per_micro = train.micro_batch_size * seq_len * world_size
    accumulation = max(1, round(train.batch_tokens / tokens_per_micro))
    tokens_per_step = accumulation * tokens_per_micro
    plans = []
    for stage in train.stages:
        steps = math.ceil(stage.tokens / tokens_per_step)
        if stage_loop(stage) == "cached":  # whole chunks of cached steps, each trained `epochs` times
            chunk_steps = max(1, round(stage.cache_tokens / tokens_per_step))
            chunks = math.ceil(steps / chunk_steps)
            plans.append(StagePlan(stage.name, chunks * chunk_steps * stage.epochs, accumulation, tokens_per_step,
                                   stage.epochs, chunk_steps))
        else:
            plans.append(StagePlan(stage.name, steps, accumulation, tokens_per_step))
    return plans


def trainable_parameters(model: nn.Module, stage: StageConfig) -> int:
    """Counted on the converted model without building LoRA modules (works on the meta device)."""
    which = trained_set(stage)
    if which == "all":
        return sum(p.numel() for p in model.parameters())
    if which == "new":
        new = set(new_parameter_names(model))
        return sum(p.numel() for n, p in model.named_parameters() if n in new)
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in stage.lora_targets and hasattr(module, "in_features"):
            total += stage.lora_r * (module.in_features + module.out_features)
    return total


def memory_per_gpu_gb(model: nn.Module, train: TrainConfig, seq_len: int, world_size: int, trainable: int) -> float:
    """FSDP2 estimate: float32 sharded parameters, gradients and AdamW moments of the trainable
    ones, one gathered layer in bf16, plus activations of one micro-batch (checkpointed: one layer's
    input per layer; otherwise ~34 values per token and hidden unit per layer, Korthikanti et al.)."""
    params = sum(p.numel() for p in model.parameters())
    config = model.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    sharded = (4 * params + 12 * trainable) / world_size
    gathered_layer = 2 * params / layers
    tokens = train.micro_batch_size * seq_len
    per_layer = 2 * tokens * hidden if train.activation_checkpointing else 34 * tokens * hidden
    logits = 4 * tokens * config.vocab_size * 2
    return (sharded + 2 * gathered_layer + layers * per_layer + logits) / 1e9
