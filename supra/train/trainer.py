"""The one training loop: runs the recipe's stages in order, checkpointing inside and between them.

Resuming is rerunning: the latest complete checkpoint gives the stage, the step inside it, the
model, optimizer, scheduler, data-loader position and RNG, so the next step is the one that would
have come. SIGTERM/SIGUSR1 (SLURM's warning before a time limit or preemption) and SIGUSR2 (submitit's,
under supra-launch) make the job write a checkpoint at the next step boundary and exit with REQUEUE_EXIT_CODE;
Ctrl-C (SIGINT) writes the same checkpoint and exits with 130, saying how to resume.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import build_train_loader
from ..errors import UserError
from ..evaluate.perplexity import HeldoutPerplexity
from ..layers.linearize import decoder_layers
from ..models import torch_dtype
from .blockwise import block_ranges, check_blockwise, finished_blocks, remove_stage_cache, transfer_blockwise
from .cached import build_cache, cached_micro_loss, chunk_position, epoch_order, teacher_cache_bytes
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .optim import make_optimizer, optimizer_step
from .parallel import World, all_reduce_max, all_reduce_mean
from .plan import StagePlan, plan_stages
from .progress import ProgressLog
from .settings import StageConfig, TrainConfig, TrainSettings
from .stages import STAGE_KINDS, micro_batch_loss, set_trainable, stage_loop

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: scripts/slurm/uptrain.sbatch requeues the job on it
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C


class TrainingStopped(UserError):
    """Training cannot go on (e.g. the loss kept diverging); the last good checkpoint is intact."""


class StopSignal:
    """Remembers a SIGTERM/SIGUSR1/SIGUSR2 so the loop can stop cleanly at the next step boundary.

    SIGUSR2 is submitit's time-limit/preemption signal: taking it here (over submitit's own handler,
    which would requeue at once, mid-step) lets the ranks write their checkpoint first; supra/launch.py
    then hands the signal on to submitit, which requeues the job. The handlers stay installed after
    train() returns; supra/launch.py reads `StopSignal.latest.received` (the latest train()'s)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    latest: StopSignal | None = None

    def __init__(self) -> None:
        self.received: int | None = None
        StopSignal.latest = self
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        # Ctrl-C during training: the same checkpoint at the step boundary, then exit 130; a second
        # Ctrl-C stops at once. Only while training: afterwards Ctrl-C interrupts as usual. A process
        # started with Ctrl-C ignored (`cmd &`, nohup) keeps ignoring it, as Python itself does.
        self._previous_sigint = signal.getsignal(signal.SIGINT)
        if self._previous_sigint is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._handle_sigint)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def _handle_sigint(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def release_sigint(self) -> None:
        signal.signal(signal.SIGINT, self._previous_sigint)

    @property
    def exit_code(self) -> int:
        """What the run exits with after a stop: 130 for Ctrl-C (the shell's convention), else requeue."""
        return INTERRUPTED_EXIT_CODE if self.received == signal.SIGINT else REQUEUE_EXIT_CODE

    def stopped_message(self, run: Path, saved: str) -> str:
        """saved: what was written, e.g. "checkpoint written at step 12"."""
        if self.received == signal.SIGINT:
            return f"interrupted: {saved} in {run}; rerun the same command (same out=) to resume"
        return f"signal received: {saved}; exiting with {REQUEUE_EXIT_CODE} so the scheduler requeues the job"


class Counters:
    """The run's step and token counts, and the bookkeeping after every optimizer step (non-finite
    guard, metrics, stop signal) that every stage strategy shares."""

    def __init__(self, train_cfg: TrainConfig, world: World, flops_params: int) -> None:
        self.train_cfg, self.world, self.flops_params = train_cfg, world, flops_params
        self.step = self.tokens = self.bad_in_a_row = 0
        self.log: ProgressLog | None = None
        self.stop = StopSignal()

    def step_done(self, stage: StageConfig, plan: StagePlan, loss: float, grad_norm: float,
                  optimizer: torch.optim.Optimizer, elapsed: float) -> bool:
        """Count, guard and log one optimizer step; True when a stop signal arrived (on any rank)."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        if self.bad_in_a_row:
            self.log.message(f"step {self.step + 1}: non-finite loss/gradient, step skipped "
                             f"({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row > self.train_cfg.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_a_row} non-finite steps in a row in stage {stage.name}; stopped. The last "
                    "good checkpoint is intact: lower the learning rate or check the data, then rerun")
        self.step, self.tokens = self.step + 1, self.tokens + plan.tokens_per_step
        self.log.log(_record(self.step, stage.name, loss, grad_norm, optimizer, plan, self.tokens, elapsed,
                             self.flops_params, self.train_cfg, self.world))
        return all_reduce_max(float(self.stop.received is not None), self.world) > 0


@dataclass
class StageRun:
    """What a stage strategy works with: the stage, its plan and optimizer, the data, and the
    run's bookkeeping (counting, held-out evaluation, checkpoints)."""

    run: Path
    index: int
    stage: StageConfig
    plan: StagePlan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    train_cfg: TrainConfig
    world: World
    counters: Counters
    heldout: HeldoutPerplexity
    precision: Any  # a context manager factory: the compute precision of a forward

    def checkpoint(self, stage_step: int, data_state: dict | None = None) -> None:
        """data_state: the loader's position to resume from (default: where it is now)."""
        meta = {"stage": self.index, "stage_name": self.stage.name, "stage_step": stage_step,
                "tokens": self.counters.tokens}
        rank_state = {"data": data_state or self.loader.state_dict(), "rng": rng_state()}
        save_checkpoint(self.run, self.counters.step, self.model, self.optimizer, self.scheduler, rank_state, meta,
                        self.train_cfg.keep_checkpoints)

    def after_step(self, stage_step: int, loss: float, grad_norm: float, elapsed: float,
                   data_state: dict | None = None) -> bool:
        """Schedule, count, evaluate and checkpoint after the stage's step `stage_step` (1-based);
        True when a stop signal arrived (the checkpoint is written)."""
        stopping = self.counters.step_done(self.stage, self.plan, loss, grad_norm, self.optimizer, elapsed)
        last = stage_step == self.plan.steps
        every = self.train_cfg.eval_every
        if every and (stage_step % every == 0 or last):
            # Every rank scores the same text: FSDP's forward needs all of them.
            cpu = time.process_time()
            result = self.heldout(self.model)
            self.counters.log.log_eval({"step": self.counters.step, "stage": self.stage.name,
                                        "tokens": self.counters.tokens, "heldout_ppl": result["ppl"],
                                        "heldout_loss": result["loss"], "heldout_tokens": result["tokens"],
                                        "by_position": result["by_position"],
                                        "eval_cpu_s": time.process_time() - cpu, "cpu_s": time.process_time()})
        if stopping or stage_step % self.train_cfg.checkpoint_every == 0 or last:
            self.checkpoint(stage_step, data_state)
        if stopping:
            self.counters.log.message(self.counters.stop.stopped_message(
                self.run, f"checkpoint written at step {self.counters.step}"))
        return stopping


def train(settings: TrainSettings, run: Path, model: nn.Module, tokenizer: Any, heldout: HeldoutPerplexity,
          world: World, flops_params: int) -> int:
    """Run (or resume) every stage; returns 0 when done, REQUEUE_EXIT_CODE when stopped by a signal,
    INTERRUPTED_EXIT_CODE after a Ctrl-C (a checkpoint is written in both cases). `heldout` scores
    the model every train.eval_every steps."""
    train_cfg = settings.train
    stages = list(train_cfg.stages)
    check_blockwise(stages, world.distributed)
    plans = plan_stages(train_cfg, settings.seq_len, world.world_size)
    loader = build_train_loader(settings.data, tokenizer, settings.seq_len, train_cfg.micro_batch_size, world.rank,
                                world.world_size)
    if world.is_main:
        remove_partial_checkpoints(run)
    latest = latest_checkpoint(run)  # the resume point: its stage, step, weights, optimizer, data, RNG
    first = _read_meta(latest)["stage"] if latest is not None else 0
    layers = len(decoder_layers(model))
    total_steps = sum(p.steps * (len(block_ranges(layers, s.block_layers)) if s.block_layers else 1)
                      for p, s in zip(plans, stages))
    precision = partial(compute_precision, train_cfg, torch_dtype(settings.dtype), world)
    # Last before the try: it takes Ctrl-C over, and only the finally below gives it back.
    counters = Counters(train_cfg, world, flops_params)
    try:
        for index in range(first, len(plans)):
            stage, plan = stages[index], plans[index]
            if not world.distributed and not stage.block_layers:
                model.to(world.device)  # a block-wise stage before may have left the model offloaded
            set_trainable(model, stage)
            optimizer, scheduler = make_optimizer(model, stage, plan.steps)
            stage_step = 0
            if latest is not None:
                meta, rank_state = load_checkpoint(latest, model, optimizer, scheduler)
                loader.load_state_dict(rank_state["data"])
                set_rng_state(rank_state["rng"])
                stage_step, counters.tokens, counters.step = meta["stage_step"], meta["tokens"], meta["step"]
                latest = None
            if stage.block_layers and stage_step < plan.steps:  # blocks finished before a stop count as done
                done = finished_blocks(run, index) * plan.steps
                counters.step, counters.tokens = counters.step + done, counters.tokens + done * plan.tokens_per_step
            if counters.log is None:
                counters.log = ProgressLog(run, total_steps, counters.step, train_cfg.logger, settings.logged,
                                           world.is_main)
                if counters.step:
                    counters.log.message(f"resumed from step {counters.step} (stage {stage.name}, "
                                         f"step {stage_step})")
            counters.bad_in_a_row = 0
            if stage_step < plan.steps:
                stage_run = StageRun(run, index, stage, plan, model, optimizer, scheduler, loader, train_cfg, world,
                                     counters, heldout, precision)
                strategy = LOOPS[stage_loop(stage)]
                counters.log.message(f"stage {index + 1}/{len(plans)} {stage.name}: {plan.steps} steps of "
                                     f"{plan.tokens_per_step:,} tokens ({plan.accumulation} micro-batches/rank)"
                                     f"{_strategy_note(stage)}")
                counters.log.log_stage_start(counters.step, stage.name)
                if strategy(stage_run, stage_step, settings.seed):
                    return counters.stop.exit_code
            if world.is_main:
                loader.log_stats()
    finally:
        counters.stop.release_sigint()
        if counters.log is not None:
            counters.log.close()
    return 0


def _strategy_note(stage: StageConfig) -> str:
    if stage.block_layers:
        return f", in blocks of {stage.block_layers} layers"
    if stage.cache_tokens:
        return f", from a teacher cache of {stage.cache_tokens:,} tokens at a time, {stage.epochs} epochs each"
    return ""


def _plain_stage(s: StageRun, stage_step: int, seed: int) -> bool:
    """Every step draws new micro-batches and runs the whole model. True: stopped by a signal."""
    batches = iter(s.loader)
    while stage_step < s.plan.steps:
        started = time.perf_counter()
        loss, grad_norm = train_step(s.model, batches, s.optimizer, s.stage, s.plan, s.train_cfg.grad_clip, s.world,
                                     s.precision, s.scheduler)
        stage_step += 1
        if s.after_step(stage_step, loss, grad_norm, time.perf_counter() - started):
            return True
    return False


def _cached_transfer_stage(s: StageRun, stage_step: int, seed: int) -> bool:
    """Attention transfer from a cache of the teacher's per-layer q/k/v and softmax outputs, rebuilt
    for each chunk of the data (supra.train.cached). True: stopped by a signal."""
    micro_per_chunk = s.plan.chunk_steps * s.plan.accumulation
    dtype = torch_dtype(s.stage.cache_dtype)
    cache, chunk_state, cached_chunk = None, None, -1
    while stage_step < s.plan.steps:
        chunk, epoch, step = chunk_position(stage_step, s.plan.chunk_steps, s.plan.epochs)
        if chunk != cached_chunk:  # the loader stands at the chunk's start (a checkpoint put it there)
            chunk_state = s.loader.state_dict()
            batches = iter(s.loader)
            drawn = [{k: v for k, v in next(batches).items() if k != "labels"} for _ in range(micro_per_chunk)]
            started = time.perf_counter()
            with s.precision():
                cache = build_cache(s.model, drawn, dtype, s.world.device)
            cached_chunk = chunk
            s.counters.log.message(f"chunk {chunk + 1}: teacher cache of {micro_per_chunk} micro-batches "
                                   f"({teacher_cache_bytes(cache) / 2**30:.2f} GiB) in "
                                   f"{time.perf_counter() - started:.0f} s")
        order = epoch_order(micro_per_chunk, seed, chunk, epoch)
        micro = order[step * s.plan.accumulation:(step + 1) * s.plan.accumulation]
        started = time.perf_counter()
        s.optimizer.zero_grad(set_to_none=True)
        with s.precision():
            loss = sum(cached_micro_loss(s.model, cache[i], 1.0 / len(micro), s.world.device) for i in micro)
        loss /= len(micro)
        grad_norm = optimizer_step(s.model, s.optimizer, s.scheduler, loss, s.train_cfg.grad_clip)
        stage_step += 1
        # Inside a chunk, a rerun must rebuild its cache: resume from the chunk's first batch.
        inside = stage_step % (s.plan.chunk_steps * s.plan.epochs) != 0
        if s.after_step(stage_step, loss, grad_norm, time.perf_counter() - started, chunk_state if inside else None):
            return True
    return False


def _blockwise_stage(s: StageRun, stage_step: int, seed: int) -> bool:
    """LoLCATs' block-wise transfer (supra.train.blockwise). True: stopped by a signal."""
    block_optimizer = partial(make_optimizer, stage=s.stage, steps=s.plan.steps)
    if transfer_blockwise(s.model, s.loader, s.stage, s.plan, block_optimizer, s.world.device, s.train_cfg.grad_clip,
                          s.run, s.index, partial(s.counters.step_done, s.stage, s.plan)):
        s.counters.log.message(s.counters.stop.stopped_message(
            s.run, f"finished blocks saved at step {s.counters.step} (the current one restarts)"))
        return True
    s.checkpoint(s.plan.steps)
    remove_stage_cache(s.run, s.index)
    return False


# The loop that runs each kind of stage (StageKind.loop chooses): True when stopped by a signal.
LOOPS = {"plain": _plain_stage, "cached": _cached_transfer_stage, "blockwise": _blockwise_stage}


def train_step(model: nn.Module, batches, optimizer: torch.optim.Optimizer, stage: StageConfig, plan: StagePlan,
               grad_clip: float, world: World, precision: Any, scheduler: Any | None = None) -> tuple[float, float]:
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
        with precision():
            total += micro_batch_loss(model, batch, stage, 1.0 / plan.accumulation, layerwise).double().cpu()
    loss = all_reduce_mean(total / plan.accumulation, world)
    return loss, optimizer_step(model, optimizer, scheduler, loss, grad_clip)


def compute_precision(train_cfg: TrainConfig, weights_dtype: torch.dtype, world: World) -> Any:
    """bf16 (train.param_dtype) matmuls over float32 weights on one GPU; FSDP2 casts by itself, and
    CPU runs stay in the weights' dtype so they are exact and reproducible."""
    dtype = torch_dtype(train_cfg.param_dtype)
    enabled = world.device.type == "cuda" and not world.distributed and dtype != weights_dtype
    return torch.autocast("cuda", dtype=dtype, enabled=enabled)


def _record(step: int, stage: str, loss: float, grad_norm: float, optimizer: torch.optim.Optimizer,
            plan: StagePlan, tokens: int, elapsed: float, flops_params: int, train_cfg: TrainConfig,
            world: World) -> dict[str, Any]:
    tokens_per_s = plan.tokens_per_step / elapsed
    mfu = None
    if world.device.type == "cuda":
        achieved = tokens_per_s * STAGE_KINDS[stage].flops_per_param * flops_params
        mfu = achieved / (train_cfg.gpu_tflops * 1e12 * world.world_size)
    return {"step": step, "stage": stage, "loss": loss, "grad_norm": grad_norm,
            "lr": optimizer.param_groups[0]["lr"], "tokens": tokens, "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / world.world_size, "mfu": mfu, "time": time.time(),
            "cpu_s": time.process_time()}  # this process's CPU time: what a shared machine cannot disturb


def _read_meta(path: Path) -> dict[str, Any]:
    import json

    return json.loads((path / "meta.json").read_text())
