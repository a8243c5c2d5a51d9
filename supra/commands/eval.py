"""`supra eval model=... tasks=[...]`: score any model source; results go to <out>/eval.json.

Tasks: `ppl` (held-out perplexity, by position bucket), `lm_eval:<task,...>` (lm-evaluation-harness),
`passkey` (retrieval accuracy per context length and depth), `speed` (prefill/decode speed and
memory vs context). Each task is a function (model, tokenizer, cfg, out_dir) -> (results dict,
table rows) registered in TASKS; plots are written beside eval.json. `eval.baseline=<source>` runs
passkey and speed on a second model too (e.g. the original), for comparison.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig
from rich.table import Table
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import ConfigError, run_dir, save_snapshot
from ..evaluate import plots
from ..evaluate.passkey import passkey
from ..evaluate.speed import speed
from ..layers.linearize import LinearizeSpec, recorded_spec
from ..models import load_model, resolve_device
from .common import check_memory, console, load_model_and_tokenizer, perplexity_forward, read_json_record, update_json
from .settings import heldout_perplexity

Rows = list[tuple[str, str]]
Task = Callable[[nn.Module, PreTrainedTokenizerBase, DictConfig, Path], tuple[dict, Rows]]


def ppl_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, out: Path) -> tuple[dict, Rows]:
    result = heldout_perplexity(cfg, tokenizer)(model)
    rows = [("perplexity", f"{result['ppl']:.3f}"), ("tokens scored", f"{result['tokens']:,}")]
    rows += [(f"  ppl at positions {b['start']}-{b['end']}", f"{b['ppl']:.3f}") for b in result["by_position"]]
    plots.plot_loss_by_position(result, out / "ppl_by_position.png", label=_label(cfg.model))
    return result, rows


def lm_eval_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, out: Path,
                 names: list[str]) -> tuple[dict, Rows]:
    from ..evaluate.lm_eval_task import run_lm_eval, summarize

    results = run_lm_eval(model, tokenizer, names, include_path=cfg.eval.lm_eval_include_path,
                          limit=cfg.eval.lm_eval_limit, num_fewshot=cfg.eval.lm_eval_fewshot,
                          batch_size=cfg.eval.batch_size)
    return summarize(results)


def passkey_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, out: Path) -> tuple[dict, Rows]:
    def run_one(m: nn.Module) -> dict:
        return passkey(m, tokenizer, list(cfg.eval.passkey_lengths), list(cfg.eval.passkey_depths),
                       cfg.eval.passkey_trials, seed=cfg.seed)

    result = _with_baseline(run_one, model, cfg)
    plots.plot_passkey(result, out / "passkey.png", label=_label(cfg.model))
    rows = [("mean accuracy", f"{result['mean_accuracy']:.3f}")]
    rows += [(f"  accuracy at {n} tokens", " ".join(f"{a:.2f}" for a in row))
             for n, row in zip(result["lengths"], result["accuracy"])]
    if "baseline" in result:
        base = result["baseline"]
        plots.plot_passkey(base, out / "passkey_baseline.png", label=_label(cfg.eval.baseline))
        rows.append((f"baseline {cfg.eval.baseline} mean accuracy", f"{base['mean_accuracy']:.3f}"))
    return result, rows


def speed_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, out: Path) -> tuple[dict, Rows]:
    def run_one(m: nn.Module) -> dict:
        return speed(m, list(cfg.eval.speed_lengths), cfg.eval.speed_decode_tokens)

    result = _with_baseline(run_one, model, cfg)
    runs = {_label(cfg.model): result}
    if "baseline" in result:
        label = _label(cfg.eval.baseline)
        runs[label if label not in runs else f"{label} (baseline)"] = result["baseline"]
    plots.plot_speed(runs, out / "speed.png")
    rows = []
    for label, run in runs.items():
        for p in run["points"]:
            rows.append((f"{label} @ {p['context']}",
                         f"decode {p['decode_ms_per_token']:.2f} ms/tok, "
                         f"prefill {p['prefill_tokens_per_s']:,.0f} tok/s, "
                         f"state {p['state_bytes'] / 2**20:.2f} MiB"))
    return result, rows


def _with_baseline(run_one: Callable[[nn.Module], dict], model: nn.Module, cfg: DictConfig) -> dict:
    """run_one(model), plus run_one(baseline model) under "baseline" when eval.baseline is set."""
    result = run_one(model)
    if cfg.eval.baseline:
        baseline = load_model(cfg.eval.baseline, cfg.dtype, None, resolve_device(cfg.device)).eval()
        result["baseline"] = {"model": cfg.eval.baseline, **run_one(baseline)}
        del baseline
    return result


def _label(source: str) -> str:
    return Path(source).name or source


TASKS: dict[str, Task] = {"ppl": ppl_task, "passkey": passkey_task, "speed": speed_task}


def task_function(name: str) -> Task:
    """The function for a task name; `lm_eval:a,b` is lm-eval on tasks a and b."""
    names = lm_eval_names(name)
    if names is not None:
        return lambda model, tokenizer, cfg, out: lm_eval_task(model, tokenizer, cfg, out, names)
    if name not in TASKS:
        valid = ", ".join([*TASKS, "lm_eval:<task,...>"])
        raise ConfigError(f"unknown eval task {name!r}; valid tasks: {valid}")
    return TASKS[name]


def lm_eval_names(name: str) -> list[str] | None:
    """The lm-eval task names of `lm_eval:a,b`; None for another task."""
    base, _, argument = name.partition(":")
    if base != "lm_eval":
        return None
    names = [n.strip() for n in argument.split(",") if n.strip()]
    if not names:
        raise ConfigError("lm_eval needs task names, e.g. tasks=[lm_eval:hellaswag,lm_eval:piqa]")
    return names


def default_out(cfg: DictConfig) -> str:
    """runs/eval/<model name>[-step-N]: never inside the model's folder (an export about to be uploaded)."""
    path = Path(cfg.model).expanduser()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name or cfg.model)
    return f"runs/eval/{name}" + (f"-step-{cfg.step}" if cfg.step is not None else "")


