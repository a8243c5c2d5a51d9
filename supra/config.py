"""Recipe schema: every key a recipe or a `key=value` override may set, with its default.

A recipe (recipes/<name>.yaml) is merged over these defaults, then command-line overrides (Hydra
syntax) over the recipe. The merged config is validated here, once, so commands can trust it.
The sections the library takes as they are live beside the code that reads them, each field with
its one default: `data` (supra.data.config), `factorize` (supra.layers.specs), `train` and its
stages (supra.train.settings); supra.commands.settings hands each part of the library its own.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DataConfig, DataError, as_data_config
from .data.config import DATA_RANGES
from .errors import FRACTION, NON_NEGATIVE, POSITIVE, Range, UserError, check_ranges, count
from .layers.specs import FactorizeSpec, LinearizeSpec, parse_auto
from .train.settings import StageConfig, TrainConfig


class ConfigError(UserError):
    """A recipe or override the user got wrong; the message is one line naming what is valid."""


@dataclass
class EvalConfig:
    max_tokens: int = 32768  # perplexity: tokens scored at most
    batch_size: int = 4  # rows per forward (perplexity, lm-eval)
    # uptrain's report: held-out perplexity also at seq_len x this (a recurrent model must hold up
    # past its training length), with the model's window alone beside it; 1: the training length only
    long_factor: int = 4
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])  # passkey: context lengths
    # passkey: where the key sits (0: the start, 1: the end)
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 5  # passkey: keys per length and depth
    speed_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])  # speed: context lengths
    speed_decode_tokens: int = 32  # speed: tokens decoded per length
    lm_eval_limit: int | None = None  # lm-eval: examples per task (null: all)
    lm_eval_fewshot: int | None = None  # lm-eval: few-shot examples (null: the task's default)
    lm_eval_include_path: str | None = None  # a folder of local lm-eval task YAMLs
    # A second model source (e.g. the original, model=smollm2-135m) that speed and passkey also run,
    # so the plots and eval.json compare the recurrent model with softmax attention and its KV cache.
    baseline: str | None = None


@dataclass
class RecipeConfig:
    description: str = ""  # one line on what the recipe is for
    recipe: str = ""  # a shipped recipe's name or a path to a recipe YAML, loaded before the other keys
    model: str = "smollm2-135m"  # smollm2-135m | random | a .gguf file | a model directory | a hub id
    tokenizer: str | None = None  # default: the model's own
    architecture: dict[str, Any] | None = None  # for model=random: a transformers config
    dtype: str = "float32"  # weights: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # random init, data order, passkeys
    seq_len: int = 512  # tokens per training row, held-out perplexity window and calibration row
    out: str | None = None  # run directory; each command has a default under runs/
    overwrite: bool = False  # convert/export: replace an existing output directory
    step: int | None = None  # eval/export of a run: this checkpoint step (default: model/, else the newest)
    # conversion (see supra.layers.specs.LinearizeSpec)
    method: str = "lolcats"
    decay: str = "supra"
    gate: str = "key"  # gla/gdn: key | learned
    feature_map_init: str = "default"
    feature_dim: int | None = None
    window: int = 64
    window_kind: str = "sliding"  # sliding | terrace (LoLCATs' main results: own block of W + the previous one)
    window_mix: str = "head"  # gla/gdn: the window softmax's share per head, or per token (head | token)
    sinks: int = 0  # lolcats, gla/gdn with a window: first tokens kept in the softmax window for good
    cache_budget: int | None = None
    cache_chunk: int = 8  # sparse cache: pairs kept in runs of this many consecutive tokens (divides budget and window)
    cache_recall: float = 0.25  # sparse cache: share chosen by the state's recall error, the rest by attention
    state_decay: str = "none"  # lolcats: decay of the linear part (none | supra | retnet | learned)
    softmax_layers: Any = field(default_factory=list)  # [layer, ...] or "auto:K" (supra/softmax_select.py)
    skip_layers: list[int] = field(default_factory=list)
    backend: str = "auto"
    # evaluation
    tasks: list[str] = field(default_factory=lambda: ["ppl"])  # eval: ppl | passkey | speed | lm_eval:<task,...>
    # skipping (supra skip)
    select: str = "similarity"  # similarity | last
    n: int = 0  # skip: attention sublayers to remove (chosen by select)
    calibration_tokens: int = 8192  # skip, softmax_layers=auto:K, activation-aware factorize: text measured on
    # export
    merge_lora: bool = True  # export: merge LoRA adapters into the weights
    # weight factorisation (supra factorize; in uptrain, after conversion and before the stages)
    factorize: FactorizeSpec = field(default_factory=FactorizeSpec)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def key_help() -> dict[str, str]:
    """{dotted key: one line}: each schema field's own comment (the schema is the one place keys are
    described), else the comment of the LinearizeSpec field it mirrors, else the comment block above it.
    A stage's keys are train.stages.*.<key>."""
    from .data import DataConfig

    described: dict[str, str] = {}
    nested = {"factorize": FactorizeSpec, "data": DataConfig, "eval": EvalConfig, "train": TrainConfig,
              "train.stages.*": StageConfig}
    mirrored = _field_comments(LinearizeSpec)
    for name, text in _field_comments(RecipeConfig).items():
        described[name] = mirrored.get(name, text) if name in mirrored and not _inline(RecipeConfig, name) else text
    for prefix, cls in nested.items():
        described.pop(prefix, None)  # a section, not a key: its keys follow
        for name, text in _field_comments(cls).items():
            described[f"{prefix}.{name}"] = text
    return described


