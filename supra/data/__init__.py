"""Training and evaluation text: sources, tokenisation, packing, sharding and exact resume.

    cfg = DataConfig(source="data/*.jsonl")            # or "stdlib", "hf:<dataset id>", a mixture
    loader = build_train_loader(cfg, tokenizer, seq_len=2048, batch_size=8, rank=r, world_size=n)
    for batch in loader: ...                           # input_ids, labels, position_ids
    checkpoint["data"] = loader.state_dict()           # later: loader.load_state_dict(...)
    texts = iter_documents(cfg, "heldout")             # eval text, never in training rows
"""

from .config import DataConfig, DataError, MixtureComponent, as_data_config
from .loader import TrainLoader, build_train_loader
from .packing import IGNORE_INDEX, Packer, cu_seqlens
from .sources import format_chat, iter_documents, record_text
from .stdlib import is_heldout, stdlib_documents, stdlib_files, stdlib_root

__all__ = [
    "IGNORE_INDEX", "DataConfig", "DataError", "MixtureComponent", "Packer", "TrainLoader", "as_data_config",
    "build_train_loader", "cu_seqlens", "format_chat", "is_heldout", "iter_documents", "record_text",
    "stdlib_documents", "stdlib_files", "stdlib_root",
]
