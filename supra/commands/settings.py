"""A recipe read into the typed settings the library takes: the one place that knows which recipe
keys feed the model build (a `build.BuildPlan`), the calibration text, the held-out perplexity and
the training loop. Library functions take these settings, never the whole recipe; commands, and
scripts that measure a model as a command would, build them here.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..build import BuildPlan, Calibration, build_model
from ..config import factorize_spec, linearize_spec
from ..data import as_data_config
from ..evaluate.perplexity import HeldoutPerplexity
from ..layers.specs import FactorizeSpec, parse_auto
from ..skip import calibration_batches
from ..train.settings import TrainConfig, TrainSettings
from ..train.stages import LoraSpec


def train_config(cfg: DictConfig) -> TrainConfig:
    """The recipe's `train` section as the dataclass the training code takes."""
    return OmegaConf.to_object(cfg.train)


def build_plan(cfg: DictConfig, factorize: bool = False, lora: bool = False) -> BuildPlan:
    """The recipe's conversion (skip, method, softmax layers); with `factorize`, its `factorize`
    section (uptrain: after conversion, before the stages); with `lora`, the adapters of its first
    stage that trains them."""
    return BuildPlan(conversion=linearize_spec(cfg), softmax_auto=parse_auto(cfg.softmax_layers), n=cfg.n,
                     select=cfg.select, factorize=factorize_spec(cfg) if factorize else FactorizeSpec(),
                     lora=LoraSpec.of_stages(train_config(cfg).stages) if lora else None, source=cfg.model,
                     keep_cache=cfg.cache_budget is None)


def calibration(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase | None) -> Calibration | None:
    """The recipe's calibration text (`calibration_tokens` of training text in rows of seq_len,
    eval.batch_size rows a batch), read when a step measures; None without a tokenizer."""
    if tokenizer is None:
        return None
    return lambda: calibration_batches(tokenizer, as_data_config(cfg.data), cfg.calibration_tokens, cfg.seq_len,
                                       cfg.eval.batch_size)


def convert_model(model: nn.Module, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                  report: Callable[[str], None] | None = None) -> nn.Module:
    """The recipe's conversion of `model` (what `supra convert` does before saving)."""
    return build_model(model, build_plan(cfg), calibration(cfg, tokenizer), report)[0]


def heldout_perplexity(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> HeldoutPerplexity:
    """The recipe's held-out perplexity: the first eval.max_tokens of data's held-out split, in
    windows of seq_len, eval.batch_size windows a forward."""
    return HeldoutPerplexity(as_data_config(cfg.data), tokenizer, cfg.seq_len, cfg.eval.max_tokens,
                             cfg.eval.batch_size)


def train_settings(cfg: DictConfig) -> TrainSettings:
    return TrainSettings(train=train_config(cfg), data=as_data_config(cfg.data), seq_len=cfg.seq_len,
                         dtype=cfg.dtype, seed=cfg.seed, logged=OmegaConf.to_container(cfg, resolve=True))
