"""What several commands share: the model and tokenizer a config names, the console, and reading
back the records a run directory holds (a damaged one stops the command before it writes anything)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..build import build_model, lora_step, student_plan, with_cache
from ..config import ConfigError, RecipeConfig
from ..errors import UserError
from ..factorize import apply_record, plan_layouts
from ..layers.linearize import recorded_spec
from ..layers.specs import FactorizeSpec
from ..models import SourceError, load_model, load_tokenizer, resolve_device
from ..train.checkpoint import checkpoint_root, checkpoint_steps, latest_checkpoint, load_model_weights
from ..train.stages import fold_lora
from .settings import build_plan, calibration

# Piped into a file (SLURM, CI), rich would lay tables out for 80 columns and cut values short
# (`2,097,1...`); a log has no width, so tables get the room they need there.
console = Console(width=None if sys.stdout.isatty() else 1000)


def load_model_and_tokenizer(cfg: DictConfig, meta: bool = False) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model of `cfg.model` on `cfg.device`, seeded so random init is reproducible; a run
    directory gives its checkpoint `cfg.step` (or its newest one while it has no final model)."""
    torch.manual_seed(cfg.seed)
    run = checkpoint_run(cfg)
    if run is not None:
        return model_at_checkpoint(run, cfg.get("step"), resolve_device(cfg.device))
    if cfg.model == "random" and not cfg.tokenizer:
        raise SourceError("model=random needs tokenizer=<a model source> (e.g. tokenizer=smollm2-135m)")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    architecture = dict(cfg.architecture) if cfg.architecture else None
    model = load_model(cfg.model, cfg.dtype, architecture, "meta" if meta else resolve_device(cfg.device), meta)
    return model, tokenizer


def model_at_checkpoint(run: Path, step: int | None, device: torch.device) -> tuple[nn.Module, object]:
    """A run's saved step as a model (what flame's checkpoint conversion gives): the run's own
    conversion rebuilt from its config snapshot, the step's weights loaded, LoRA merged. `step`
    None: the newest complete checkpoint. With softmax_layers=auto:K this is the trained student."""
    snapshot = read_yaml_record(run / "uptrain.config.yaml")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), snapshot)
    except Exception as err:  # a snapshot of another supra version
        raise ConfigError(f"{run / 'uptrain.config.yaml'} does not fit this supra's settings: "
                          f"{str(err).splitlines()[0]}") from None
    steps = checkpoint_steps(run)
    if step is None:
        path = latest_checkpoint(run)
        if path is None:
            raise SourceError(f"{run} is a supra run that has no checkpoint yet (one is written every "
                              f"{cfg.train.checkpoint_every} steps); rerun uptrain on it, or wait for its first")
    else:
        path = checkpoint_root(run) / f"step-{step:08d}"
        if step not in steps:
            raise SourceError(f"{run} has no checkpoint of step {step}; its checkpoints: "
                              f"{', '.join(map(str, steps)) or 'none yet'}")
    local = cfg.copy()
    local.device, local.step = "cpu", None
    model, tokenizer = load_model_and_tokenizer(local)
    finished = build_plan(local, factorize=True, lora=True).for_source(recorded_spec(model))
    plan = student_plan(finished)
    model, _ = build_model(model, replace(plan, factorize=FactorizeSpec(), lora=None), calibration(local, tokenizer))
    if plan.factorize.method != "none":  # empty factors of the run's layouts: the checkpoint fills them
        apply_record(model, plan_layouts(model, plan.factorize))
    model = lora_step(model, plan, None)
    load_model_weights(path, model)
    console.print(f"model: {run}, checkpoint {path.name}")
    return with_cache(fold_lora(model), finished).to(device), tokenizer


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes a command may still use, where) on the device: free accelerator memory, or the RAM the
    kernel reports available; None where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    return None


def activation_bytes(config: Any, rows: int, tokens: int, training: bool) -> int:
    """A rough floor on the activations of one forward (and backward) over rows x tokens: float32
    logits over the vocabulary three times (logits, their float copy, the loss's softmax) and, per
    token, a layer's hidden states and MLP (every layer's, kept for the backward, when training)."""
    hidden = getattr(config, "hidden_size", 0)
    mlp = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 1) if training else 1
    per_token = 3 * getattr(config, "vocab_size", 0) + layers * (2 * mlp + 8 * hidden)
    return rows * tokens * per_token * 4


