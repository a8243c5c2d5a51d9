"""Where documents come from: the stdlib corpus, local files and hub datasets, as texts.

Every source is a sequence of *records* in a fixed order (files sorted by path, then the lines or
rows inside each file). A record becomes one document's text, or is a bad record that is counted
and logged (or stops the run, per `on_bad_record`). Nothing is dropped without a count.

Sharding: a local source gives record i to shard i % num_shards, so shards are disjoint and their
union is the whole source. A hub dataset is split with `datasets.distributed.split_dataset_by_node`
(whole files per shard when the file count divides evenly, else every num_shards-th record).

Held-out split: a stable hash (`is_heldout`) of a per-record key: the path relative to the source's
base directory (plus `:line` or `[row]` inside a file) for local data, the text itself for hub data
(hub order can depend on sharding, content cannot). The same key decides train and eval, so eval
text is never trained on. A local source of one or a few documents (one big text file) may have
no document in the held-out share (or none left to train on): then the last share of its text (by
characters, from the start of a line where one is near) is held out instead, the head of the
document that straddles the cut goes to training and its tail to eval. `open_source` decides
this, and says so in one line on the log.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .config import VALID_SOURCES, DataConfig, DataError, as_data_config
from .stdlib import is_heldout, stdlib_files, stdlib_root

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
WARN_FIRST_BAD = 10  # bad records logged one by one per reader; the rest only in the counts
NAME_FIRST_BAD = 3  # bad records named in summaries and errors
# Holding out the text's last share: at least this many characters (a few dozen tokens to score),
# and a corpus needs as many again to train on.
MIN_HELDOUT_CHARS = 100
GLOB_CHARS = set("*?[")

# (position after this record, held-out key or None if it depends on the text, where, loader)
Record = tuple[int, str | None, str, Callable[[], Any]]


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason  # empty | undecodable | bad_json | missing_field | unreadable
        self.detail = detail


@dataclass(frozen=True)
class SourceSpec:
    """One source with every setting resolved (a mixture component or the single `source`)."""

    source: str
    weight: float = 1.0
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: str | None = None
    text_field: str = "text"
    format: str = "auto"


def source_specs(cfg: DataConfig) -> list[SourceSpec]:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    if not cfg.mixture:
        return [SourceSpec(cfg.source, 1.0, cfg.hf_config, cfg.hf_split, cfg.hf_data_files, cfg.text_field,
                           cfg.format)]
    return [SourceSpec(c.source, float(c.weight), pick(c.hf_config, cfg.hf_config),
                       pick(c.hf_split, cfg.hf_split),
                       pick(c.hf_data_files, cfg.hf_data_files), pick(c.text_field, cfg.text_field),
                       pick(c.format, cfg.format))
            for c in cfg.mixture]


# ----------------------------------------------------------------------------------------- records

def _identity(value: Any) -> Any:
    return value


def _bad(reason: str, detail: str) -> Any:
    raise BadRecord(reason, detail)


def file_kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"  # any other file is one document (.txt, .md, .py, ...)


def _read_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()


def _read_text(path: Path, errors: str) -> str:
    try:
        raw = _read_bytes(path)
    except (OSError, EOFError) as err:
        raise BadRecord("unreadable", f"cannot read: {err}") from None
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise BadRecord("undecodable", f"invalid UTF-8 at byte {err.start}, line {line} (not a text file?)") from None
    if not text.strip():
        raise BadRecord("empty", "empty file")
    return text


def _parse_json_line(raw: bytes) -> Any:
    if not raw.strip():
        raise BadRecord("empty", "blank line")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise BadRecord("undecodable", "invalid UTF-8") from None
    except json.JSONDecodeError as err:
        raise BadRecord("bad_json", f"not JSON ({err.msg})") from None


class LocalSource:
    """Files matched by a path, directory or glob; documents are files, jsonl lines or json/parquet rows."""

    # Empty files are expected in some corpora (the stdlib's empty __init__.py files): still counted,
    # but logged at DEBUG rather than as warnings on every run.
    expected_empty = False

    def __init__(self, name: str, files: list[Path], base: Path, max_documents: int | None,
                 errors: str = "strict", expected_empty: bool = False):
        self.name, self.files, self.base, self.max_documents = name, files, base, max_documents
        self.errors = errors  # "replace" for the stdlib corpus, whose few odd bytes are harmless
        self.expected_empty = expected_empty
        self.tail: TailSplit | None = None  # set by open_source when the held-out share is the text's end

    @classmethod
    def from_pattern(cls, pattern: str, max_documents: int | None) -> LocalSource:
        path = Path(pattern).expanduser()
        if GLOB_CHARS.intersection(pattern):
            parts = path.parts
            first_glob = next(i for i, p in enumerate(parts) if GLOB_CHARS.intersection(p))
            base = Path(*parts[:first_glob]) if first_glob else Path(".")
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"data source {pattern!r} matches no files; valid: {VALID_SOURCES}")
        elif path.is_dir():
            base = path
            # Hidden files and folders (.git, .cache, ...) are not data.
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
            if not files:
                raise DataError(f"data source {pattern!r} is an empty directory; valid: {VALID_SOURCES}")
        elif path.is_file():
            base, files = path.parent, [path]
        else:
            raise DataError(f"data source {pattern!r} not found (no such file or directory); "
                            f"valid: {VALID_SOURCES}")
        return cls(pattern, files, base, max_documents)

    def records(self, shard: int, num_shards: int, start: int) -> Iterator[Record]:
        """Records of this shard from global index `start` on; loaders are only built for those."""
        limit = self.max_documents if self.max_documents is not None else float("inf")
        index = 0
        for path in self.files:
            rel = path.relative_to(self.base).as_posix()
            if file_kind(path) == "text":  # one record: skipped without reading the file
                if index >= limit:
                    return
                if index >= start and index % num_shards == shard:
                    yield index + 1, rel, str(path), partial(_read_text, path, self.errors)
                index += 1
                continue
            for suffix, load in self._file_records(path):
                if index >= limit:
                    return
                if index >= start and index % num_shards == shard:
                    yield index + 1, rel + suffix, f"{path}{suffix}", load
                index += 1

    def _file_records(self, path: Path) -> Iterator[tuple[str, Callable[[], Any]]]:
        kind = file_kind(path)
        if kind == "jsonl":
            opener = gzip.open if path.name.endswith(".gz") else open
            line_no = 0
            try:
                with opener(path, "rb") as fh:
                    for line_no, raw in enumerate(fh, 1):
                        yield f":{line_no}", partial(_parse_json_line, raw)
            except (OSError, EOFError) as err:  # a corrupt .gz, an unreadable file: the rest is one bad record
                yield f":{line_no + 1}", partial(_bad, "unreadable", f"cannot read: {err}")
                return
            if line_no == 0:
                yield "", partial(_bad, "empty", "empty file")
        elif kind == "json":
            try:
                raw = _read_bytes(path)
                data = json.loads(raw) if raw.strip() else None
            except UnicodeDecodeError:
                yield "", partial(_bad, "undecodable", "invalid UTF-8")
                return
            except json.JSONDecodeError as err:
                yield "", partial(_bad, "bad_json", f"not JSON ({err.msg})")
                return
            if data is None or data == []:
                yield "", partial(_bad, "empty", "empty file")
            elif isinstance(data, list):
                for i, item in enumerate(data):
                    yield f"[{i}]", partial(_identity, item)
            else:
                yield "", partial(_identity, data)
        else:
            yield from self._parquet_records(path)

    @staticmethod
    def _parquet_records(path: Path) -> Iterator[tuple[str, Callable[[], Any]]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            yield "", partial(_bad, "unreadable", f"not a readable parquet file ({str(err).splitlines()[0]})")
            return
        if table.metadata.num_rows == 0:
            yield "", partial(_bad, "empty", "empty file")
            return
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for item in batch.to_pylist():
                yield f"[{row}]", partial(_identity, item)
                row += 1


class HubSource:
    """A Hugging Face hub dataset, streamed (`datasets.load_dataset(..., streaming=True)`)."""

    expected_empty = False
    tail = None  # held out by content hash only: a hub stream cannot be measured up front

    def __init__(self, spec: SourceSpec, max_documents: int | None):
        self.name = spec.source
        self.dataset_id = spec.source.removeprefix("hf:")
        self.spec, self.max_documents = spec, max_documents
        self._open()  # fail here, at build time, not inside a worker process

    def _open(self) -> Any:
        from datasets import load_dataset

        try:
            return load_dataset(self.dataset_id, self.spec.hf_config, split=self.spec.hf_split,
                                data_files=self.spec.hf_data_files, streaming=True)
        except Exception as err:  # datasets raises many types; the user needs the first line only
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"cannot open hub dataset {self.dataset_id!r} (config={self.spec.hf_config}, "
                            f"split={self.spec.hf_split}): {first}") from None

    def records(self, shard: int, num_shards: int, start: int) -> Iterator[Record]:
        from datasets.distributed import split_dataset_by_node

        dataset = self._open()
        if self.max_documents is not None:
            dataset = dataset.take(self.max_documents)
        if num_shards > 1:
            dataset = split_dataset_by_node(dataset, rank=shard, world_size=num_shards)
        # Resuming re-reads the first `start` records of this shard's stream (hub streams cannot seek).
        for i, row in enumerate(itertools.islice(dataset, start, None), start):
            where = f"{self.name} (shard {shard}/{num_shards}, record {i})"
            yield i + 1, None, where, partial(_identity, row)


Source = LocalSource | HubSource


def open_source(spec: SourceSpec, cfg: DataConfig) -> Source:
    if spec.source == "stdlib":
        return LocalSource("stdlib", stdlib_files(), stdlib_root(), cfg.max_documents, errors="replace",
                           expected_empty=True)
    if spec.source.startswith("hf:"):
        return HubSource(spec, cfg.max_documents)
    if not spec.source:
        raise DataError(f"data.source is empty; valid: {VALID_SOURCES}")
    source = LocalSource.from_pattern(spec.source, cfg.max_documents)
    if cfg.heldout_fraction > 0:
        source.tail = heldout_tail(source, spec, cfg.heldout_fraction)
    return source


@dataclass(frozen=True)
class TailSplit:
    """Held out by position: records before `index` train, after it are held out, and record
    `index` is cut at character `cut` (head trains, tail is held out)."""

    index: int
    cut: int


_announced: set[tuple[str, float]] = set()


def heldout_tail(source: LocalSource, spec: SourceSpec, fraction: float) -> TailSplit | None:
    """None when the hash split gives training and held-out text a readable document each; otherwise
    where the last `fraction` of the source's text (at least MIN_HELDOUT_CHARS) begins. DataError
    when the source has too little text for a held-out set and a training set."""
    lengths: list[int] = []
    bad: list[str] = []
    sides = set()
    for _, key, where, load in source.records(0, 1, 0):
        try:
            text = record_text(load(), spec.text_field, spec.format)
        except BadRecord as err:
            lengths.append(0)
            if len(bad) < NAME_FIRST_BAD:
                bad.append(f"{where}: {err.detail}")
            continue
        sides.add(is_heldout(key, fraction))
        if len(sides) == 2:  # the hash split gives both sets a document
            return None
        lengths.append(len(text))
    total = sum(lengths)
    held = max(math.ceil(total * fraction), MIN_HELDOUT_CHARS)
    skipped = f"; bad records skipped: {'; '.join(bad)}" if bad else ""
    if total == 0:
        raise DataError(f"data source {source.name!r} has no readable text ({len(lengths)} record(s)){skipped}")
    if total < held + MIN_HELDOUT_CHARS:
        raise DataError(f"data source {source.name!r} has {total:,} characters of readable text in "
                        f"{sum(1 for n in lengths if n)} document(s); a held-out set and a training set need "
                        f"at least {held + MIN_HELDOUT_CHARS:,} ({held:,} held out, the rest to train on): "
                        f"add text{skipped}")
    start = total - held
    index = 0
    while start >= lengths[index]:
        start -= lengths[index]
        index += 1
    # From the start of a line where one begins shortly before the cut (a little more held out).
    _, _, _, load = next(iter(source.records(0, 1, index)))
    text = record_text(load(), spec.text_field, spec.format)
    line = text.rfind("\n", max(0, start - 1000), start)
    cut = line + 1 if line >= 0 else start
    if (source.name, fraction) not in _announced:
        _announced.add((source.name, fraction))
        logger.info("data source %s: holding out whole documents (data.heldout_fraction=%g of %d) would leave one "
                    "side empty, so its last %s characters are held out instead; training never reads them",
                    source.name, fraction, sum(1 for n in lengths if n), f"{total - sum(lengths[:index]) - cut:,}")
    return TailSplit(index, cut)


# ------------------------------------------------------------------------------------ formatting

def _is_alpaca(record: dict) -> bool:
    return isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str)


def _is_messages(record: dict) -> bool:
    messages = record.get("messages", record.get("conversations"))
    return isinstance(messages, list) and all(isinstance(m, dict) for m in messages) and bool(messages)


def format_chat(record: dict, tokenizer: Any = None) -> str:
    """An alpaca record (instruction, input, output) or a `messages` list as one training text.

    With a tokenizer that has a chat template, that template; otherwise a plain
    "### Instruction / ### Input / ### Response" layout.
    """
    if _is_alpaca(record):
        prompt = record["instruction"]
        extra = record.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raw = record.get("messages", record.get("conversations"))
        # ShareGPT style (from/value) and OpenAI style (role/content) both occur in the wild.
        roles = {"human": "user", "gpt": "assistant"}
        messages = [{"role": roles.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
                     "content": m.get("content", m.get("value", ""))} for m in raw]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if _is_alpaca(record):
        extra = record.get("input")
        parts = [f"### Instruction:\n{record['instruction']}"]
        if isinstance(extra, str) and extra.strip():
            parts.append(f"### Input:\n{extra}")
        parts.append(f"### Response:\n{record['output']}")
        return "\n\n".join(parts)
    return "\n\n".join(f"### {str(m['role']).capitalize()}:\n{m['content']}" for m in messages)


def record_text(record: Any, text_field: str = "text", fmt: str = "auto", tokenizer: Any = None) -> str:
    """The training text of one record; BadRecord if it has none."""
    if isinstance(record, str):
        text = record
    elif not isinstance(record, dict):
        raise BadRecord("missing_field", f"record is a {type(record).__name__}, not an object")
    elif fmt != "chat" and isinstance(record.get(text_field), str):
        text = record[text_field]
    elif fmt != "text" and (_is_alpaca(record) or _is_messages(record)):
        text = format_chat(record, tokenizer)
    else:
        wanted = f"no string field {text_field!r}"
        if fmt == "auto":
            wanted += " and no instruction/output or messages fields"
        elif fmt == "chat":
            wanted = "no instruction/output or messages fields"
        raise BadRecord("missing_field", f"{wanted} (keys: {sorted(record)[:8]})")
    if not text.strip():
        raise BadRecord("empty", "empty text")
    return text


# -------------------------------------------------------------------------------------- readers

def new_stats() -> Counter:
    return Counter()


class DocumentReader:
    """The documents of one source for one shard and split, with a resumable position.

    `position` is the source's record index just after the last document handed out; `epoch`
    counts completed passes. Both are updated before each yield, so a snapshot taken between
    documents resumes exactly after the last one consumed.
    """

    def __init__(self, source: Source, spec: SourceSpec, *, split: str, shard: int, num_shards: int,
                 heldout_fraction: float, on_bad_record: str, stats: Counter, tokenizer: Any = None):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        self.source, self.spec, self.split = source, spec, split
        self.shard, self.num_shards = shard, num_shards
        self.heldout_fraction, self.on_bad_record = heldout_fraction, on_bad_record
        self.stats, self.tokenizer = stats, tokenizer
        self.position = 0
        self.epoch = 0
        self._warned = 0
        self.first_bad: list[str] = []  # "where: what" of the first few bad records, for summaries

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])

    def _wanted(self, key: str) -> bool:
        heldout = self.heldout_fraction > 0 and is_heldout(key, self.heldout_fraction)
        if heldout and self.split == "train":
            self.stats["heldout_excluded"] += 1
        return heldout == (self.split == "heldout")

    def _skip(self, where: str, bad: BadRecord) -> None:
        if self.on_bad_record == "error":
            raise DataError(f"{where}: {bad.detail} (data.on_bad_record=skip would skip and count it)")
        self.stats["skipped"] += 1
        self.stats[f"skipped_{bad.reason}"] += 1
        if len(self.first_bad) < NAME_FIRST_BAD:
            self.first_bad.append(f"{where}: {bad.detail}")
        if bad.reason == "empty" and self.source.expected_empty:
            logger.debug("skipping empty record %s", where)
            return
        self._warned += 1
        if self._warned <= WARN_FIRST_BAD:
            more = " (further bad records are only counted)" if self._warned == WARN_FIRST_BAD else ""
            logger.warning("skipping bad record %s: %s%s", where, bad.detail, more)

    def _side(self, index: int) -> str:
        """train, heldout or both (the record cut in two) when held out by position (source.tail)."""
        tail = self.source.tail
        side = "train" if index < tail.index else "heldout" if index > tail.index else "both"
        if side == "heldout" and self.split == "train":
            self.stats["heldout_excluded"] += 1
        return side

    def read_epoch(self) -> Iterator[str]:
        """Documents from `position` to the end of the current epoch."""
        tail = self.source.tail
        for position, key, where, load in self.source.records(self.shard, self.num_shards, self.position):
            self.position = position
            if tail is not None:
                if self._side(position - 1) not in (self.split, "both"):
                    continue
            elif key is not None and not self._wanted(key):
                continue
            try:
                text = record_text(load(), self.spec.text_field, self.spec.format, self.tokenizer)
            except BadRecord as bad:
                self._skip(where, bad)
                continue
            if tail is not None and position - 1 == tail.index:
                text = text[:tail.cut] if self.split == "train" else text[tail.cut:]
                if not text.strip():
                    continue
            elif tail is None and key is None and not self._wanted(f"{self.source.name}\n{text}"):
                continue
            self.stats["documents"] += 1
            yield text

    def bad_summary(self) -> str:
        """'; first bad records: a.jsonl:3: not JSON (...), ...' or ''."""
        return f"; first bad records: {'; '.join(self.first_bad)}" if self.first_bad else ""

    def forever(self) -> Iterator[str]:
        """Documents over endless epochs; an epoch that yields nothing from its start is an error."""
        while True:
            from_start = self.position == 0
            count = 0
            for text in self.read_epoch():
                count += 1
                yield text
            if from_start and count == 0:
                raise DataError(
                    f"data source {self.source.name!r} has no {self.split} documents for shard "
                    f"{self.shard} of {self.num_shards} (stats: {dict(self.stats)}); "
                    f"use more data or fewer ranks/workers{self.bad_summary()}")
            self.epoch += 1
            self.position = 0
            self.stats["epochs"] += 1
            logger.info("data source %s, shard %d/%d: epoch %d done; %s", self.source.name, self.shard,
                        self.num_shards, self.epoch, dict(self.stats))


def iter_documents(cfg: Any, split: str = "train", tokenizer: Any = None) -> Iterator[str]:
    """Texts of every document of `split` ("train" or "heldout"), one pass, in source order.

    For a mixture, the components one after another. The tokenizer is only used for chat
    formatting (its chat template). Missing paths raise here, before the first document.
    """
    cfg = as_data_config(cfg)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    specs = source_specs(cfg)
    sources = [open_source(spec, cfg) for spec in specs]
    return _documents(cfg, split, tokenizer, specs, sources)


def _documents(cfg: DataConfig, split: str, tokenizer: Any, specs: list[SourceSpec],
               sources: list[Source]) -> Iterator[str]:
    stats = new_stats()
    bad = ""
    for spec, source in zip(specs, sources):
        reader = DocumentReader(source, spec, split=split, shard=0, num_shards=1,
                                heldout_fraction=cfg.heldout_fraction, on_bad_record=cfg.on_bad_record,
                                stats=stats, tokenizer=tokenizer)
        yield from reader.read_epoch()
        bad += reader.bad_summary()
    logger.info("read %s documents of %s: %s%s", split, ", ".join(s.source for s in specs), dict(stats), bad)