def as_evaluated(cfg: DictConfig, model: nn.Module) -> DictConfig:
    """The config with the conversion the model really has (its config.json's supra record; an
    original is method=softmax), not the defaults of the conversion keys, which eval does not use."""
    spec = recorded_spec(model) or LinearizeSpec(method="softmax")
    record = cfg.copy()
    for name, value in asdict(spec).items():
        if name in record and name != "backend":  # backend: how this eval ran, which the config says
            record[name] = value
    return record


def _forwards(cfg: DictConfig) -> list[tuple[str, int, int, str, bool]]:
    """The largest forward of each task asked for (lm-eval sizes its own), for check_memory."""
    forwards = []
    for name in cfg.tasks:
        if name == "ppl":
            forwards.append(perplexity_forward(cfg))
        elif name == "passkey":
            forwards.append(("passkey", 1, max(cfg.eval.passkey_lengths), "eval.passkey_lengths", False))
        elif name == "speed":
            forwards.append(("speed", 1, max(cfg.eval.speed_lengths), "eval.speed_lengths", False))
    return forwards


def run(cfg: DictConfig) -> int:
    functions = [(name, task_function(name)) for name in cfg.tasks]  # refuse bad names before loading
    for names in filter(None, map(lm_eval_names, cfg.tasks)):  # and lm-eval tasks that cannot run
        from ..evaluate.lm_eval_task import task_manager

        task_manager(names, cfg.eval.lm_eval_include_path)
    out = run_dir(cfg, default_out(cfg))
    read_json_record(out / "eval.json")  # results of earlier tasks are kept: a damaged file stops us first
    model, tokenizer = load_model_and_tokenizer(cfg)
    model.eval()
    check_memory(model.config, next(model.parameters()).device, _forwards(cfg))
    save_snapshot(as_evaluated(cfg, model), out, "eval")
    table = Table(title=f"supra eval: {cfg.model}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    results = {}
    for i, (name, function) in enumerate(functions, 1):
        console.print(f"task {i}/{len(functions)} {name}: running", highlight=False)  # a long task is not silence
        start = time.perf_counter()
        result, rows = function(model, tokenizer, cfg, out)
        result["seconds"] = round(time.perf_counter() - start, 2)
        console.print(f"task {i}/{len(functions)} {name}: done in {result['seconds']:.0f} s", highlight=False)
        results[name] = {"model": cfg.model, **result}
        for metric, value in rows:
            table.add_row(name, metric, value)
    update_json(out / "eval.json", results)
    console.print(table)
    console.print(f"results: {out / 'eval.json'}")
    return 0
