"""What several commands share: the model and tokenizer a config names, and the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..models import SourceError, load_model, load_tokenizer, resolve_device

console = Console()


def load_model_and_tokenizer(cfg: DictConfig, meta: bool = False) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model of `cfg.model` on `cfg.device`, seeded so random init is reproducible."""
    torch.manual_seed(cfg.seed)
    if cfg.model == "random" and not cfg.tokenizer:
        raise SourceError("model=random needs tokenizer=<a model source> (e.g. tokenizer=smollm2-135m)")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    architecture = dict(cfg.architecture) if cfg.architecture else None
    model = load_model(cfg.model, cfg.dtype, architecture, "meta" if meta else resolve_device(cfg.device), meta)
    return model, tokenizer


def update_json(path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into a JSON file (later tasks add to earlier ones), written atomically."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return data
