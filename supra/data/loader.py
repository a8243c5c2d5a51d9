"""The training loader: sharded, shuffled, packed batches that loop over epochs, with exact resume.

Shards: each rank reads S = max(1, num_workers) independent *streams*; stream k of rank r is shard
r * S + k of world_size * S, so every document goes to exactly one stream. With num_workers > 0
each stream runs in its own DataLoader worker, which makes whole batches; batches come round-robin
from the streams (stream 0, 1, ..., S-1, 0, ...). num_workers=0 and 1 give the same data.

A stream: documents from its sources (a weighted random pick per document for a mixture) ->
shuffle buffer -> tokeniser -> packer. Its state (source positions and epochs, RNG, shuffle buffer,
leftover tokens, counts) travels with each batch from the worker, the shuffle buffer as the few
operations since the previous batch (replayed on a mirror in the main process), so the loader always
knows the state right after the last batch it handed out; `state_dict()` is that, plus which stream
gives the next batch. `load_state_dict()` restarts every stream from its saved state, so the
next batch is bit-identical to the one an uninterrupted loader would have given.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig, DataError, as_data_config
from .packing import Packer, to_tensors
from .sources import DocumentReader, Source, SourceSpec, new_stats, open_source, source_specs

logger = logging.getLogger(__name__)
STATE_VERSION = 1
# The shuffle buffer also stops filling at this many characters: a corpus of a few big documents
# (one 6 MB text file) would otherwise hold shuffle_buffer copies of them, in memory and in checkpoints.
MAX_BUFFER_CHARS = 16_000_000
# Settings that decide which documents, in which order: resuming with any of them changed would
# silently train on a different stream, so load_state_dict refuses.
STREAM_SETTINGS = ("source", "hf_config", "hf_split", "hf_data_files", "text_field", "format", "mixture",
                   "separator", "heldout_fraction", "seed", "max_documents")


class ShardStream:
    """One shard's endless sequence of packed batches (numpy int32 arrays)."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, seq_len: int, shard: int, num_shards: int,
                 specs: list[SourceSpec] | None = None, sources: list[Source] | None = None):
        self.cfg = cfg
        self.shard, self.num_shards = shard, num_shards
        specs = specs if specs is not None else source_specs(cfg)
        sources = sources if sources is not None else [open_source(s, cfg) for s in specs]
        self.stats: Counter = new_stats()
        self.readers = [DocumentReader(source, spec, split="train", shard=shard, num_shards=num_shards,
                                       heldout_fraction=cfg.heldout_fraction, on_bad_record=cfg.on_bad_record,
                                       stats=self.stats, tokenizer=tokenizer)
                        for spec, source in zip(specs, sources)]
        weights = np.array([s.weight for s in specs], dtype=np.float64)
        self.cum_weights = list(np.cumsum(weights / weights.sum()))
        # The RNG (mixture picks and shuffle) is seeded per shard and then carried in the state,
        # so each epoch's order differs and a resumed run draws the very numbers it would have.
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, shard, num_shards])))
        self.buffer: list[str] = []
        self.buffer_chars = 0
        # With record_buffer_ops, buffer changes are logged (a str: appended; an int: index taken) so
        # a worker can send its state as a small delta instead of the whole buffer with every batch.
        self.buffer_ops: list[str | int] | None = None
        self.packer = Packer(tokenizer, seq_len, cfg.separator)
        self._iters: list[Iterator[str]] | None = None

    def _next_document(self) -> str:
        if self._iters is None:  # made lazily: after load_state_dict they start from the loaded positions
            self._iters = [reader.forever() for reader in self.readers]
        if len(self._iters) == 1:
            return next(self._iters[0])
        pick = min(bisect.bisect_right(self.cum_weights, self.rng.random()), len(self._iters) - 1)
        return next(self._iters[pick])

    def _next_shuffled(self) -> str:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            return self._next_document()
        while len(self.buffer) < size and self.buffer_chars < MAX_BUFFER_CHARS:
            doc = self._next_document()
            self.buffer.append(doc)
            self.buffer_chars += len(doc)
            if self.buffer_ops is not None:
                self.buffer_ops.append(doc)
        # Swap-remove: O(1), and the order of the rest of the buffer is still a function of the RNG.
        j = int(self.rng.integers(len(self.buffer)))
        if self.buffer_ops is not None:
            self.buffer_ops.append(j)
        doc = swap_remove(self.buffer, j)
        self.buffer_chars -= len(doc)
        return doc

    def next_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        need = batch_size * self.packer.seq_len
        while self.packer.pending < need:
            # Tokenise about as many documents as the batch still needs (by the running mean length),
            # so the leftover, which is part of every state, stays near one document.
            mean = self.stats["tokens"] / self.stats["tokenized_documents"] if self.stats["tokens"] else 512.0
            wanted = np.ceil((need - self.packer.pending) / max(mean, 1.0))
            count = int(min(self.cfg.tokenize_batch, max(1, wanted)))
            texts = [self._next_shuffled() for _ in range(count)]
            self.stats["tokens"] += self.packer.add(texts)
            self.stats["tokenized_documents"] += len(texts)
        batch = self.packer.take(batch_size)
        assert batch is not None  # the loop above made enough tokens
        self.stats["rows"] += batch_size
        return batch

    def state_dict(self, with_buffer: bool = True) -> dict[str, Any]:
        return {"shard": self.shard, "num_shards": self.num_shards,
                "readers": [r.state_dict() for r in self.readers],
                "rng": self.rng.bit_generator.state, "buffer": list(self.buffer) if with_buffer else None,
                "packer": self.packer.state_dict(), "stats": dict(self.stats)}

    def delta_state(self) -> tuple[dict[str, Any], list[str | int]]:
        """The state without the buffer, and the buffer operations since the previous call."""
        ops, self.buffer_ops = self.buffer_ops or [], []
        return self.state_dict(with_buffer=False), ops

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["shard"], state["num_shards"]) != (self.shard, self.num_shards):
            raise DataError(f"stream state is for shard {state['shard']}/{state['num_shards']}, "
                            f"not {self.shard}/{self.num_shards}")
        if len(state["readers"]) != len(self.readers):
            raise DataError("data loader state has a different number of sources than data.mixture")
        for reader, reader_state in zip(self.readers, state["readers"]):
            reader.load_state_dict(reader_state)
        self.rng.bit_generator.state = state["rng"]
        self.buffer = list(state["buffer"])
        self.buffer_chars = sum(map(len, self.buffer))
        self.packer.load_state_dict(state["packer"])
        self.stats.clear()
        self.stats.update(state["stats"])
        self._iters = None


