"""Attention transfer block by block (LoLCATs' block-wise mode), for models whose training does not fit.

Decoder layers are split into blocks of `block_layers`. Teacher forcing makes the input of every
layer the original model's hidden state there, which depends on frozen weights only; so block b's
inputs are computed once for the whole stage (block b-1's inputs through its layers, softmax
attention only), kept on disk, and block b then trains alone from them: it is the only block on
the accelerator. Its new parameters are saved when it is done; together the blocks are the model.

Under <run>/blocks/stage-<i>/: batches.pt (the stage's micro-batches, drawn once so every block sees
the same data, and the data loader's state after them), inputs-<b>/ (block b's inputs, one file per
micro-batch, complete once `done` exists) and block-<b>.pt (block b's trained parameters: it is
finished). A stopped run resumes at the first unfinished block, from that block's first step.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..layers.attention import RecurrentAttention
from ..layers.linearize import decoder_layers
from .optim import optimizer_step
from .plan import StagePlan
from .settings import StageConfig
from .transfer import reported_transfer_loss, teacher_layers, transfer_losses

# Called after every optimizer step with (loss, grad_norm, optimizer, seconds); True means stop now.
StepDone = Callable[[float, float, torch.optim.Optimizer, float], bool]


def block_ranges(layers: int, size: int) -> list[range]:
    return [range(start, min(start + size, layers)) for start in range(0, layers, size)]


def stage_dir(run: Path, stage_index: int) -> Path:
    return run / "blocks" / f"stage-{stage_index}"


def finished_blocks(run: Path, stage_index: int) -> int:
    done = 0
    while (stage_dir(run, stage_index) / f"block-{done}.pt").exists():
        done += 1
    return done


def transfer_blockwise(model: nn.Module, loader: Any, stage: StageConfig, plan: StagePlan,
                       make_optimizer: Callable, device: torch.device, grad_clip: float, run: Path,
                       stage_index: int, step_done: StepDone) -> bool:
    """Train every unfinished block; returns True when step_done asked to stop (the block restarts)."""
    home = stage_dir(run, stage_index)
    layers = decoder_layers(model)
    blocks = block_ranges(len(layers), stage.block_layers)
    batches = _stage_batches(home, loader, plan.steps * plan.accumulation)
    done = finished_blocks(run, stage_index)
    for b in range(done):
        block_module(layers, blocks[b]).load_state_dict(torch.load(home / f"block-{b}.pt"), strict=False)
    for b in range(done, len(blocks)):
        block = block_module(layers, blocks[b])
        inputs = _block_inputs(home, b, model, layers, blocks, batches, device)
        optimizer, scheduler = make_optimizer(block)
        with on_device(block, device):
            for step in range(plan.steps):
                started = time.perf_counter()
                loss, grad_norm = _block_step(block, inputs, batches, step, plan, optimizer, scheduler, grad_clip,
                                              model, device)
                if step_done(loss, grad_norm, optimizer, time.perf_counter() - started):
                    return True
        trained = {name: p.detach().cpu() for name, p in block.named_parameters() if p.requires_grad}
        _atomic_save(trained, home / f"block-{b}.pt")
        if b > 0:
            shutil.rmtree(home / f"inputs-{b - 1}", ignore_errors=True)  # block b's inputs are the last needed
    return False


def remove_stage_cache(run: Path, stage_index: int) -> None:
    """After the stage's checkpoint: the cached inputs and block files are no longer needed."""
    shutil.rmtree(stage_dir(run, stage_index), ignore_errors=True)


def block_module(layers: nn.ModuleList, indices: range) -> nn.ModuleList:
    return nn.ModuleList(layers[i] for i in indices)


@contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """The module on `device` for the block, back where it was afterwards (offloading a CPU model)."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


def _block_step(block: nn.ModuleList, inputs: Path, batches: list[dict], step: int, plan: StagePlan,
                optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float, model: nn.Module,
                device: torch.device) -> tuple[float, float]:
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    layers = [m for m in block.modules() if isinstance(m, RecurrentAttention)]
    for micro in range(step * plan.accumulation, (step + 1) * plan.accumulation):
        hidden = torch.load(inputs / f"{micro}.pt").to(device)
        with transfer_losses(layers, 1.0 / plan.accumulation, layerwise=True) as losses, torch.no_grad():
            _run_block(model, block, hidden, batches[micro]["position_ids"].to(device))
        total += reported_transfer_loss(losses).item() / plan.accumulation
    return total, optimizer_step(block, optimizer, scheduler, total, grad_clip)


def _run_block(model: nn.Module, block: nn.ModuleList, hidden: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
    position_embeddings = model.get_decoder().rotary_emb(hidden, position_ids)  # follows hidden's device
    for layer in block:
        out = layer(hidden, position_embeddings=position_embeddings, position_ids=position_ids)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _stage_batches(home: Path, loader: Any, count: int) -> list[dict]:
    """The stage's micro-batches, drawn once; a rerun reloads them and the loader's position after."""
    path = home / "batches.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        loader.load_state_dict(saved["loader"])
        return saved["batches"]
    batches_iter = iter(loader)
    batches = [{k: v for k, v in next(batches_iter).items() if k != "labels"} for _ in range(count)]
    home.mkdir(parents=True, exist_ok=True)
    _atomic_save({"batches": batches, "loader": loader.state_dict()}, path)
    return batches


def _block_inputs(home: Path, b: int, model: nn.Module, layers: nn.ModuleList, blocks: list[range],
                  batches: list[dict], device: torch.device) -> Path:
    """inputs-<b>/, computed from inputs-<b-1> (or the embeddings) when not complete on disk."""
    target = home / f"inputs-{b}"
    if (target / "done").exists():
        return target
    if b > 0:
        source = _block_inputs(home, b - 1, model, layers, blocks, batches, device)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    previous = block_module(layers, blocks[b - 1]) if b > 0 else model.get_input_embeddings()
    recurrent = [m for m in previous.modules() if isinstance(m, RecurrentAttention)]
    with on_device(previous, device), torch.no_grad(), teacher_layers(recurrent):
        for i, batch in enumerate(batches):
            if b == 0:
                hidden = previous(batch["input_ids"].to(device))
            else:
                hidden = _run_block(model, previous, torch.load(source / f"{i}.pt").to(device),
                                    batch["position_ids"].to(device))
            torch.save(hidden.cpu(), target / f"{i}.pt")
    (target / "done").touch()
    return target


def _atomic_save(value: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(value, tmp)
    tmp.replace(path)


def check_blockwise(stages: list[StageConfig], distributed: bool) -> None:
    if distributed and any(s.block_layers for s in stages):
        raise ConfigError("block_layers (block-wise attention transfer) runs in one process: the blocks are what "
                          "keep memory small; launch without torchrun, or set block_layers=0 to use FSDP")
