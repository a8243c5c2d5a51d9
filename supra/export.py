"""Write a Hugging Face directory that loads without supra: weights, tokenizer, config, code.

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

transformers' remote code is flat: it copies the module named in `auto_map` and, recursively, the
files it imports with single-dot relative imports (`from .x import y`) from the model directory,
and refuses to load when a module imports a package that is not installed. So the layer files
(supra/layers/*.py) and the kernel files (kernels/*.py, whose __init__ becomes supra_kernels.py) are
copied flat beside modeling_supra.py as supra_<name>.py, with every relative import rewritten to match
(the layers' `from ..kernels[.mod] import` becomes `from .supra_kernels import` / `from .supra_mod import`).
The prefix keeps Python started in the export folder from taking `kernels.py` or `cache.py` for the
packages of that name (transformers imports Hugging Face's `kernels` on every model import).
The Triton modules are only imported by the kernels
when triton is installed and the tensors are on CUDA; their top-level `import triton` is wrapped
in a try block so transformers' import check (which skips try blocks) lets a machine without
triton load the model and run the torch path. One implementation, copied: no export-only copy of
the layers to drift.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from .errors import check_output_dir
from .layers.linearize import LinearizeSpec, record_spec, recorded_spec
from .models import SourceError, publish_directory, remove_stale_staging, save_model, torch_dtype

TEMPLATE = Path(__file__).parent / "export_template" / "modeling_supra.py"
MODELING = "modeling_supra.py"
CODE_PREFIX = "supra_"  # every copied code file's name starts with it (see the module docstring)
AUTO_MAP = {"AutoConfig": "modeling_supra.SupraConfig", "AutoModelForCausalLM": "modeling_supra.SupraForCausalLM"}


class ExportError(SourceError):
    """Something in the model or the code that cannot be exported; one line for the user."""


def code_files() -> dict[str, str]:
    """{file name in the export: source text} for the layer and kernel modules, imports rewritten."""
    from . import kernels, layers

    sources: dict[str, Path] = {}
    for package, init_name in ((layers, None), (kernels, "kernels")):
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            name = init_name if path.name == "__init__.py" else path.stem
            if name is None:  # layers/__init__.py is empty: the flat copy has no package to mark
                continue
            if name in sources or f"{CODE_PREFIX}{name}.py" == MODELING:
                raise ExportError(f"cannot export: {path} and {sources.get(name, MODELING)} would both be "
                                  f"{CODE_PREFIX}{name}.py")
            sources[name] = path
    return {f"{CODE_PREFIX}{name}.py": prefixed_imports(flatten_imports(path.read_text(), path), sources)
            for name, path in sources.items()}


def prefixed_imports(text: str, modules: Iterable[str]) -> str:
    """`from .name import` -> `from .supra_name import` for the modules copied into the export."""
    return re.sub(r"^(\s*)from \.(\w+) import", lambda m: (f"{m.group(1)}from .{CODE_PREFIX}{m.group(2)} import"
                                                       if m.group(2) in modules else m.group(0)),
                  text, flags=re.MULTILINE)


def flatten_imports(text: str, path: Path) -> str:
    """Rewrite one module for the flat remote-code directory (see the module docstring)."""
    text = re.sub(r"^(\s*)from \.\.kernels\.(\w+) import", r"\1from .\2 import", text, flags=re.MULTILINE)
    text = re.sub(r"^(\s*)from \.\.kernels import", r"\1from .kernels import", text, flags=re.MULTILINE)
    leftover = re.search(r"^\s*(from \.\.\S*|from supra\b\S*|import supra\b\S*)", text, flags=re.MULTILINE)
    if leftover:
        raise ExportError(f"cannot export: {path.name} has `{leftover.group(1).strip()}`; layer and kernel files "
                          "may import only torch, triton, transformers and each other")
    return _optional_triton(text)


def _optional_triton(text: str) -> str:
    """Put a module's top-level `import triton...` lines in a try block (re-raising on failure)."""
    lines = text.splitlines(keepends=True)
    imports = [i for i, line in enumerate(lines) if re.match(r"import triton(\.\w+)*( as \w+)?\s*$", line)]
    if not imports:
        return text
    first, last = imports[0], imports[-1]
    if last - first + 1 != len(imports):
        raise ExportError("cannot export: top-level triton imports are not consecutive lines")
    block = ["try:  # supra export: hidden from transformers' import check; loaded only when triton exists\n"]
    block += ["    " + lines[i] for i in imports]
    block += ["except ImportError:\n", "    raise\n"]
    return "".join(lines[:first] + block + lines[last + 1:])


def modeling_file(base_model_type: str) -> str:
    text = TEMPLATE.read_text()
    marker = 'BASE_MODEL_TYPE = "llama"'
    if text.count(marker) != 1:
        raise ExportError(f"the export template {TEMPLATE} lacks the line {marker}")
    return text.replace(marker, f"BASE_MODEL_TYPE = {base_model_type!r}")


def merge_lora(model: nn.Module, source_dir: Path | None = None) -> nn.Module:
    """The model with every LoRA adapter merged into its base weights (a no-op without adapters).

    Adapters come as a peft model, as LoRA layers injected into a plain model, or as an
    adapter_config.json in the source directory (a peft adapter saved beside the model)."""
    if source_dir is not None and (source_dir / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source_dir))
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def export(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, out: Path, dtype: str = "bfloat16",
           overwrite: bool = False) -> Path:
    """Write the export directory atomically (complete, or not there at all). The model is cast to
    `dtype` in place; an unconverted one is recorded as method=softmax, so it exports as itself
    through the same code."""
    out = Path(out)
    check_output_dir(out, overwrite)
    if has_lora(model):
        raise ExportError("the model carries LoRA adapters; export with merge_lora=true")
    base_model_type = model.config.model_type
    if base_model_type not in ("llama", "mistral", "qwen2"):
        raise ExportError(f"cannot export a {base_model_type!r} model; supra exports llama, mistral and qwen2")
    files = code_files()  # before writing anything: a code problem must not leave half an export
    model = model.to(torch_dtype(dtype))
    if tokenizer is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # batched generate() pads with it

    if recorded_spec(model) is None:
        record_spec(model, LinearizeSpec(method="softmax"))

    remove_stale_staging(out)
    staging = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model(model, tokenizer, staging, overwrite=True)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = AUTO_MAP
        config["architectures"] = ["SupraForCausalLM"]
        config["base_model_type"] = base_model_type
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in files.items():
            (staging / name).write_text(text)
        (staging / MODELING).write_text(prefixed_imports(modeling_file(base_model_type),
                                                         {name[len(CODE_PREFIX):-3] for name in files}))
        publish_directory(staging, out)
    except BaseException:  # Ctrl-C or an error: no hidden half export left beside `out`
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
