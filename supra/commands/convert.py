"""`supra convert`: swap softmax attention for recurrent attention (untrained) and save the model."""

from __future__ import annotations

import json

from omegaconf import DictConfig
from rich.table import Table

from ..config import run_dir, save_snapshot
from ..convert import convert_model
from ..errors import check_output_dir
from ..layers.linearize import recorded_spec
from ..models import count_parameters, save_model
from .common import console, load_model_and_tokenizer


def run(cfg: DictConfig) -> int:
    out = run_dir(cfg, f"runs/{cfg.recipe or 'model'}-{cfg.method}")
    check_output_dir(out, cfg.overwrite)
    model, tokenizer = load_model_and_tokenizer(cfg)
    convert_model(model, cfg, tokenizer)
    save_model(model, tokenizer, out, cfg.overwrite)
    save_snapshot(cfg, out, "convert")
    spec = recorded_spec(model)
    choice = spec.softmax_choice
    if choice is not None:  # softmax_layers=auto:K: the measurement, beside the model (as skip.json)
        (out / "softmax_layers.json").write_text(json.dumps({"model": cfg.model, "method": cfg.method, **choice},
                                                            indent=2))
    counts = count_parameters(model)
    table = Table(title=f"converted {cfg.model} -> {out}")
    for column in ("method", "total params", "new params", "softmax layers", "skipped layers"):
        table.add_column(column)
    table.add_row(cfg.method, f"{counts['total']:,}", f"{counts['new']:,}",
                  str(spec.softmax_layers), str(spec.skip_layers))
    console.print(table)
    return 0
