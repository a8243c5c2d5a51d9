"""Where a benchmark figure came from: git SHA, command, date, device. Every script in scripts/
stamps its JSON with `provenance()` and writes under `results_dir()`.

A GPU machine may get a copy of the working tree without .git: set SUPRA_GIT_SHA there to the SHA
the copy was made from (the device launch commands in scripts/gpu_campaign.sh do).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def git_sha() -> str:
    """HEAD, with -dirty when code (not results) differs from it."""
    if os.environ.get("SUPRA_GIT_SHA"):
        return os.environ["SUPRA_GIT_SHA"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "supra", "kernels", "scripts", "recipes"],
                           cwd=REPO, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the results folder of a device."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def results_dir(out: Path | None = None) -> Path:
    directory = out or REPO / "benchmarks" / "results" / device_slug(device_name())
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def provenance() -> dict[str, Any]:
    import torch

    record = {"git_sha": git_sha(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(), "torch": torch.__version__}
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        pass
    return record


def write_results(name: str, args: argparse.Namespace, payload: dict[str, Any],
                  draw: Callable[[Path, str], None]) -> dict[str, Any]:
    """<out>/<name>.json (provenance, the script's settings, payload) and <out>/<name>.png from draw."""
    out = results_dir(getattr(args, "out", None))
    record = {**provenance(), "benchmark": name, "settings": {k: str(v) for k, v in vars(args).items()}, **payload}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    draw(out / f"{name}.png", record["device"])
    print(f"wrote {out / name}.json and .png")
    return record


@contextmanager
def figure(path: Path, rows: int = 1, columns: int = 1, size: tuple[float, float] = (6.5, 4.5)) -> Iterator[Any]:
    """A grid of axes (always 2-D) saved to path, headless, when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
