"""Conversion as a library: what `supra convert`, `supra uptrain` and the scripts call.

`convert_model(model, cfg, tokenizer)` applies a config's conversion keys to a loaded model: the
attention sublayers to skip (`skip_layers`, or `n` chosen by `select`), then `linearize` with the
config's method, or with `softmax_layers=auto:K` the hybrid whose K softmax layers are measured
(softmax_select.py); on a model already converted (and trained), `softmax_layers` turns layers back
into softmax attention. The layer swap itself is `layers/linearize.py`.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import ConfigError, linearize_spec
from .layers.linearize import LinearizeSpec, linearize, recorded_spec
from .models import SourceError
from .skip import apply_skip, calibration_batches, select_and_skip
from .softmax_select import choose_softmax_layers, parse_auto, restore_layers, restore_softmax_layers


def convert_model(model: nn.Module, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                  report: Callable[[str], None] | None = None) -> nn.Module:
    """Linearize per the config. A model that was only skipped (method=softmax) keeps its skips;
    one already linearized is refused, since converting twice would stack feature maps, unless
    method=softmax asks for no conversion: then it stays as it is (its record too), or
    `softmax_layers` asks for some of its layers back as softmax attention (a list, or auto:K
    measured on it as a trained student: `_restore_softmax`).

    With `n > 0` the config also asks for n attention sublayers removed by `select`; they are chosen
    on the softmax model, before conversion (as `supra skip` would), which needs the tokenizer for
    the calibration text. So does `softmax_layers=auto:K` (supra/softmax_select.py), measured on the
    converted model; the choice is recorded in the spec (`recorded_spec(model).softmax_choice`)."""
    previous = recorded_spec(model)
    check_convertible(previous, cfg)
    if cfg.n > 0:
        if tokenizer is None:
            raise ConfigError(f"n={cfg.n} (skip by select={cfg.select}) needs calibration text here; "
                              "run `supra skip` first and convert its output")
        select_and_skip(model, tokenizer, cfg)
        previous = recorded_spec(model)
    if previous is not None and previous.method != "softmax" and cfg.softmax_layers:
        # The method keys describe a conversion from softmax; on a converted model (whatever the
        # recipe's method) softmax_layers can only mean layers given back their softmax attention.
        return _restore_softmax(model, cfg, tokenizer, report)
    spec = linearize_spec(cfg)
    if previous is not None:
        if previous.method != "softmax":  # method=softmax: it stays converted (e.g. to be healed)
            return apply_skip(model, list(spec.skip_layers))
        spec.skip_layers = sorted(set(spec.skip_layers) | set(previous.skip_layers))
        spec.factorized = previous.factorized
    try:
        auto = parse_auto(cfg.softmax_layers)
        if auto is None:
            return linearize(model, spec)
        if tokenizer is None:
            raise _no_calibration_text(cfg)
        choice = choose_softmax_layers(model, spec, auto, calibration_batches(tokenizer, cfg, cfg.eval.batch_size))
    except ValueError as err:  # e.g. a layer index the model does not have
        raise ConfigError(str(err)) from None
    # Recorded in cfg too, so that a second conversion in this process (uptrain's final merge)
    # rebuilds the same hybrid without measuring.
    cfg.softmax_layers = choice["chosen"]
    return model


def check_convertible(previous: LinearizeSpec | None, cfg: DictConfig) -> None:
    """Refuse to convert a model that is already converted (`previous`: its recorded spec); commands
    call this before writing anything. softmax_layers on it gives layers back their softmax attention,
    and method=softmax keeps it as it is (to train it further)."""
    if previous is None or previous.method == "softmax":
        return
    if cfg.n > 0:
        raise SourceError(f"model {cfg.model} is already converted (method={previous.method}); skip layers of the "
                          "original model (n=...) before converting it, or pass n=0")
    if cfg.method != "softmax" and not cfg.softmax_layers:
        raise SourceError(f"model {cfg.model} is already converted (method={previous.method}); pass method=softmax "
                          "to keep training it as it is, or convert the original model instead")


def _restore_softmax(model: nn.Module, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase | None,
                     report: Callable[[str], None] | None) -> nn.Module:
    """softmax_layers on a model that is already converted: those layers become softmax attention
    again; with auto:K, the K whose restoration lowers the KL to the model's teacher most
    (softmax_select.restore_softmax_layers: the measure of a trained student)."""
    auto = parse_auto(cfg.softmax_layers)
    if cfg.skip_layers:
        apply_skip(model, list(cfg.skip_layers))
    if auto is not None and tokenizer is None:
        raise _no_calibration_text(cfg)
    try:
        if auto is None:
            restore_layers(model, list(cfg.softmax_layers))
            return model
        restore_softmax_layers(model, auto, calibration_batches(tokenizer, cfg, cfg.eval.batch_size), report)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg.softmax_layers = recorded_spec(model).softmax_layers  # a second conversion (uptrain's merge) measures nothing
    return model


def _no_calibration_text(cfg: DictConfig) -> ConfigError:
    return ConfigError(f"softmax_layers={cfg.softmax_layers} measures layers on calibration text here; "
                       "run `supra convert` with it first and use its output")
