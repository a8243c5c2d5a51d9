"""Progress on rank 0: a rich bar, metrics.jsonl in the run directory, and wandb when asked.

wandb runs offline when there is no API key (or no network), keeps one run id per run directory so
a resumed job continues the same run, and never stops training if it fails.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger(__name__)


class ProgressLog:
    def __init__(self, run: Path, total_steps: int, done_steps: int, logger_kind: str, config: dict[str, Any],
                 enabled: bool):
        self.enabled = enabled
        self.metrics_path = run / "metrics.jsonl"
        self.wandb = None
        self.bar: Progress | None = None
        if not enabled:
            return
        self._truncate_after(done_steps)
        if logger_kind == "wandb":
            self.wandb = _start_wandb(run, config)
        if logger_kind != "none":
            self.bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(),
                                TextColumn("step {task.completed}/{task.total}"), TextColumn("{task.fields[stats]}"),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, stage="", stats="")

    def _truncate_after(self, step: int) -> None:
        """Steps logged after the checkpoint we resume from are rerun; drop their old records, and
        lines that do not read back as records (a write cut short by a crash), with a warning."""
        if not self.metrics_path.exists():
            return
        kept, damaged = [], 0
        for line in filter(str.strip, self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()):
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (ValueError, AttributeError, TypeError):  # not JSON, not an object, a step that is no number
                damaged += 1
        if damaged:
            logger.warning("%s: dropped %d line(s) that are not metric records (a write cut short?)",
                           self.metrics_path, damaged)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _write(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=record["step"])
            except Exception as err:  # a logging failure must never cost a training run
                logger.warning("wandb.log failed (%s); continuing without wandb", err)
                self.wandb = None

    def log_eval(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self._write(record)
            self.message(f"step {record['step']}: held-out perplexity {record['heldout_ppl']:.3f} "
                         f"after {record['tokens']:,} tokens")

    def log_stage_start(self, step: int, stage: str) -> None:
        """A stage begins (or resumes) after `step`: its CPU time is counted from here."""
        if self.enabled:
            self._write({"step": step, "stage_start": stage, "time": time.time(), "cpu_s": time.process_time()})

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write(record)
        if self.bar is not None:
            mfu = f" mfu {record['mfu']:.1%}" if record.get("mfu") is not None else ""
            stats = (f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s{mfu}")
            self.bar.update(self.task, completed=record["step"], stage=record["stage"], stats=stats)
        else:
            logger.info("step %d %s loss %.4f", record["step"], record["stage"], record["loss"])

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.console.print(text) if self.bar is not None else logger.info(text))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as err:
                logger.warning("wandb.finish failed: %s", err)


def _start_wandb(run: Path, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        logger.warning("logger=wandb but wandb is not installed (pip install 'supra[wandb]'); logging locally")
        return None
    id_file = run / "wandb_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "supra"), id=id_file.read_text().strip(),
                          resume="allow", dir=str(run), config=config, mode=mode,
                          settings=wandb.Settings(init_timeout=60))
    except Exception as err:
        logger.warning("wandb.init failed (%s); logging locally only", err)
        return None
