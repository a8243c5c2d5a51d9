"""Checkpoints with torch.distributed.checkpoint, written atomically, the last K kept.

Layout: <run>/checkpoints/step-00000120/ holds the DCP shards of model + optimizer + scheduler,
`rank-<r>.pt` per rank (data-loader state and RNG, which differ per rank) and `meta.json` (stage,
step, tokens). Everything is written into `.step-00000120.tmp` first and renamed by rank 0 after all
ranks finished, so a directory named step-* is always complete: a job killed mid-write leaves only
a .tmp directory, which is ignored and removed, and the previous checkpoint still loads.

A checkpoint damaged afterwards (a truncated shard, a deleted file: a full disk, a copy cut short)
is found before anything loads: resuming warns and takes the newest complete one; when none is
complete the run stops with a one-line error rather than silently starting again from step 0. The
damaged directory stays where it is until a new checkpoint of the same step moves it aside.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..config import ConfigError
from ..errors import UserError

logger = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def checkpoint_root(run: Path) -> Path:
    return run / "checkpoints"


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint, or None when the run has none; damaged newer ones are skipped
    with a warning, and a run whose checkpoints are all damaged is a CheckpointError."""
    found = sorted(checkpoint_root(run).glob("step-*"), reverse=True)
    damaged = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged:
                logger.warning("checkpoint %s is damaged (%s); resuming from the previous one, %s", bad, why,
                               path.name)
            return path
        damaged.append((path, problem))
    if damaged:
        bad, why = damaged[0]
        raise CheckpointError(f"checkpoint {bad} is damaged ({why}) and no older complete checkpoint is left in "
                              f"{checkpoint_root(run)}; restore it, or remove {checkpoint_root(run)} to start the "
                              "run again from step 0")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """What is missing or cut short in a checkpoint directory, or None when it is complete: meta.json,
    every rank-<r>.pt, DCP's .metadata and every byte range it lists in the shard files."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or not {"stage", "stage_step", "step", "tokens"} <= meta.keys():
            return "meta.json lacks stage/step"
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError) as err:
        return f"meta.json is unreadable: {err}"
    ranks = sorted(int(p.name[5:-3]) for p in path.glob("rank-*.pt") if p.name[5:-3].isdigit())
    if ranks != list(range(len(ranks))) or not ranks:
        return f"rank files {ranks or 'missing'}; expected rank-0.pt ... rank-N.pt"
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as err:  # a missing or truncated .metadata raises whatever the unpickler meets
        return f"DCP .metadata is unreadable ({type(err).__name__})"
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size:,} of {size:,} bytes)"
    return None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rank_state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = checkpoint_root(run) / f"step-{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_is_fine():
        dcp.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()},
                 checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # a damaged checkpoint of this step that the resume skipped: keep it aside
            n = 0
            while (aside := final.with_name(f".{final.name}.damaged-{n}")).exists():
                n += 1
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in sorted(checkpoint_root(run).glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model/optimizer/scheduler in place; returns (meta, this rank's state)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    ranks, world_size = len(list(path.glob("rank-*.pt"))), dist.get_world_size() if dist.is_initialized() else 1
    if ranks != world_size:  # each rank's data position is its own: another count would skip or repeat data
        raise ConfigError(f"checkpoint {path} was written by {ranks} processes, this job has {world_size}; "
                          f"resume with {ranks} processes (or start a new run with another out=)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict()}
    try:
        with _one_process_is_fine():
            dcp.load(state, checkpoint_id=str(path))
        rank_state = torch.load(path / f"rank-{rank}.pt", weights_only=False)
    except Exception as err:  # complete on disk yet unreadable: bytes damaged inside a file
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"checkpoint {path} is damaged ({type(err).__name__}: {first}); "
                              f"move it out of {path.parent} and rerun to resume from the previous one") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return json.loads((path / "meta.json").read_text()), rank_state


def load_model_weights(path: Path, model: nn.Module) -> None:
    """The model's weights alone from a checkpoint (no optimizer): to turn a step into a model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged ({problem}); choose another step=")
    state = {"model": get_model_state_dict(model)}
    try:
        with _one_process_is_fine():
            dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # complete on disk yet unreadable, or written by another model
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {first})") from None
    set_model_state_dict(model, state["model"])


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in checkpoint_root(run).glob("step-*") if p.name[5:].isdigit())


def remove_partial_checkpoints(run: Path) -> None:
    for partial in checkpoint_root(run).glob(".step-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns on every save and load without a process group; one process is a supported case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
