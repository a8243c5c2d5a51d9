"""The one training loop: runs the recipe's stages in order, checkpointing inside and between them.

Resuming is rerunning: the latest complete checkpoint gives the stage, the step inside it, the
model, optimizer, scheduler, data-loader position and RNG, so the next step is the one that would
have come. SIGTERM/SIGUSR1 (SLURM's warning before a time limit or preemption) and SIGUSR2 (submitit's,
under supra-launch) make the job write a checkpoint at the next step boundary and exit with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import math
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data import build_train_loader
from ..errors import UserError
from ..evaluate.perplexity import HeldoutPerplexity
from ..layers.linearize import decoder_layers
from ..models import torch_dtype
from .blockwise import block_ranges, check_blockwise, finished_blocks, remove_stage_cache, transfer_blockwise
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .parallel import World, all_reduce_max, all_reduce_mean
from .plan import FLOPS_PER_PARAM, StagePlan, plan_stages
from .progress import ProgressLog
from .stages import micro_batch_loss, set_trainable

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: scripts/slurm/uptrain.sbatch requeues the job on it


class TrainingStopped(UserError):
    """Training cannot go on (e.g. the loss kept diverging); the last good checkpoint is intact."""


class StopSignal:
    """Remembers a SIGTERM/SIGUSR1/SIGUSR2 so the loop can stop cleanly at the next step boundary.

    SIGUSR2 is submitit's time-limit/preemption signal: taking it here (over submitit's own handler,
    which would requeue at once, mid-step) lets the ranks write their checkpoint first; supra/launch.py
    then hands the signal on to submitit, which requeues the job. The handlers stay installed after
    train() returns, and supra/launch.py reads `received` from them."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to floor (= min_lr / lr) at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, stage: DictConfig, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(stage.betas), weight_decay=stage.weight_decay)
    floor = stage.min_lr / stage.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, stage.warmup_steps, steps, floor))
    return optimizer, scheduler


