"""The `data:` section of a recipe: where training text comes from and how it is cut into rows.

Plain dataclasses with simple field types so the recipe schema (an OmegaConf structured config) can
nest them as `data: DataConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import FRACTION, POSITIVE, UserError, check_ranges, count

FORMATS = ("auto", "text", "chat")
SEPARATORS = ("eos", "bos")
BAD_RECORD_POLICIES = ("skip", "error")
VALID_SOURCES = ("'stdlib', a file, a directory or a glob of .txt/.jsonl/.json/.parquet files "
                 "(e.g. data/*.jsonl), or 'hf:<dataset id>'")


@dataclass
class MixtureComponent:
    """One source of a weighted mixture; fields left None take the value of the enclosing DataConfig."""

    source: str = "stdlib"
    weight: float = 1.0  # relative probability that the next document comes from this source
    hf_config: str | None = None
    hf_split: str | None = None
    hf_data_files: str | None = None
    text_field: str | None = None
    format: str | None = None


@dataclass
class DataConfig:
    # stdlib | a local file/dir/glob (txt, jsonl, json, parquet; .gz for txt/jsonl) | hf:<dataset id>
    source: str = "stdlib"
    hf_config: str | None = None  # the hub dataset's configuration (subset) name
    hf_split: str = "train"  # the hub dataset's split
    hf_data_files: str | None = None  # passed to datasets.load_dataset(data_files=...)
    text_field: str = "text"  # the text column of json/jsonl/parquet/hub records
    # auto: the text field if present, else alpaca (instruction/input/output) or `messages` as chat;
    # text: only the text field; chat: always format records as a conversation
    format: str = "auto"
    # When non-empty, replaces `source`: documents are drawn from each component with probability
    # proportional to its weight (per document, not per token).
    mixture: list[MixtureComponent] = field(default_factory=list)
    separator: str = "eos"  # eos: appended after every document | bos: prepended before it
    heldout_fraction: float = 0.02  # share of documents (by stable hash) kept out of training
    shuffle_buffer: int = 1000  # documents; 0 or 1 reads in source order
    seed: int = 0  # shuffle order
    num_workers: int = 0  # DataLoader worker processes per rank; 0 reads in the training process
    on_bad_record: str = "skip"  # skip: count and log bad records | error: stop with a one-line error
    max_documents: int | None = None  # records read from each source per epoch (None: all)
    tokenize_batch: int = 32  # documents per tokenizer call


# The valid range of each numeric data setting (checked for recipes and for library callers alike).
DATA_RANGES = {"heldout_fraction": FRACTION, "shuffle_buffer": count(0), "seed": count(0), "num_workers": count(0),
               "max_documents": count(1, optional=True), "tokenize_batch": count(1), "mixture.*.weight": POSITIVE}


class DataError(UserError):
    """Bad data or a bad data setting; the message is one line for the user."""


def as_data_config(cfg: Any) -> DataConfig:
    """Accept a DataConfig, the `data` node of an OmegaConf recipe, or a plain dict."""
    if isinstance(cfg, DataConfig):
        result = cfg
    elif isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        result = obj if isinstance(obj, DataConfig) else _from_dict(obj)
    elif isinstance(cfg, dict):
        result = _from_dict(cfg)
    else:
        raise TypeError(f"expected a DataConfig, DictConfig or dict, got {type(cfg).__name__}")
    validate(result)
    return result


def _from_dict(values: dict) -> DataConfig:
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"unknown data settings {unknown}; valid: {sorted(known)}")
    values = dict(values)
    values["mixture"] = [c if isinstance(c, MixtureComponent) else MixtureComponent(**c)
                         for c in values.get("mixture") or []]
    return DataConfig(**values)


def validate(cfg: DataConfig) -> None:
    def check(name: str, value: Any, valid: tuple[str, ...]) -> None:
        if value not in valid:
            raise DataError(f"data.{name}={value!r} is not valid; valid: {', '.join(valid)}")

    check("format", cfg.format, FORMATS)
    check("separator", cfg.separator, SEPARATORS)
    check("on_bad_record", cfg.on_bad_record, BAD_RECORD_POLICIES)
    for i, comp in enumerate(cfg.mixture):
        if comp.format is not None:
            check(f"mixture[{i}].format", comp.format, FORMATS)
    check_ranges(asdict(cfg), DATA_RANGES, DataError, prefix="data.")
