"""Recipe schema: every key a recipe or a `key=value` override may set, with its default.

A recipe (recipes/<name>.yaml) is merged over these defaults, then command-line overrides (Hydra
syntax) over the recipe. The merged config is validated here, once, so commands can trust it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DataConfig, DataError, as_data_config
from .layers.factorized import FactorizeSpec
from .layers.linearize import LinearizeSpec


class ConfigError(ValueError):
    """A recipe or override the user got wrong; the message is one line naming what is valid."""


@dataclass
class StageConfig:
    """One uptraining stage: which parameters train, on which loss, for how many tokens."""

    name: str = "full"  # attention_transfer | lora | full
    tokens: int = 1_000_000  # uptraining tokens of this stage
    lr: float = 3e-5
    min_lr: float = 1e-5  # cosine floor
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # attention_transfer only: > 0 trains blocks of this many decoder layers one after another from
    # inputs cached on disk, one block on the accelerator at a time (models that do not fit at once)
    block_layers: int = 0


@dataclass
class TrainConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    batch_tokens: int = 16384  # tokens per optimizer step, all ranks together
    micro_batch_size: int = 1  # rows per forward on one rank; accumulation is derived
    grad_clip: float = 1.0
    checkpoint_every: int = 100  # steps
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    eval_every: int = 0  # steps between held-out perplexities logged to metrics.jsonl (0: none)
    logger: str = "rich"  # rich | wandb | none
    activation_checkpointing: bool = False
    compile: bool = False
    # Compute dtype on GPU: FSDP2's parameter dtype across processes (reduction in float32), autocast
    # in one process; the weights and optimizer state stay in `dtype`.
    param_dtype: str = "bfloat16"
    eval_baselines: bool = True  # held-out ppl of the original and converted-untrained model first
    sample_tokens: int = 32  # after training: tokens generated from a held-out prompt (0: none)
    dry_run: bool = False
    world_size: int | None = None  # for dry runs: GPUs to plan for (default: the launcher's)
    gpu_memory_gb: float = 80.0  # for dry runs
    gpu_tflops: float = 989.0  # bf16 dense peak used for MFU and dry-run time (H100 SXM)
    expected_mfu: float = 0.4  # for the dry-run wall-time estimate


@dataclass
class EvalConfig:
    max_tokens: int = 32768  # perplexity: tokens scored at most
    batch_size: int = 4
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 5
    speed_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    speed_decode_tokens: int = 32
    lm_eval_limit: int | None = None
    lm_eval_fewshot: int | None = None
    lm_eval_include_path: str | None = None  # a folder of local lm-eval task YAMLs
    # A second model source (e.g. the original, model=smollm2-135m) that speed and passkey also run,
    # so the plots and eval.json compare the recurrent model with softmax attention and its KV cache.
    baseline: str | None = None


@dataclass
class RecipeConfig:
    description: str = ""
    recipe: str = ""
    model: str = "smollm2-135m"  # smollm2-135m | random | a .gguf file | a model directory | a hub id
    tokenizer: str | None = None  # default: the model's own
    architecture: dict[str, Any] | None = None  # for model=random: a transformers config
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    seq_len: int = 512
    out: str | None = None  # run directory; each command has a default under runs/
    overwrite: bool = False  # convert/export: replace an existing output directory
    # conversion (see supra.layers.linearize.LinearizeSpec)
    method: str = "lolcats"
    decay: str = "supra"
    feature_map_init: str = "default"
    feature_dim: int | None = None
    window: int = 64
    softmax_layers: list[int] = field(default_factory=list)
    skip_layers: list[int] = field(default_factory=list)
    backend: str = "auto"
    # evaluation
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    # skipping (supra skip)
    select: str = "similarity"  # similarity | last
    n: int = 0
    calibration_tokens: int = 8192
    # export
    merge_lora: bool = True
    # weight factorisation (supra factorize; in uptrain, after conversion and before the stages)
    factorize: FactorizeSpec = field(default_factory=FactorizeSpec)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def linearize_spec(cfg: DictConfig) -> LinearizeSpec:
    """The conversion settings of a config (its flat method/decay/... keys)."""
    return LinearizeSpec(method=cfg.method, decay=cfg.decay, feature_map_init=cfg.feature_map_init,
                         feature_dim=cfg.feature_dim, window=cfg.window,
                         softmax_layers=list(cfg.softmax_layers), skip_layers=list(cfg.skip_layers),
                         backend=cfg.backend)


def factorize_spec(cfg: DictConfig) -> FactorizeSpec:
    return FactorizeSpec(**OmegaConf.to_container(cfg.factorize))


STAGE_NAMES = ("attention_transfer", "lora", "full")
LOGGERS = ("rich", "wandb", "none")


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("supra.recipes").iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
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
        names = recipe_names()
        if recipe not in names:
            raise ConfigError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(names)}")
        cfg = _merge(cfg, OmegaConf.create(recipe_text(recipe)), f"recipe {recipe}")
        cfg.recipe = recipe
    for key, value in values.items():
        try:
            OmegaConf.update(cfg, key, value, merge=isinstance(value, (dict, list)))
        except OmegaConfBaseException as err:
            if "not in" in str(err):
                raise ConfigError(f"unknown key {key!r}; {_valid_keys(cfg, key)}") from None
            raise ConfigError(f"bad value for {key}: {_first_line(err)}") from None
    validate(cfg)
    return cfg


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
    """Value checks the schema's types cannot express."""
    from .models import DTYPES

    try:
        linearize_spec(cfg).validate()
        factorize_spec(cfg).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _one_of("dtype", cfg.dtype, tuple(DTYPES))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(f"unknown device {cfg.device!r}; valid: auto, cpu, cuda, cuda:N, mps")
    if cfg.seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {cfg.seq_len}")
    _one_of("select", cfg.select, ("similarity", "last"))
    _one_of("train.logger", cfg.train.logger, LOGGERS)
    for stage in cfg.train.stages:
        _one_of("stage name", stage.name, STAGE_NAMES)
        if stage.tokens < 0 or stage.lr <= 0:
            raise ConfigError(f"stage {stage.name}: tokens must be >= 0 and lr > 0")
        if stage.block_layers < 0 or (stage.block_layers and stage.name != "attention_transfer"):
            raise ConfigError(f"stage {stage.name}: block_layers must be >= 0 and is for attention_transfer only")
    try:
        as_data_config(cfg.data)
    except DataError as err:
        raise ConfigError(str(err)) from None
    if cfg.train.batch_tokens < cfg.seq_len:
        raise ConfigError(f"train.batch_tokens ({cfg.train.batch_tokens}) must be at least seq_len ({cfg.seq_len})")


def run_dir(cfg: DictConfig, default: str) -> Path:
    return Path(cfg.out if cfg.out else default).expanduser()


def save_snapshot(cfg: DictConfig, directory: Path, command: str) -> None:
    """The exact config a command ran with, beside its outputs."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{command}.config.yaml").write_text(OmegaConf.to_yaml(cfg))
