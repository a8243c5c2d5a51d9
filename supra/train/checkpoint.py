"""Checkpoints with torch.distributed.checkpoint, written atomically, the last K kept.

Layout: <run>/checkpoints/step-00000120/ holds the DCP shards of model + optimizer + scheduler,
`rank-<r>.pt` per rank (data-loader state and RNG, which differ per rank) and `meta.json` (stage,
step, tokens). Everything is written into `.step-00000120.tmp` first and renamed by rank 0 after all
ranks finished, so a directory named step-* is always complete: a job killed mid-write leaves only
a .tmp directory, which is ignored and removed, and the previous checkpoint still loads.
"""

from __future__ import annotations

import json
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


def checkpoint_root(run: Path) -> Path:
    return run / "checkpoints"


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted(checkpoint_root(run).glob("step-*"))
    return found[-1] if found else None


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
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rank_file = path / f"rank-{rank}.pt"
    return json.loads((path / "meta.json").read_text()), torch.load(rank_file, weights_only=False)


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