def _inline(cls: type, name: str) -> bool:
    return bool(re.search(rf"^    {name}: [^\n]*  # ", inspect.getsource(cls), re.M))


def _field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's comment in the class's source: on its line, or the lines just above."""
    comments, block = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("# "))
            continue
        match = re.match(r"    (\w+): [^=]+(?:=.*?)?(?:  # (.*))?$", line)
        if match and match.group(1) in {f.name for f in fields(cls)}:
            comments[match.group(1)] = match.group(2) or " ".join(block)
        block = []
    return comments


def linearize_spec(cfg: DictConfig) -> LinearizeSpec:
    """The conversion settings of a config: its top-level keys named like a LinearizeSpec field
    (method, decay, window, ...). softmax_layers=auto:K gives no softmax layers here:
    `convert.convert_model` measures which K to keep."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    values = {f.name: settings[f.name] for f in fields(LinearizeSpec) if f.name in settings}
    if values.get("cache_budget") is None:  # unset: the spec's default, no cache
        values.pop("cache_budget", None)
    if parse_auto(values.get("softmax_layers", [])) is not None:
        values["softmax_layers"] = []
    return LinearizeSpec.from_dict(values)


def factorize_spec(cfg: DictConfig) -> FactorizeSpec:
    return FactorizeSpec(**OmegaConf.to_container(cfg.factorize))


# The valid range of every numeric setting (the schema's types only say int or float); `*` is each
# item of a list. data.* ranges live with DataConfig (supra.data.config.DATA_RANGES).
RANGES: dict[str, Range] = {
    "seed": count(0), "step": count(0, optional=True), "seq_len": count(1), "window": count(0), "sinks": count(0),
    "cache_budget": count(0, optional=True), "cache_chunk": count(1), "cache_recall": Range(0, 1),
    "feature_dim": count(2, optional=True),
    "softmax_layers.*": count(0), "skip_layers.*": count(0), "n": count(0), "calibration_tokens": count(1),
    "train.stages.*.tokens": count(1), "train.stages.*.lr": POSITIVE, "train.stages.*.min_lr": NON_NEGATIVE,
    "train.stages.*.warmup_steps": count(0), "train.stages.*.weight_decay": NON_NEGATIVE,
    "train.stages.*.betas.*": FRACTION, "train.stages.*.lora_r": count(1), "train.stages.*.lora_alpha": POSITIVE,
    "train.stages.*.lora_dropout": FRACTION, "train.stages.*.block_layers": count(0),
    "train.stages.*.cache_tokens": count(0), "train.stages.*.epochs": count(1), "train.stages.*.ce_weight": Range(0, 1),
    "eval.long_factor": count(1),
    "train.batch_tokens": count(1), "train.micro_batch_size": count(1), "train.grad_clip": POSITIVE,
    "train.checkpoint_every": count(1), "train.keep_checkpoints": count(1), "train.max_bad_steps": count(0),
    "train.eval_every": count(0), "train.sample_tokens": count(0), "train.world_size": count(1, optional=True),
    "train.gpu_memory_gb": POSITIVE, "train.gpu_tflops": POSITIVE, "train.expected_mfu": Range(0, 1, lo_open=True),
    "eval.max_tokens": count(1), "eval.batch_size": count(1), "eval.passkey_lengths.*": count(1),
    "eval.passkey_depths.*": Range(0, 1), "eval.passkey_trials": count(1), "eval.speed_lengths.*": count(1),
    "eval.speed_decode_tokens": count(1), "eval.lm_eval_limit": count(1, optional=True),
    "eval.lm_eval_fewshot": count(0, optional=True),
    "factorize.rank": count(1, optional=True), "factorize.ratio": Range(0, 1, lo_open=True, optional=True),
    "factorize.layers.*": count(0), "factorize.tt_cores": count(2), "factorize.tt_shapes.*.*": count(1),
}