def swap_remove(items: list, j: int) -> Any:
    """Remove and return items[j] in O(1) (the last item takes its place)."""
    item = items[j]
    items[j] = items[-1]
    items.pop()
    return item


def replay_buffer_ops(buffer: list[str], ops: list[str | int]) -> None:
    for op in ops:
        if isinstance(op, str):
            buffer.append(op)
        else:
            swap_remove(buffer, op)


class _WorkerStreams(IterableDataset):
    """DataLoader side: worker j runs stream (first + j) % S and yields (stream, batch, delta state)."""

    def __init__(self, loader: TrainLoader, states: list[dict | None], first: int):
        self.loader, self.states, self.first = loader, states, first

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, Any]]]:
        info = get_worker_info()
        assert info is not None, "_WorkerStreams runs only inside DataLoader workers"
        # Each worker is one core's worth of tokenising; the tokenizer's own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        k = (self.first + info.id) % info.num_workers
        stream = self.loader.make_stream(k)
        if self.states[k] is not None:
            stream.load_state_dict(self.states[k])
        stream.buffer_ops = []
        while True:
            batch = stream.next_batch(self.loader.batch_size)
            yield k, to_tensors(batch), stream.delta_state()


class TrainLoader:
    """Endless training batches for one rank: dicts of (batch_size, seq_len) int64 tensors
    `input_ids`, `labels`, `position_ids` (conventions in supra.data.packing).

    Iterating continues after the last batch handed out, also across `iter()` calls and after
    `load_state_dict`. `stats()` sums the counts of this rank's streams.
    """

    def __init__(self, cfg: Any, tokenizer: Any, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        self.cfg = as_data_config(cfg)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_streams = max(1, self.cfg.num_workers)
        self.specs = source_specs(self.cfg)
        self.sources = [open_source(spec, self.cfg) for spec in self.specs]  # missing paths fail here
        Packer(tokenizer, seq_len, self.cfg.separator)  # so does a tokenizer without EOS/BOS
        self._states: list[dict | None] = [None] * self.num_streams
        self._next = 0
        self._live: ShardStream | None = None  # num_workers=0: the stream itself, state read on demand
        self._mirrors: list[list[str]] = [[] for _ in range(self.num_streams)]  # workers' shuffle buffers
        logger.info("data: %s, rank %d/%d, %d stream(s), seq_len %d, batch %d",
                    ", ".join(f"{s.source} (weight {s.weight:g})" for s in self.specs), rank, world_size,
                    self.num_streams, seq_len, batch_size)

    def make_stream(self, k: int) -> ShardStream:
        return ShardStream(self.cfg, self.tokenizer, self.seq_len, self.rank * self.num_streams + k,
                           self.world_size * self.num_streams, specs=self.specs, sources=self.sources)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.cfg.num_workers == 0:
            yield from self._iter_in_process()
        else:
            yield from self._iter_workers()

    def _iter_in_process(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._live is None:
            self._live = self.make_stream(0)
            if self._states[0] is not None:
                self._live.load_state_dict(self._states[0])
        stream = self._live
        while True:
            yield to_tensors(stream.next_batch(self.batch_size))

    def _iter_workers(self) -> Iterator[dict[str, torch.Tensor]]:
        # The main process mirrors each worker's shuffle buffer by replaying the operations sent with
        # every batch; shipping whole buffers (megabytes of text) per batch would cost more than tokenising.
        states = self._stream_states()
        buffers = [list(s["buffer"]) if s is not None else [] for s in states]
        dataset = _WorkerStreams(self, states, self._next)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_streams, prefetch_factor=4)
        self._mirrors = buffers
        for k, batch, (state, ops) in loader:
            replay_buffer_ops(buffers[k], ops)
            self._states[k] = state
            self._next = (k + 1) % self.num_streams
            yield batch

    def _stream_states(self) -> list[dict | None]:
        if self._live is not None:
            return [self._live.state_dict()]
        states = []
        for state, mirror in zip(self._states, self._mirrors):
            if state is not None and state["buffer"] is None:
                state = {**state, "buffer": list(mirror)}
            states.append(state)
        return states

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the last batch handed out (torch.save-able)."""
        settings = asdict(self.cfg)
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "num_streams": self.num_streams, "next_stream": self._next,
                "settings": {k: settings[k] for k in STREAM_SETTINGS}, "vocab_size": len(self.tokenizer),
                "streams": self._stream_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        saved = (state["world_size"], state["num_streams"])
        if saved != (self.world_size, self.num_streams):
            raise DataError(
                f"cannot resume the data stream: it was saved with world_size={saved[0]} and "
                f"{saved[1]} stream(s) per rank (data.num_workers={saved[1] if saved[1] > 1 else '0 or 1'}), "
                f"this run "
                f"has world_size={self.world_size} and {self.num_streams}; documents are sharded over "
                f"world_size x streams, so a change would repeat or skip data. Use the same world size and "
                f"data.num_workers to resume")
        if state["rank"] != self.rank:
            raise DataError(f"data loader state of rank {state['rank']} loaded on rank {self.rank}")
        settings = asdict(self.cfg)
        changed = [k for k in STREAM_SETTINGS if state["settings"].get(k) != settings[k]]
        if changed:
            raise DataError(f"cannot resume the data stream: data settings {changed} differ from the "
                            "checkpoint's")
        if state["vocab_size"] != len(self.tokenizer):
            raise DataError("cannot resume the data stream: the tokenizer differs from the checkpoint's "
                            f"(vocabulary {len(self.tokenizer)} vs {state['vocab_size']})")
        self._states = list(state["streams"])
        self._mirrors = [list(s["buffer"]) if s is not None else [] for s in self._states]
        self._next = int(state["next_stream"])
        self._live = None

    def stats(self) -> dict[str, int]:
        """Counts of this rank: documents, tokens, rows, heldout_excluded, skipped (+ by reason), epochs."""
        total: Counter = Counter()
        for state in [self._live.state_dict(with_buffer=False)] if self._live is not None else self._states:
            if state is not None:
                total.update(state["stats"])
        return dict(total)

    def log_stats(self, level: int = logging.INFO) -> dict[str, int]:
        stats = self.stats()
        readable = ", ".join(f"{name.replace('_', ' ')} {value:,}" for name, value in stats.items())
        logger.log(level, "data rank %d: %s", self.rank, readable)
        return stats


def build_train_loader(cfg: Any, tokenizer: Any, seq_len: int, batch_size: int, rank: int = 0,
                       world_size: int = 1) -> TrainLoader:
    """The training loader of one rank; `cfg` is a DataConfig, a recipe's `data` node or a dict."""
    return TrainLoader(cfg, tokenizer, seq_len, batch_size, rank=rank, world_size=world_size)
