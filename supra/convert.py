"""A recipe's model build: its conversion keys read into a `build.BuildPlan`, once.

The steps themselves (skip, linearize or restore, softmax layers chosen by measurement, factorize,
LoRA) are `supra/build.py`, which takes the typed plan; this module is the one place that knows
which recipe keys feed which step, and where the calibration text comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from .build import BuildPlan, Calibration, build_model
from .config import factorize_spec, linearize_spec
from .layers.linearize import set_cache_budget
from .layers.specs import FactorizeSpec, parse_auto
from .train.stages import LoraSpec


def build_plan(cfg: DictConfig, factorize: bool = False, lora: bool = False) -> BuildPlan:
    """The recipe's conversion (skip, method, softmax layers); with `factorize`, its `factorize`
    section (uptrain: after conversion, before the stages); with `lora`, the adapters of its first
    stage that trains them."""
    return BuildPlan(conversion=linearize_spec(cfg), softmax_auto=parse_auto(cfg.softmax_layers), n=cfg.n,
                     select=cfg.select, factorize=factorize_spec(cfg) if factorize else FactorizeSpec(),
                     lora=LoraSpec.of_stages(list(cfg.train.stages)) if lora else None, source=cfg.model)


def student_plan(plan: BuildPlan) -> BuildPlan:
    """What uptrain's stages train: with softmax_layers=auto:K every layer converted (the K softmax
    layers are chosen on the trained student, after the stages), and no sparse cache: it is
    training-free (LoLA), and training through it cost ~5x per step on CPU
    (benchmarks/results/cpu/sparse_cache_budgets.json), so the trained model takes it at the end
    (`with_cache`)."""
    conversion = plan.conversion and replace(plan.conversion, cache_budget=0)
    return replace(plan, softmax_auto=None, conversion=conversion)


def with_cache(model: nn.Module, plan: BuildPlan) -> nn.Module:
    """A trained student with the plan's sparse cache (`student_plan` trains without it)."""
    if plan.conversion is not None and plan.conversion.cache_budget:
        set_cache_budget(model, plan.conversion.cache_budget)
    return model


def calibration(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase | None) -> Calibration | None:
    """The recipe's calibration text (`calibration_tokens` of training text), when a tokenizer is at hand."""
    from .skip import calibration_batches  # supra.skip imports the data pipeline

    if tokenizer is None:
        return None
    return lambda: calibration_batches(tokenizer, cfg, cfg.eval.batch_size)


def convert_model(model: nn.Module, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                  report: Callable[[str], None] | None = None) -> nn.Module:
    """The recipe's conversion of `model` (what `supra convert` does before saving)."""
    return build_model(model, build_plan(cfg), calibration(cfg, tokenizer), report)[0]