class Counters:
    """The run's step and token counts, and the bookkeeping after every optimizer step (non-finite
    guard, metrics, stop signal) that the plain and block-wise stage loops share."""

    def __init__(self, cfg: DictConfig, world: World, flops_params: int) -> None:
        self.cfg, self.world, self.flops_params = cfg, world, flops_params
        self.step = self.tokens = self.bad_in_a_row = 0
        self.log: ProgressLog | None = None
        self.stop = StopSignal()

    def step_done(self, stage: DictConfig, plan: StagePlan, loss: float, grad_norm: float,
                  optimizer: torch.optim.Optimizer, elapsed: float) -> bool:
        """Count, guard and log one optimizer step; True when a stop signal arrived (on any rank)."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        if self.bad_in_a_row:
            self.log.message(f"step {self.step + 1}: non-finite loss/gradient, step skipped "
                             f"({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row > self.cfg.train.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_a_row} non-finite steps in a row in stage {stage.name}; stopped. The last "
                    "good checkpoint is intact: lower the learning rate or check the data, then rerun")
        self.step, self.tokens = self.step + 1, self.tokens + plan.tokens_per_step
        self.log.log(_record(self.step, stage.name, loss, grad_norm, optimizer, plan, self.tokens, elapsed,
                             self.flops_params, self.cfg, self.world))
        return all_reduce_max(float(self.stop.received is not None), self.world) > 0


def train(cfg: DictConfig, run: Path, model: nn.Module, tokenizer: Any, world: World, flops_params: int) -> int:
    """Run (or resume) every stage; returns 0 when done, REQUEUE_EXIT_CODE when stopped by a signal."""
    check_blockwise(list(cfg.train.stages), world.distributed)
    plans = plan_stages(cfg, world.world_size)
    loader = build_train_loader(cfg.data, tokenizer, cfg.seq_len, cfg.train.micro_batch_size, world.rank,
                                world.world_size)
    counters = Counters(cfg, world, flops_params)
    if world.is_main:
        remove_partial_checkpoints(run)
    stage_index, stage_step = 0, 0
    latest = latest_checkpoint(run)
    if latest is not None:
        stage_index = _read_meta(latest)["stage"]
    layers = len(decoder_layers(model))
    total_steps = sum(p.steps * (len(block_ranges(layers, s.block_layers)) if s.block_layers else 1)
                      for p, s in zip(plans, cfg.train.stages))
    heldout = HeldoutPerplexity(cfg, tokenizer)
    try:
        while stage_index < len(plans):
            stage, plan = cfg.train.stages[stage_index], plans[stage_index]
            blockwise = stage.block_layers > 0
            if not world.distributed and not blockwise:
                model.to(world.device)  # a block-wise stage before may have left the model offloaded
            set_trainable(model, stage)
            optimizer, scheduler = make_optimizer(model, stage, plan.steps)
            if latest is not None:
                meta, rank_state = load_checkpoint(latest, model, optimizer, scheduler)
                loader.load_state_dict(rank_state["data"])
                set_rng_state(rank_state["rng"])
                stage_step, counters.tokens, counters.step = meta["stage_step"], meta["tokens"], meta["step"]
                latest = None
            if blockwise and stage_step < plan.steps:  # blocks finished before a stop count as done
                done = finished_blocks(run, stage_index) * plan.steps
                counters.step, counters.tokens = counters.step + done, counters.tokens + done * plan.tokens_per_step
            if counters.log is None:
                counters.log = ProgressLog(run, total_steps, counters.step, cfg.train.logger,
                                           OmegaConf.to_container(cfg, resolve=True), world.is_main)
                if counters.step:
                    counters.log.message(f"resumed from step {counters.step} (stage {stage.name}, "
                                         f"step {stage_step})")
            log = counters.log
            if stage_step < plan.steps:
                blocks = f", in blocks of {stage.block_layers} layers" if blockwise else ""
                log.message(f"stage {stage_index + 1}/{len(plans)} {stage.name}: {plan.steps} steps of "
                            f"{plan.tokens_per_step:,} tokens ({plan.accumulation} micro-batches/rank){blocks}")
            counters.bad_in_a_row = 0
            checkpoint = partial(_checkpoint, run, counters, stage_index, stage, model, optimizer, scheduler, loader)
            if blockwise and stage_step < plan.steps:
                block_optimizer = partial(make_optimizer, stage=stage, steps=plan.steps)
                if transfer_blockwise(model, loader, stage, plan, block_optimizer, world.device, cfg.train.grad_clip,
                                      run, stage_index, partial(counters.step_done, stage, plan)):
                    log.message(f"signal received at step {counters.step}: finished blocks are saved, the current "
                                f"one restarts on the rerun; exiting with {REQUEUE_EXIT_CODE} so the scheduler "
                                "requeues the job")
                    return REQUEUE_EXIT_CODE
                stage_step = plan.steps
                checkpoint(stage_step)
                remove_stage_cache(run, stage_index)
            batches = iter(loader)
            while stage_step < plan.steps:
                started = time.perf_counter()
                loss, grad_norm = train_step(model, batches, optimizer, stage, plan, cfg, world)
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    scheduler.step()
                stage_step += 1
                stopping = counters.step_done(stage, plan, loss, grad_norm, optimizer, time.perf_counter() - started)
                every = cfg.train.eval_every
                if every and (stage_step % every == 0 or stage_step == plan.steps):
                    # Every rank scores the same text: FSDP's forward needs all of them.
                    result = heldout(model)
                    log.log_eval({"step": counters.step, "stage": stage.name, "tokens": counters.tokens,
                                  "heldout_ppl": result["ppl"], "heldout_loss": result["loss"],
                                  "heldout_tokens": result["tokens"]})
                if stopping or stage_step % cfg.train.checkpoint_every == 0 or stage_step == plan.steps:
                    checkpoint(stage_step)
                if stopping:
                    log.message(f"signal received: checkpoint written at step {counters.step}; exiting with "
                                f"{REQUEUE_EXIT_CODE} so the scheduler requeues the job")
                    return REQUEUE_EXIT_CODE
            if world.is_main:
                loader.log_stats()
            stage_index, stage_step = stage_index + 1, 0
    finally:
        if counters.log is not None:
            counters.log.close()
    return 0


def _checkpoint(run: Path, counters: Counters, stage_index: int, stage: DictConfig, model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any, stage_step: int) -> None:
    meta = {"stage": stage_index, "stage_name": stage.name, "stage_step": stage_step, "tokens": counters.tokens}
    rank_state = {"data": loader.state_dict(), "rng": rng_state()}
    save_checkpoint(run, counters.step, model, optimizer, scheduler, rank_state, meta,
                    counters.cfg.train.keep_checkpoints)


def train_step(model: nn.Module, batches, optimizer: torch.optim.Optimizer, stage: DictConfig, plan: StagePlan,
               cfg: DictConfig, world: World) -> tuple[float, float]:
    """One optimizer step over `plan.accumulation` micro-batches; a non-finite step is not applied."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    # Layer-by-layer backward in attention transfer, except under FSDP whose reduction hooks
    # expect one backward per forward.
    layerwise = not world.distributed
    for micro in range(plan.accumulation):
        if world.distributed and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(micro == plan.accumulation - 1)
        batch = {k: v.to(world.device, non_blocking=True) for k, v in next(batches).items()}
        with compute_precision(cfg, world):
            total += micro_batch_loss(model, batch, stage, 1.0 / plan.accumulation, layerwise).double().cpu()
    loss = all_reduce_mean(total / plan.accumulation, world)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip))
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def compute_precision(cfg: DictConfig, world: World) -> Any:
    """bf16 (train.param_dtype) matmuls over float32 weights on one GPU; FSDP2 casts by itself, and
    CPU runs stay in the weights' dtype so they are exact and reproducible."""
    dtype = torch_dtype(cfg.train.param_dtype)
    enabled = world.device.type == "cuda" and not world.distributed and dtype != torch_dtype(cfg.dtype)
    return torch.autocast("cuda", dtype=dtype, enabled=enabled)


def _record(step: int, stage: str, loss: float, grad_norm: float, optimizer: torch.optim.Optimizer,
            plan: StagePlan, tokens: int, elapsed: float, flops_params: int, cfg: DictConfig,
            world: World) -> dict[str, Any]:
    tokens_per_s = plan.tokens_per_step / elapsed
    mfu = None
    if world.device.type == "cuda":
        achieved = tokens_per_s * FLOPS_PER_PARAM[stage] * flops_params
        mfu = achieved / (cfg.train.gpu_tflops * 1e12 * world.world_size)
    return {"step": step, "stage": stage, "loss": loss, "grad_norm": grad_norm,
            "lr": optimizer.param_groups[0]["lr"], "tokens": tokens, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / world.world_size, "mfu": mfu, "time": time.time()}


def _read_meta(path: Path) -> dict[str, Any]:
    import json

    return json.loads((path / "meta.json").read_text())