def check_memory(config: Any, device: torch.device, forwards: list[tuple[str, int, int, str, bool]]) -> None:
    """Refuse, in one line, a command whose largest forward cannot fit, before it writes anything or
    runs out of memory mid-way; warn once when seq_len runs past the positions the model was trained
    on. forwards: (what, rows, tokens, the keys that set rows and tokens as the user writes them,
    whether it trains)."""
    if config is None:
        return
    available = available_memory(device)
    for what, rows, tokens, keys, training in forwards:
        need = activation_bytes(config, rows, tokens, training)
        if available is not None and need > available[0]:
            free, where = available
            raise UserError(f"{what} needs about {need / 2**30:,.1f} GiB for the activations of {rows} x {tokens:,} "
                            f"tokens, more than the {free / 2**30:,.1f} GiB {where}; lower {keys}")
    longest = max((tokens for _, _, tokens, _, _ in forwards), default=0)
    trained = getattr(config, "max_position_embeddings", None)
    if trained and longest > trained:
        logging.getLogger("supra").warning(
            f"warning: {longest:,} tokens is past the model's max_position_embeddings ({trained:,}); positions "
            "beyond it were never trained, so expect quality to fall there")


def perplexity_forward(cfg: DictConfig, seq_len: int | None = None) -> tuple[str, int, int, str, bool]:
    """The largest forward of the held-out perplexity (supra.evaluate.perplexity) in windows of
    seq_len tokens (default: the recipe's), for check_memory."""
    seq_len = seq_len or cfg.seq_len
    tokens = min(seq_len, cfg.eval.max_tokens)
    rows = min(cfg.eval.batch_size, max(1, cfg.eval.max_tokens // seq_len))
    keys = "seq_len, eval.batch_size or eval.max_tokens" + (", eval.long_factor" if seq_len != cfg.seq_len else "")
    return "held-out perplexity", rows, tokens, keys, False


def checkpoint_run(cfg: DictConfig) -> Path | None:
    """The run directory whose checkpoint `cfg` asks for: model=RUN with step=N, or a run without
    its final model yet. A step= on anything else is a mistake."""
    path = Path(cfg.model).expanduser()
    is_run = path.is_dir() and (path / "uptrain.config.yaml").exists()
    if cfg.get("step") is not None and not is_run:
        raise UserError(f"step={cfg.step} picks a checkpoint of a supra run directory; {cfg.model} is not one "
                        "(it has no uptrain.config.yaml)")
    if is_run and (cfg.get("step") is not None or not (path / "model" / "config.json").exists()):
        return path
    return None


def damaged_record(path: Path, problem: str) -> UserError:
    return UserError(f"{path} {problem}; it is a record of the run in {path.parent}, which supra will not "
                     "overwrite: repair or remove that file, move the directory away, or choose another out=")


def read_json_record(path: Path) -> dict[str, Any]:
    """A JSON object a run wrote earlier ({} when there is none yet)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise damaged_record(path, f"is not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise damaged_record(path, "is not UTF-8 text") from None
    if not isinstance(data, dict):
        raise damaged_record(path, f"holds a JSON {type(data).__name__}, not an object of results")
    return data


def read_yaml_record(path: Path) -> dict[str, Any]:
    """A YAML mapping a run wrote earlier (a config snapshot), as plain containers, unresolved."""
    try:
        # safe_load first, for the structure: OmegaConf.load turns a list into a ListConfig and a
        # bare number into an OSError. The values come from OmegaConf, which wrote them.
        if not isinstance(yaml.safe_load(path.read_text(encoding="utf-8")), dict):
            raise damaged_record(path, "is not a YAML mapping of settings")
        return OmegaConf.to_container(OmegaConf.load(path))
    except yaml.MarkedYAMLError as err:
        where = f" at line {err.problem_mark.line + 1}" if err.problem_mark is not None else ""
        raise damaged_record(path, f"is not valid YAML ({err.problem or err.context}{where})") from None
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise damaged_record(path, f"is not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise damaged_record(path, "is not UTF-8 text") from None


SOFTMAX_CHOICE = "softmax_layers.json"  # how softmax_layers=auto:K chose, beside the model or in the run


def write_softmax_choice(directory: Path, cfg: DictConfig, choice: dict[str, Any]) -> None:
    """Record the measurement behind softmax_layers=auto:K (as `supra skip` writes skip.json) and say it."""
    update_json(directory / SOFTMAX_CHOICE, {"model": cfg.model, "method": cfg.method, **choice})
    console.print(f"softmax_layers=auto:{choice['k']}: kept layers {choice['chosen']} as softmax (their restoration "
                  f"lowered the calibration loss most; all {directory / SOFTMAX_CHOICE})")


def update_json(path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into a JSON file (later tasks add to earlier ones), written atomically."""
    data = read_json_record(path)
    data.update(values)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return data
