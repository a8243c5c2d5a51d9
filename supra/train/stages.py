"""Uptraining stages as data: one registry of stage kinds (`STAGE_KINDS`), each owning its settings
(validated by `check_stage`), which parameters train, the loss of one micro-batch, its FLOPs per
token and parameter, and the loop that runs it (trainer.LOOPS).

- attention_transfer (LoLCATs stage 1): base frozen; feature maps (+ window factors) learn to
  reproduce each layer's softmax output, MSE summed over layers, x1000, teacher-forced.
- lora (LoLCATs stage 2): peft LoRA adapters on the attention projections; next-token loss;
  merged into the weights when the run's model is saved.
- full (SUPRA): every parameter; next-token loss.
- distill (RADLADS, hybrid-distillation): `train: lora | new | all`; KL divergence from the
  teacher's next-token distribution, optionally mixed with next-token loss (`ce_weight`). The teacher
  is the same model with softmax attention and no adapters (`teacher_mode`): no second copy.

Adding a kind: its loss function and a `StageKind` entry here; settings only it reads are fields of
`settings.StageConfig` (with a range in config.RANGES if numeric) named in the entry's `fields`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import IGNORE_INDEX
from ..layers.attention import RecurrentAttention
from ..layers.factorized import FACTORIZED, factor_parameter_names
from ..layers.linearize import new_parameter_names
from .settings import StageConfig
from .transfer import reported_transfer_loss, teacher_layers, transfer_losses


@dataclass(frozen=True)
class LoraSpec:
    """The adapters of the first stage that trains LoRA (peft's r, alpha, dropout, target names)."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @classmethod
    def of_stages(cls, stages: Sequence[StageConfig]) -> LoraSpec | None:
        stage = next((s for s in stages if trained_set(s) == "lora"), None)
        if stage is None:
            return None
        return cls(stage.lora_r, stage.lora_alpha, stage.lora_dropout, tuple(stage.lora_targets))


def add_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """Wrap the model with LoRA adapters up front when a stage trains them. B starts at zero, so
    the adapters change nothing until their stage, and the module tree (which FSDP shards once)
    stays the same for the whole run."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.targets)
    if any(isinstance(m, FACTORIZED) for m in model.modules()):  # peft cannot wrap those; their factors
        targets = [name for name, m in model.named_modules()  # train in the lora stage instead
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
        if not targets:
            return model
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none")
    return get_peft_model(model, config)


def trained_set(stage: StageConfig) -> str:
    """new (feature maps, window factors), lora (adapters) or all, for every stage."""
    return STAGE_KINDS[stage.name].trains(stage)


def set_trainable(model: nn.Module, stage: StageConfig) -> None:
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


def fold_lora(model: nn.Module) -> nn.Module:
    """Plain weights for saving and export: W + (alpha / r) B A folded in."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def recurrent_layers(model: nn.Module) -> list[RecurrentAttention]:
    return [m for m in model.modules() if isinstance(m, RecurrentAttention)]


def micro_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], stage: StageConfig, loss_scale: float,
                     layerwise: bool) -> torch.Tensor:
    """Backpropagate the loss of one micro-batch (scaled by loss_scale); returns it, detached."""
    return STAGE_KINDS[stage.name].loss(model, batch, stage, loss_scale, layerwise)


def next_token_micro_loss(model: nn.Module, batch: dict[str, torch.Tensor], stage: StageConfig, loss_scale: float,
                          layerwise: bool) -> torch.Tensor:
    loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 use_cache=False).loss
    (loss * loss_scale).backward()
    return loss.detach()


def distill_micro_loss(model: nn.Module, batch: dict[str, torch.Tensor], stage: StageConfig, loss_scale: float,
                       layerwise: bool) -> torch.Tensor:
    loss = distill_loss(model, batch, stage.ce_weight)
    (loss * loss_scale).backward()
    return loss.detach()