LOGGERS = ("rich", "wandb", "none")


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("supra.recipes").iterdir() if p.name.endswith(".yaml"))


def is_recipe_file(recipe: str) -> bool:
    """`recipe=` names a YAML file (litgpt/flame style) rather than a shipped recipe."""
    return recipe.endswith((".yaml", ".yml")) or "/" in recipe or Path(recipe).expanduser().is_file()


def recipe_text(name: str) -> str:
    """A shipped recipe's YAML, or a recipe file's; ConfigError when there is neither."""
    if is_recipe_file(name):
        path = Path(name).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"recipe file {name} not found; give a path to a YAML file or one of the shipped "
                              f"recipes: {', '.join(recipe_names())}") from None
        except IsADirectoryError:
            raise ConfigError(f"recipe {name} is a directory; give a YAML file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"recipe file {name} is not UTF-8 text") from None
    names = recipe_names()
    if name not in names:
        raise ConfigError(f"unknown recipe {name!r}; valid recipes: {', '.join(names)}, or a path to a YAML file")
    return resources.files("supra.recipes").joinpath(f"{name}.yaml").read_text()


def load_config(overrides: list[str]) -> DictConfig:
    """Defaults <- recipe <- overrides, as a typed OmegaConf config; ConfigError on any mistake."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # Hydra's grammar errors are long; the first line says what is wrong
        raise ConfigError(f"cannot parse overrides {' '.join(overrides)!r}: {_first_line(err)}") from None
    values: dict[str, Any] = {}
    for override in parsed:
        if override.is_delete() or override.is_sweep_override():
            raise ConfigError(f"override {override.input_line!r}: deletions and sweeps are not supported")
        values[override.get_key_element().lstrip("+")] = override.value()
    cfg = OmegaConf.structured(RecipeConfig)
    recipe = values.pop("recipe", None)
    if recipe is not None:
        cfg = _merge(cfg, _parse_recipe(str(recipe)), f"recipe {recipe}")
        cfg.recipe = str(recipe)
    for key, value in values.items():
        try:
            OmegaConf.update(cfg, key, value, merge=isinstance(value, (dict, list)))
        except OmegaConfBaseException as err:
            if "not in" in str(err) and getattr(err, "key", None) != key.split(".")[-1]:  # a key inside the value
                raise ConfigError(f"bad value for {key}: {_first_line(err)}") from None
            if "not in" in str(err):
                raise ConfigError(f"unknown key {key!r}; {_valid_keys(cfg, key)}") from None
            path = re.sub(r"\.\d+(?=\.|$)", ".*", key)  # train.stages.0.lr -> train.stages.*.lr
            rule = DATA_RANGES.get(path[5:]) if path.startswith("data.") else RANGES.get(path)
            valid = f"; valid: {rule}" if rule else ""
            raise ConfigError(f"bad value for {key}: {_first_line(err)}{valid}") from None
    if {"method", "window", "window_kind"} & set(values):
        _drop_recipe_options(cfg, set(values))
    validate(cfg)
    return cfg


def _drop_recipe_options(cfg: DictConfig, given: set[str]) -> None:
    """A recipe's options for its own method and window do not follow a method=, window= or
    window_kind= override (`recipe=demo method=supra`, `recipe=demo window_kind=sliding`): those the
    new setting ignores go back to their defaults. Options given on the command line stay, and
    validate() refuses them if they would do nothing."""
    try:
        unused = linearize_spec(cfg).unused_options()
    except (ValueError, TypeError):  # a bad value: validate() says which
        return
    defaults = RecipeConfig()
    for name in unused:
        if name not in given:
            cfg[name] = getattr(defaults, name)


def _parse_recipe(name: str) -> DictConfig:
    text = recipe_text(name)
    try:
        recipe = OmegaConf.create(text)
    except Exception as err:  # YAML syntax errors come from yaml, not OmegaConf
        raise ConfigError(f"recipe {name} is not valid YAML: {_first_line(err)}") from None
    if not isinstance(recipe, DictConfig):
        raise ConfigError(f"recipe {name} is not a mapping of keys to values (it is a {type(recipe).__name__})")
    return recipe


def _merge(base: DictConfig, extra: DictConfig, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        if key and "not in" in str(err).lower():
            raise ConfigError(f"{what}: unknown key {key!r}") from None
        raise ConfigError(f"{what}: {_first_line(err)}") from None


def _valid_keys(cfg: DictConfig, key: str) -> str:
    """'valid keys: ...' at the deepest level of `key` that exists."""
    node, where = cfg, []
    for part in key.split(".")[:-1]:
        child = node._get_node(part) if isinstance(node, DictConfig) else None
        if not isinstance(child, DictConfig):
            break
        node, where = child, [*where, part]
    prefix = ".".join(where) + "." if where else ""
    return "valid keys: " + ", ".join(prefix + str(k) for k in node.keys())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return re.sub(r"\s+", " ", text[0]) if text else type(err).__name__


def _one_of(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def validate(cfg: DictConfig) -> None:
    """Value checks the schema's types cannot express, before anything is loaded."""
    check_ranges(OmegaConf.to_container(cfg, resolve=True), RANGES, ConfigError)
    try:
        linearize_spec(cfg).validate()
        factorize_spec(cfg).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    from .models import DTYPES  # torch: after the checks a typo fails

    _one_of("dtype", cfg.dtype, tuple(DTYPES))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(f"unknown device {cfg.device!r}; valid: auto, cpu, cuda, cuda:N, mps")
    _one_of("select", cfg.select, ("similarity", "last"))
    _one_of("train.logger", cfg.train.logger, LOGGERS)
    _one_of("train.param_dtype", cfg.train.param_dtype, tuple(DTYPES))
    from .train.stages import STAGE_KINDS, check_stage  # torch: after the checks a typo fails

    if not cfg.train.stages:
        raise ConfigError(f"train.stages is empty; give at least one stage ({', '.join(STAGE_KINDS)})")
    for stage in OmegaConf.to_object(cfg.train).stages:
        try:
            check_stage(stage)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if len(stage.betas) != 2:
            raise ConfigError(f"stage {stage.name}: betas must be two numbers [beta1, beta2], got {list(stage.betas)}")
        if stage.min_lr > stage.lr:
            raise ConfigError(f"stage {stage.name}: min_lr ({stage.min_lr}) must be at most lr ({stage.lr})")
    try:
        as_data_config(cfg.data)
    except DataError as err:
        raise ConfigError(str(err)) from None


def check_batch_tokens(cfg: DictConfig) -> None:
    """Training only: an optimizer step holds at least one row of seq_len tokens."""
    if cfg.train.batch_tokens < cfg.seq_len:
        raise ConfigError(f"train.batch_tokens ({cfg.train.batch_tokens}) must be at least seq_len ({cfg.seq_len})")


def recipe_label(cfg: DictConfig) -> str:
    """The recipe's name for default output folders: a shipped name, or a recipe file's stem."""
    return Path(cfg.recipe).stem if cfg.recipe else ""


def run_dir(cfg: DictConfig, default: str) -> Path:
    return Path(cfg.out if cfg.out else default).expanduser()


def save_snapshot(cfg: DictConfig, directory: Path, command: str) -> None:
    """The exact config a command ran with, beside its outputs."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{command}.config.yaml").write_text(OmegaConf.to_yaml(cfg))
