"""`supra convert`: swap softmax attention for recurrent attention (untrained) and save the model."""

from __future__ import annotations

from omegaconf import DictConfig
from rich.table import Table
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError, linearize_spec, run_dir, save_snapshot
from ..layers.linearize import linearize
from ..models import SourceError, count_parameters, save_model
from ..skip import apply_skip, select_and_skip
from .common import console, load_model_and_tokenizer


def convert_model(model: nn.Module, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> nn.Module:
    """Linearize per the config. A model that was only skipped (method=softmax) keeps its skips;
    one already linearized is refused, since converting twice would stack feature maps, unless
    method=softmax asks for no conversion: then it stays as it is (its record too).

    With `n > 0` the config also asks for n attention sublayers removed by `select`; they are chosen
    on the softmax model, before conversion (as `supra skip` would), which needs the tokenizer for
    the calibration text."""
    previous = getattr(model.config, "supra", None)
    if cfg.n > 0:
        if tokenizer is None:
            raise ConfigError(f"n={cfg.n} (skip by select={cfg.select}) needs calibration text here; "
                              "run `supra skip` first and convert its output")
        if previous and previous.get("method") != "softmax":
            raise SourceError(f"model {cfg.model} is already converted (method={previous['method']}); "
                              "convert the original model instead")
        select_and_skip(model, tokenizer, cfg)
        previous = model.config.supra
    spec = linearize_spec(cfg)
    if previous:
        if previous.get("method") != "softmax" and spec.method != "softmax":
            raise SourceError(f"model {cfg.model} is already converted (method={previous['method']}); "
                              "convert the original model instead")
        if previous.get("method") != "softmax":  # method=softmax: it stays converted (e.g. to be healed)
            return apply_skip(model, list(spec.skip_layers))
        spec.skip_layers = sorted(set(spec.skip_layers) | set(previous.get("skip_layers", [])))
        spec.factorized = dict(previous.get("factorized", {}))
    try:
        return linearize(model, spec)
    except ValueError as err:  # e.g. a layer index the model does not have
        raise ConfigError(str(err)) from None


def run(cfg: DictConfig) -> int:
    out = run_dir(cfg, f"runs/{cfg.recipe or 'model'}-{cfg.method}")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise SourceError(f"output directory {out} exists and is not empty; pass overwrite=true or another out=")
    model, tokenizer = load_model_and_tokenizer(cfg)
    convert_model(model, cfg, tokenizer)
    save_model(model, tokenizer, out, cfg.overwrite)
    save_snapshot(cfg, out, "convert")
    counts = count_parameters(model)
    table = Table(title=f"converted {cfg.model} -> {out}")
    for column in ("method", "total params", "new params", "softmax layers", "skipped layers"):
        table.add_column(column)
    table.add_row(cfg.method, f"{counts['total']:,}", f"{counts['new']:,}",
                  str(list(cfg.softmax_layers)), str(list(model.config.supra["skip_layers"])))
    console.print(table)
    return 0