def transfer_micro_loss(model: nn.Module, batch: dict[str, torch.Tensor], stage: StageConfig, loss_scale: float,
                        layerwise: bool) -> torch.Tensor:
    """Attention transfer needs no LM head (logits for one position only). With `layerwise`, each
    layer's backward runs as soon as its loss exists, so one layer's graph is alive at a time;
    under FSDP, whose gradient-reduction hooks expect one backward per forward, the layer losses
    are summed and backpropagated together."""
    with transfer_losses(recurrent_layers(model), loss_scale, layerwise) as losses:
        with torch.set_grad_enabled(not layerwise):
            # Through the root module (FSDP's hooks live there); logits for one position only.
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           logits_to_keep=1).logits
    if not layerwise:
        (logits.float().sum() * 0).backward()  # reaches every AttachLoss through the residual stream
    return reported_transfer_loss(losses)


@contextmanager
def teacher_mode(model: nn.Module) -> Iterator[None]:
    """The original model, without a second copy of its weights: every converted layer computes the
    softmax attention it replaced, and LoRA adapters (if any) are off."""
    with teacher_layers(recurrent_layers(model)):
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield


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


def _one_of(what: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def _check_transfer(stage: StageConfig) -> None:
    from ..models import DTYPES

    if stage.cache_tokens and stage.block_layers:
        raise ValueError(f"stage {stage.name}: cache_tokens is for attention_transfer without block_layers")
    _one_of(f"stage {stage.name} cache_dtype", stage.cache_dtype, tuple(DTYPES))


def _check_distill(stage: StageConfig) -> None:
    _one_of(f"stage {stage.name} train", stage.train, ("lora", "new", "all"))


def _transfer_loop(stage: StageConfig) -> str:
    return "blockwise" if stage.block_layers else "cached" if stage.cache_tokens else "plain"


@dataclass(frozen=True)
class StageKind:
    """Everything one kind of stage decides: the settings only it reads (`fields`, checked by
    `check`), which parameters train (new | lora | all), the loss of a micro-batch, the training
    FLOPs per token and parameter (plan.py: the dry run and MFU) and the loop that runs it
    (trainer.py: plain, cached or blockwise)."""

    trains: Callable[[StageConfig], str]
    loss: Callable[..., torch.Tensor]
    flops_per_param: float
    fields: tuple[str, ...] = ()
    check: Callable[[StageConfig], None] = lambda stage: None
    loop: Callable[[StageConfig], str] = lambda stage: "plain"


# Training FLOPs per token and parameter: forward 2, backward 4; LoRA skips the base weights'
# gradients (about 2 of the 4); attention transfer runs the forward and only the maps' backward;
# distillation adds the teacher's forward to a LoRA-like step (an upper bound for train=new).
STAGE_KINDS: dict[str, StageKind] = {
    "attention_transfer": StageKind(lambda stage: "new", transfer_micro_loss, 2.0,
                                    ("block_layers", "cache_tokens", "epochs", "cache_dtype"), _check_transfer,
                                    _transfer_loop),
    "lora": StageKind(lambda stage: "lora", next_token_micro_loss, 4.0),
    "full": StageKind(lambda stage: "all", next_token_micro_loss, 6.0),
    "distill": StageKind(lambda stage: stage.train, distill_micro_loss, 6.0, ("train", "ce_weight"), _check_distill),
}


def check_stage(stage: StageConfig) -> None:
    """ValueError naming what is wrong: an unknown kind, a setting another kind owns changed from its
    default, or the kind's own check."""
    _one_of("stage name", stage.name, tuple(STAGE_KINDS))
    kind, defaults = STAGE_KINDS[stage.name], StageConfig()
    for other, owner in STAGE_KINDS.items():
        for name in owner.fields:
            if other != stage.name and name not in kind.fields and getattr(stage, name) != getattr(defaults, name):
                raise ValueError(f"stage {stage.name}: {name} is for {other} only")
    kind.check(stage)


def stage_loop(stage: StageConfig) -> str:
    return STAGE_KINDS[stage.name].loop(stage)
