"""`supra factorize model=... factorize.method=low_rank|tensor_train factorize.ratio=F out=DIR`.

Replaces the Linear layers `factorize.targets` selects (default mlp.*, every layer) by low-rank
factors or tensor-train cores and saves the model; the model may be an original, a converted or a
skipped one. Per-layer layouts and errors go to <out>/factorize.json. Heal it with `supra uptrain`
(the same `factorize` keys there factorize before the stages).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table

from ..config import ConfigError, factorize_spec, run_dir, save_snapshot
from ..factorize import factorize_model
from ..models import SourceError, count_parameters, save_model
from .common import console, load_model_and_tokenizer
from .settings import calibration


def default_out(cfg: DictConfig) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(cfg.model).expanduser().name or cfg.model)
    amount = f"r{cfg.factorize.rank}" if cfg.factorize.rank is not None else f"p{cfg.factorize.ratio}"
    return f"runs/{name}-{cfg.factorize.method}-{amount}"


def run(cfg: DictConfig) -> int:
    spec = factorize_spec(cfg)
    if spec.method == "none":
        raise ConfigError("nothing to factorize: set factorize.method=low_rank or tensor_train "
                          "and factorize.rank=R or factorize.ratio=F")
    out = run_dir(cfg, default_out(cfg))
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise SourceError(f"output directory {out} exists and is not empty; pass overwrite=true or another out=")
    model, tokenizer = load_model_and_tokenizer(cfg)
    model.eval()
    before = count_parameters(model)["total"]
    report = factorize_model(model, spec, calibration(cfg, tokenizer)() if spec.activation_aware else None)
    save_model(model, tokenizer, out, cfg.overwrite)
    save_snapshot(cfg, out, "factorize")
    after = count_parameters(model)["total"]
    (out / "factorize.json").write_text(json.dumps({
        "model": cfg.model, "spec": asdict(spec), "parameters_before": before, "parameters_after": after,
        "layers": [asdict(r) for r in report]}, indent=2))

    table = Table(title=f"supra factorize {cfg.model}: {spec.method} -> {out}")
    for column in ("layer", "layout", "params kept", "relative error"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    for r in report:
        shape = (f"rank {r.layout['rank']}" if r.layout["kind"] == "low_rank"
                 else f"{r.layout['out_modes']}x{r.layout['in_modes']} ranks {r.layout['ranks']}")
        table.add_row(r.name, shape, f"{r.parameters / r.dense_parameters:.1%}", f"{r.relative_error:.4f}")
    console.print(table)
    console.print(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
    return 0
