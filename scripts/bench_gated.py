"""Held-out perplexity of SmolLM2-135M converted without training, per gated variant, against the original.

Every variant is converted in this process from one loaded SmolLM2 (`linearize`, as `supra convert`
does) and scored on the same held-out stdlib tokens as `supra eval tasks=[ppl]` (windows of the
recipe's seq_len, 512). The original model is scored in the same run, so every row carries its ratio
to it. CPU time is process time (the machine is shared: wall time would measure the neighbours).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_gated.py [--tokens 8192] [--only VARIANT ...]

Prints a markdown table and writes benchmarks/results/cpu/gated_untrained.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path

import torch
from provenance import figure, write_results

from supra.commands.common import load_model_and_tokenizer
from supra.commands.settings import heldout_perplexity
from supra.config import load_config
from supra.layers.linearize import LinearizeSpec, linearize

VARIANTS = {  # name: conversion (None: the original model)
    "original": None,
    "lolcats": {"method": "lolcats"},
    "gla (key gate, window 64)": {"method": "gla"},
    "gla (learned gate, window 64)": {"method": "gla", "gate": "learned"},
    "gla (key gate, no window)": {"method": "gla", "window": 0},
    "gdn (key gate, window 64)": {"method": "gdn"},
    "gdn (learned gate, window 64)": {"method": "gdn", "gate": "learned"},
    "gdn (key gate, no window)": {"method": "gdn", "window": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored per model")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to score (the original always is: the ratios need it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks/results/cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(["recipe=smollm2-135m", f"eval.max_tokens={args.tokens}"])
    base, tokenizer = load_model_and_tokenizer(cfg)
    score = heldout_perplexity(cfg, tokenizer)
    rows = []
    for name, spec in VARIANTS.items():
        if spec is not None and name not in args.only:
            continue
        start, load = time.process_time(), os.getloadavg()[0]
        model = base if spec is None else linearize(copy.deepcopy(base), LinearizeSpec(**spec))
        with torch.no_grad():
            result = score(model)
        rows.append({"variant": name, "spec": spec, "ppl": result["ppl"], "loss": result["loss"],
                     "tokens": result["tokens"], "cpu_seconds": round(time.process_time() - start, 1),
                     "load_average_at_start": load})
        print(f"{name}: ppl {result['ppl']:.3f}", flush=True)
    original = rows[0]["ppl"]
    for row in rows:
        row["ratio_to_original"] = row["ppl"] / original
    print("\n| model | held-out ppl | ratio to original |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['ppl']:.3f} | {row['ratio_to_original']:.2f} |")

    def draw(path: Path, device: str) -> None:
        with figure(path, size=(7.5, 4.5)) as (_, axes):
            ax = axes[0][0]
            ax.barh([r["variant"] for r in rows][::-1], [math.log10(r["ppl"]) for r in rows][::-1])
            ax.set_xlabel("log10 held-out perplexity (untrained conversion)")
            ax.set_title(f"SmolLM2-135M, {rows[0]['tokens']} stdlib tokens, {device}")

    write_results("gated_untrained", args, {"machine": "2 CPU cores shared with other jobs", "rows": rows}, draw)


if __name__ == "__main__":
    main()
