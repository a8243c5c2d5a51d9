"""`supra skip model=... select=similarity|last n=K out=DIR`: remove K attention sublayers and save.

The model may be an original, a converted (`supra convert`) or an already skipped one; the skipped
layers are added to the list its config records, so `supra eval`, `supra convert` (of a model that
was only skipped) and reloading all see the same model. `skip_layers=[...]` removes given layers
besides (or instead of) the n chosen ones. Scores and choices go to <out>/skip.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table

from ..config import ConfigError, linearize_spec, run_dir, save_snapshot
from ..errors import check_output_dir
from ..layers.linearize import decoder_layers, recorded_spec
from ..models import save_model
from ..skip import select_and_skip, skip_candidates
from .common import console, load_model_and_tokenizer
from .settings import calibration


def default_out(cfg: DictConfig) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.model).expanduser().name or cfg.model)
    return f"runs/{name}-skip-{cfg.select}{cfg.n}"


def run(cfg: DictConfig) -> int:
    out = run_dir(cfg, default_out(cfg))
    check_output_dir(out, cfg.overwrite)
    model, tokenizer = load_model_and_tokenizer(cfg)
    model.eval()
    if cfg.n == 0 and not cfg.skip_layers:
        available = len(skip_candidates(model))
        raise ConfigError(f"nothing to skip: set n=K with K in 1..{available}, or skip_layers=[...]")
    recorded = recorded_spec(model)
    before = set(recorded.skip_layers) if recorded is not None else set()
    softmax = linearize_spec(cfg).softmax_layers  # auto:K: none chosen yet
    result = select_and_skip(model, cfg.skip_layers, softmax, cfg.n, cfg.select, calibration(cfg, tokenizer))
    save_model(model, tokenizer, out, cfg.overwrite)
    save_snapshot(cfg, out, "skip")
    report = {"model": cfg.model, "select": cfg.select, "n": cfg.n, "calibration_tokens": cfg.calibration_tokens,
              "seq_len": cfg.seq_len, "scores": result.scores, "candidates": result.candidates,
              "chosen": result.chosen, "skip_layers": result.skip_layers}
    (out / "skip.json").write_text(json.dumps(report, indent=2))

    spec = recorded_spec(model)
    table = Table(title=f"supra skip {cfg.model}: select={cfg.select} n={cfg.n} -> {out}")
    table.add_column("layer", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("attention")
    for idx in range(len(decoder_layers(model))):
        score = f"{result.scores[idx]:.4f}" if result.scores else "-"
        if idx in result.chosen:
            status = "[bold red]skipped now[/]"
        elif idx in before:
            status = "skipped before"
        elif spec.method == "softmax" or idx in spec.softmax_layers:
            status = "softmax"
        else:
            status = spec.method
        table.add_row(str(idx), score, status)
    console.print(table)
    console.print(f"skipped layers: {result.skip_layers}; scores: {out / 'skip.json'}")
    return 0
