"""Quality per uptraining token: held-out perplexity of SmolLM2-135M uptrained by LoLCATs stages and by
SUPRA full uptraining, against the tokens spent, from the same corpus and evaluation.

Each method is one `supra uptrain` run (the user's command, in a subprocess) whose budget is the
largest of --budgets, with `train.eval_every` set so held-out perplexity is logged about every
--eval-tokens; the smaller budgets are read off the curve (points of one run with one learning-rate
schedule, not separate runs). LoLCATs spends half the budget on attention transfer and half on LoRA,
as its recipe does; SUPRA trains every weight (lr 3e-4 -> 1e-5, SUPRA's small-model setting). The two
runs share the GPU, each timed out at --deadline seconds; what was evaluated by then is reported.

Corpus: --corpus site-packages (a mixture of large Python packages' source installed on this
machine: more text than the stdlib, and offline) or stdlib (the embedded corpus).

    python scripts/quality_per_token.py                               # GPU, 2M/10M/20M tokens
    python scripts/quality_per_token.py --dry-run                     # CPU, tiny budgets
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from provenance import figure, write_results

PACKAGES = ["torch", "transformers", "jax", "scipy", "sklearn", "pandas", "numpy", "sympy", "matplotlib",
            "networkx", "skimage", "statsmodels", "flax", "sentence_transformers", "lightning"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[2e6, 10e6, 20e6])
    parser.add_argument("--eval-tokens", type=float, default=1e6, help="tokens between held-out evaluations")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--heldout-tokens", type=int, default=65536)
    parser.add_argument("--corpus", choices=["site-packages", "stdlib"], default="site-packages")
    parser.add_argument("--deadline", type=float, default=480, help="seconds before runs are stopped")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true")
    return parser.parse_args()


def corpus_overrides(corpus: str) -> list[str]:
    if corpus == "stdlib":
        return ["data.source=stdlib"]
    root = Path(sysconfig.get_paths()["purelib"])
    found = [p for p in PACKAGES if (root / p).is_dir()]
    if not found:
        raise SystemExit(f"no large packages under {root}; use --corpus stdlib")
    parts = ", ".join(f"{{source: '{root / p}/**/*.py', weight: 1}}" for p in found)
    return [f"data.mixture=[{parts}]", "data.num_workers=4"]


def method_overrides(method: str, tokens: int) -> list[str]:
    if method == "lolcats":
        half = tokens // 2
        return ["method=lolcats", f"train.stages=[{{name: attention_transfer, tokens: {half}, lr: 1e-2, "
                f"min_lr: 1e-3, warmup_steps: 10}}, {{name: lora, tokens: {tokens - half}, lr: 1e-4, min_lr: 1e-5, "
                "warmup_steps: 10}]"]
    return ["method=supra", f"train.stages=[{{name: full, tokens: {tokens}, lr: 3e-4, min_lr: 1e-5, "
            "warmup_steps: 20, betas: [0.9, 0.95]}]"]


def launch(method: str, args: argparse.Namespace) -> tuple[subprocess.Popen, list[str], Path]:
    run = args.work / method
    eval_every = max(1, round(args.eval_tokens / args.batch_tokens))
    # The installed console script: `python -m supra.cli` from a checkout would import ./supra first.
    supra = [shutil.which("supra")] if shutil.which("supra") else [sys.executable, "-m", "supra.cli"]
    command = [*supra, "uptrain", "recipe=smollm2-135m", f"out={run}",
               f"seq_len={args.seq_len}", f"train.batch_tokens={args.batch_tokens}",
               f"train.micro_batch_size={args.micro_batch}", f"train.eval_every={eval_every}",
               "train.checkpoint_every=100000", "train.logger=none", "train.sample_tokens=0",
               f"eval.max_tokens={args.heldout_tokens}", *corpus_overrides(args.corpus),
               *method_overrides(method, int(max(args.budgets)))]
    run.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.work / f"{method}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), command, run


def read_curve(run: Path) -> tuple[list[dict], dict]:
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    curve = [{"tokens": r["tokens"], "ppl": r["heldout_ppl"], "stage": r["stage"]}
             for r in records if "heldout_ppl" in r]
    steps = [r for r in records if "tokens_per_s" in r]
    speed = {"tokens_per_s_median": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2] if steps else None,
             "tokens_trained": steps[-1]["tokens"] if steps else 0}
    evals = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    return curve, {**speed, **{k: v["ppl"] for k, v in evals.items() if k.startswith("ppl_")}}


def at_budget(curve: list[dict], budget: float) -> dict | None:
    """The evaluated point nearest the budget, if one lies within 10% of it."""
    if not curve:
        return None
    point = min(curve, key=lambda p: abs(p["tokens"] - budget))
    return point if abs(point["tokens"] - budget) <= 0.1 * budget else None


def plot(methods: dict, path: Path, title: str) -> None:
    with figure(path) as (_, axes):
        ax = axes[0][0]
        for method, r in methods.items():
            if r["curve"]:
                ax.plot([p["tokens"] / 1e6 for p in r["curve"]], [p["ppl"] for p in r["curve"]], marker="o",
                        label=method)
        original = next((r["summary"]["ppl_original"] for r in methods.values() if r["summary"].get("ppl_original")),
                        None)
        if original:
            ax.axhline(original, color="gray", linestyle="--", label=f"original ({original:.2f})")
        ax.set(xlabel="uptraining tokens (M)", ylabel="held-out perplexity", yscale="log", title=title)
        ax.legend()


def main() -> None:
    args = parse_args()
    if args.dry_run:
        args.budgets, args.eval_tokens, args.seq_len, args.batch_tokens = [512, 1024], 256, 64, 128
        args.micro_batch, args.heldout_tokens, args.corpus = 2, 256, "stdlib"
    started = time.time()
    runs = {method: launch(method, args) for method in ("lolcats", "supra")}
    for process, _, _ in runs.values():
        try:
            process.wait(timeout=max(1.0, args.deadline - (time.time() - started)))
        except subprocess.TimeoutExpired:
            process.terminate()  # writes a checkpoint and exits: rerunning the script continues
            process.wait()
    methods: dict[str, dict] = {}
    print(f"\n{'method':<8} {'original':>9} {'converted':>10} " + " ".join(f"{b / 1e6:>6.0f}M" for b in args.budgets)
          + f" {'final':>8} {'tokens':>11} {'tok/s':>8}")
    for method, (process, command, run) in runs.items():
        curve, summary = read_curve(run)
        points = {f"{b:.0f}": at_budget(curve, b) for b in args.budgets}
        methods[method] = {"command": " ".join(command), "exit_code": process.returncode,
                                      "curve": curve, "summary": summary, "at_budgets": points}
        cells = " ".join(f"{p['ppl']:>7.2f}" if p else f"{'-':>7}" for p in points.values())
        speed = summary.get("tokens_per_s_median") or math.nan
        ppl = {k: summary.get(f"ppl_{k}", math.nan) for k in ("original", "converted", "uptrained")}
        print(f"{method:<8} {ppl['original']:>9.3f} {ppl['converted']:>10.1f} {cells} {ppl['uptrained']:>8.3f} "
              f"{summary['tokens_trained']:>11,} {speed:>8,.0f}")
    title = f"SmolLM2-135M, {args.corpus}, seq {args.seq_len}"
    write_results("quality_per_token", args, {"methods": methods}, lambda path, device: plot(methods, path, title))


if __name__ == "__main__":
    main()
