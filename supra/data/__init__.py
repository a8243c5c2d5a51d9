"""Training and evaluation text: sources, tokenisation, packing, sharding and exact resume.

    cfg = DataConfig(source="data/*.jsonl")            # or "stdlib", "hf:<dataset id>", a mixture
    loader = build_train_loader(cfg, tokenizer, seq_len=2048, batch_size=8, rank=r, world_size=n)
    for batch in loader: ...                           # input_ids, labels, position_ids
    checkpoint["data"] = loader.state_dict()           # later: loader.load_state_dict(...)
    texts = iter_documents(cfg, "heldout")             # eval text, never in training rows
"""

import importlib
from typing import Any

from .config import DataConfig, DataError, MixtureComponent, as_data_config
from .sources import format_chat, iter_documents, record_text
from .stdlib import is_heldout, stdlib_documents, stdlib_files, stdlib_root

# The loader and the packer import torch: loaded when first asked for, so that checking a command's
# settings (which needs DataConfig) stays fast.
_WITH_TORCH = {"TrainLoader": "loader", "build_train_loader": "loader", "IGNORE_INDEX": "packing", "Packer": "packing",
               "cu_seqlens": "packing"}


def __getattr__(name: str) -> Any:
    if name in _WITH_TORCH:
        return getattr(importlib.import_module(f".{_WITH_TORCH[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX", "DataConfig", "DataError", "MixtureComponent", "Packer", "TrainLoader", "as_data_config",
    "build_train_loader", "cu_seqlens", "format_chat", "is_heldout", "iter_documents", "record_text",
    "stdlib_documents", "stdlib_files", "stdlib_root",
]
