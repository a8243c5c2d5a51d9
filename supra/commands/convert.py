"""`supra convert`: swap softmax attention for recurrent attention (untrained) and save the model."""

from __future__ import annotations

from omegaconf import DictConfig
from rich.table import Table

from ..build import build_model
from ..config import run_dir, save_snapshot
from ..errors import check_output_dir
from ..models import count_parameters, save_model
from .common import console, load_model_and_tokenizer, write_softmax_choice
from .settings import build_plan, calibration


def run(cfg: DictConfig) -> int:
    out = run_dir(cfg, f"runs/{cfg.recipe or 'model'}-{cfg.method}")
    check_output_dir(out, cfg.overwrite)
    model, tokenizer = load_model_and_tokenizer(cfg)
    model, spec = build_model(model, build_plan(cfg), calibration(cfg, tokenizer), console.print)
    save_model(model, tokenizer, out, cfg.overwrite)
    save_snapshot(cfg, out, "convert")
    if spec.softmax_choice is not None:
        write_softmax_choice(out, cfg, spec.softmax_choice)
    counts = count_parameters(model)
    table = Table(title=f"converted {cfg.model} -> {out}")
    for column in ("method", "total params", "new params", "softmax layers", "skipped layers"):
        table.add_column(column)
    table.add_row(spec.method, f"{counts['total']:,}", f"{counts['new']:,}",
                  str(spec.softmax_layers), str(spec.skip_layers))
    console.print(table)
    return 0
