"""`supra eval model=... tasks=[...]`: score any model source; results go to <out>/eval.json.

Tasks: `ppl` (held-out perplexity, by position bucket). Each task is a function
(model, tokenizer, cfg, out_dir) -> (results dict, table rows) registered in TASKS.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError, run_dir, save_snapshot
from ..data import iter_documents
from ..evaluate.perplexity import heldout_stream, perplexity
from .common import console, load_model_and_tokenizer, update_json

Rows = list[tuple[str, str]]
Task = Callable[[nn.Module, PreTrainedTokenizerBase, DictConfig, Path], tuple[dict, Rows]]


def ppl_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, out: Path) -> tuple[dict, Rows]:
    stream = heldout_stream(tokenizer, iter_documents(cfg.data, "heldout"), cfg.eval.max_tokens)
    result = perplexity(model, stream, cfg.seq_len, cfg.eval.batch_size)
    rows = [("perplexity", f"{result['ppl']:.3f}"), ("tokens scored", f"{result['tokens']:,}")]
    rows += [(f"  ppl at positions {b['start']}-{b['end']}", f"{b['ppl']:.3f}") for b in result["by_position"]]
    return result, rows


TASKS: dict[str, Task] = {"ppl": ppl_task}


def task_function(name: str) -> Task:
    base = name.split(":", 1)[0]
    if base not in TASKS:
        raise ConfigError(f"unknown eval task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[base]


def default_out(cfg: DictConfig) -> str:
    """Beside a supra model directory; otherwise runs/eval-<model name>."""
    path = Path(cfg.model).expanduser()
    if path.is_dir() and any(path.glob("*.config.yaml")):
        return str(path)
    return "runs/eval-" + re.sub(r"[^A-Za-z0-9._-]+", "_", path.name or cfg.model)


def run(cfg: DictConfig) -> int:
    functions = [(name, task_function(name)) for name in cfg.tasks]  # refuse bad names before loading
    out = run_dir(cfg, default_out(cfg))
    model, tokenizer = load_model_and_tokenizer(cfg)
    model.eval()
    save_snapshot(cfg, out, "eval")
    table = Table(title=f"supra eval: {cfg.model}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    results = {}
    for name, function in functions:
        start = time.perf_counter()
        result, rows = function(model, tokenizer, cfg, out)
        result["seconds"] = round(time.perf_counter() - start, 2)
        results[name] = {"model": cfg.model, **result}
        for metric, value in rows:
            table.add_row(name, metric, value)
    update_json(out / "eval.json", results)
    console.print(table)
    console.print(f"results: {out / 'eval.json'}")
    return 0
