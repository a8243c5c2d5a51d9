"""`supra export model=<run, checkpoint or model> out=DIR [step=N] [dtype=bfloat16] [merge_lora=true]`.

A run directory exports its final model, or with step=N (or while it has none) a saved checkpoint.

Writes a Hugging Face directory (safetensors, tokenizer, config.json with auto_map, and the
modeling code) that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads
with torch and transformers alone; see supra/export.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table

from ..config import run_dir, save_snapshot
from ..errors import check_output_dir
from ..export import export, merge_lora
from ..layers.linearize import recorded_spec
from ..models import count_parameters, resolve_source
from .common import checkpoint_run, console, load_model_and_tokenizer


def default_out(cfg: DictConfig) -> str:
    name = Path(cfg.model).expanduser().name or cfg.model
    return f"runs/{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-hf"


def run(cfg: DictConfig) -> int:
    out = run_dir(cfg, default_out(cfg))
    check_output_dir(out, cfg.overwrite)  # before the (slow) load
    from_checkpoint = checkpoint_run(cfg) is not None  # LoRA already merged by the checkpoint's loading
    model, tokenizer = load_model_and_tokenizer(cfg)
    source_dir = Path(resolve_source(cfg.model)[0]) if cfg.model != "random" and not from_checkpoint else None
    if cfg.merge_lora:
        model = merge_lora(model, source_dir if source_dir is not None and source_dir.is_dir() else None)
    export(model.eval(), tokenizer, out, cfg.dtype, cfg.overwrite)
    save_snapshot(cfg, out, "export")
    spec = recorded_spec(model)  # export() records one
    counts = count_parameters(model)
    table = Table(title=f"exported {cfg.model} -> {out}")
    for column in ("method", "dtype", "params", "softmax layers", "skipped layers"):
        table.add_column(column)
    table.add_row(spec.method, cfg.dtype, f"{counts['total']:,}", str(spec.softmax_layers), str(spec.skip_layers))
    console.print(table)
    console.print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0
