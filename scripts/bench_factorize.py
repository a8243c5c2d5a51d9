"""Weight factorisation of SmolLM2-135M's MLPs: size, CPU speed and held-out perplexity, before and
after a short healing run; low-rank vs tensor-train, alone and on a LoLCATs-converted model.

Each model goes through the commands a user would run:

    supra factorize model=SOURCE factorize.method=M factorize.ratio=F [factorize.activation_aware=true] out=DIR
    supra uptrain model=DIR method=softmax train.stages=[{name: lora, tokens: T, ...}] out=HEALED

(the lora stage trains the LoRA adapters on q/k/v/o and the factors); the original and the LoLCATs
model are healed by the same stage, so the healed figures compare like with like (part of any
healing gain is the stage adapting to the stdlib text, which the originals get too). Perplexity is
on the same held-out stdlib tokens for every model; before healing it is computed here, after
healing it is the one `supra uptrain` reports, with the same settings.

Timing runs on one thread and counts process CPU time (time.process_time), not wall time: the
machine is shared, and CPU time is what another process cannot inflate. Prefill is one forward of
a `--prompt-tokens` prompt into a cache (best of 2), decode the median step of `--new-tokens`.

    .venv/bin/python scripts/bench_factorize.py [--ratios 0.9 0.75 0.5] [--heal-tokens 2048] [--only NAME ...]
    .venv/bin/python scripts/bench_factorize.py --replot --out JSON   # PNG and table of a (partial) run

Prints a markdown table; writes benchmarks/results/cpu/factorize_smollm2.json (after every model,
so an interrupted run keeps what it measured) and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from provenance import figure, provenance
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "cpu" / "factorize_smollm2.json"


def cli(*args: str) -> float:
    """Run a supra command in this process; its CPU seconds."""
    from supra.cli import main

    start = time.process_time()
    code = main(list(args))
    if code != 0:
        raise SystemExit(f"supra {' '.join(args)} failed with exit code {code}")
    return time.process_time() - start


@torch.no_grad()
def cpu_speed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Prefill CPU seconds (best of 2) and the median CPU ms of a greedy decode step."""
    from supra.layers.cache import cache_kwargs

    prefills = []
    for _ in range(2):
        cache = DynamicCache(config=model.config)
        start = time.process_time()
        logits = model(prompt, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
        prefills.append(time.process_time() - start)
    token, steps = logits[:, -1:].argmax(-1), []
    for _ in range(new_tokens):
        start = time.process_time()
        token = model(token, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
        steps.append(time.process_time() - start)
    return {"prefill_cpu_s": min(prefills), "decode_cpu_ms_per_token": 1e3 * statistics.median(steps)}


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def variants(args: argparse.Namespace) -> list[dict]:
    """name, base (original or lolcats), factorize overrides (None: the base itself), heal or not."""
    rows = [{"name": "original", "base": "original", "method": "-", "ratio": 1.0, "factorize": None}]
    for ratio in args.ratios:
        rows.append({"name": f"low_rank {ratio:.0%}", "base": "original", "method": "low_rank", "ratio": ratio,
                     "factorize": ["factorize.method=low_rank", f"factorize.ratio={ratio}",
                                   "factorize.activation_aware=true"]})
    low = min(args.ratios)  # what the activation statistics buy, at the strongest compression
    rows.append({"name": f"low_rank {low:.0%} (plain SVD)", "base": "original", "method": "low_rank (plain)",
                 "ratio": low, "factorize": ["factorize.method=low_rank", f"factorize.ratio={low}"], "heal": False})
    for cores, ratio in itertools.product(args.tt_cores, args.tt_ratios):
        rows.append({"name": f"tensor_train {ratio:.0%}" + ("" if cores == 3 else f" ({cores} cores)"),
                     "base": "original", "method": "tensor_train", "ratio": ratio,
                     "factorize": ["factorize.method=tensor_train", f"factorize.ratio={ratio}",
                                   f"factorize.tt_cores={cores}"],
                     "heal": ratio <= args.tt_heal_max_ratio})
    rows.append({"name": "lolcats", "base": "lolcats", "method": "-", "ratio": 1.0, "factorize": None})
    mid = sorted(args.ratios)[len(args.ratios) // 2]
    rows.append({"name": f"lolcats + low_rank {mid:.0%}", "base": "lolcats", "method": "low_rank", "ratio": mid,
                 "factorize": ["factorize.method=low_rank", f"factorize.ratio={mid}",
                               "factorize.activation_aware=true"]})
    return [{"heal": True, **r} for r in rows if not args.only or r["name"] in args.only]


def tt_macs_ratio(layout: dict) -> float:
    """Multiply-adds per token of the core-by-core contraction over the dense layer's (exact count)."""
    out_modes, in_modes, bonds = layout["out_modes"], layout["in_modes"], [1, *layout["ranks"], 1]
    macs = sum(math.prod(out_modes[:k]) * bonds[k] * n * m * bonds[k + 1] * math.prod(in_modes[k + 1:])
               for k, (m, n) in enumerate(zip(out_modes, in_modes)))
    return macs / (math.prod(out_modes) * math.prod(in_modes))


def markdown(rows: list[dict]) -> str:
    lines = ["| model | MLP params kept | params | disk (MB, fp32) | prefill CPU s | decode CPU ms/tok | "
             "ppl | ppl / original | healed ppl | healed / healed original |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    original = next(r for r in rows if r["name"] == "original")
    for r in rows:
        healed = (f"{r['ppl_healed']:.4g} | {r['ppl_healed'] / original['ppl_healed']:.3g}"
                  if "ppl_healed" in r and "ppl_healed" in original else "- | -")
        lines.append(f"| {r['name']} | {r['mlp_kept']:.0%} | {r['params'] / 1e6:.1f}M | {r['disk_bytes'] / 1e6:.0f} | "
                     f"{r['prefill_cpu_s']:.2f} | {r['decode_cpu_ms_per_token']:.1f} | {r['ppl']:.4g} | "
                     f"{r['ppl'] / original['ppl']:.3g} | {healed} |")
    return "\n".join(lines)


def draw(rows: list[dict], path: Path, device: str) -> None:
    original = next(r for r in rows if r["name"] == "original")
    with figure(path, 1, 2, size=(11, 4.2)) as (fig, axes):
        for method, marker in (("low_rank", "o"), ("tensor_train", "s"), ("low_rank (plain)", "x")):
            mine = sorted((r for r in rows if r["method"] == method and r["base"] == "original"),
                          key=lambda r: r["mlp_kept"])
            if not mine:
                continue
            kept = [r["mlp_kept"] for r in mine]
            axes[0, 0].plot(kept, [r["ppl"] / original["ppl"] for r in mine], marker=marker, label=f"{method}")
            healed = [(r["mlp_kept"], r["ppl_healed"] / original["ppl_healed"]) for r in mine
                      if r.get("ppl_healed") and original.get("ppl_healed")]
            if healed:
                axes[0, 0].plot(*zip(*healed), marker=marker, linestyle="--", label=f"{method}, healed")
            axes[0, 1].plot(kept, [r["decode_cpu_ms_per_token"] for r in mine], marker=marker, label=method)
        axes[0, 0].axhline(1.0, color="grey", linewidth=0.8)
        axes[0, 0].set_yscale("log")
        axes[0, 0].set_xlabel("fraction of MLP parameters kept")
        axes[0, 0].set_ylabel("held-out perplexity / original's (healed: / healed original's)")
        axes[0, 1].axhline(original["decode_cpu_ms_per_token"], color="grey", linewidth=0.8, label="original")
        axes[0, 1].set_xlabel("fraction of MLP parameters kept")
        axes[0, 1].set_ylabel("decode CPU ms per token (1 thread)")
        for ax in axes[0]:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"SmolLM2-135M MLP factorisation ({device}, shared machine)", fontsize=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.75, 0.5], help="low-rank")
    parser.add_argument("--tt-ratios", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--tt-heal-max-ratio", type=float, default=0.1,
                        help="heal tensor-train models up to this ratio only: above it the cores cost many times "
                             "the dense layer's CPU time (see tt_macs_over_dense)")
    parser.add_argument("--tt-cores", type=int, nargs="+", default=[3], help="tensor_train: numbers of cores")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ppl-tokens", type=int, default=1024, help="held-out tokens scored")
    parser.add_argument("--calibration-tokens", type=int, default=1024, help="for activation-aware low rank")
    parser.add_argument("--heal-tokens", type=int, default=2048, help="tokens of the healing lora stage (0: none)")
    parser.add_argument("--heal-lr", type=float, default=5e-4)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=2,
                        help="rows per forward while healing (1 halves the activation memory of tensor trains)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="run only these variant names")
    parser.add_argument("--lolcats-model", default=None,
                        help="a trained LoLCATs model (e.g. runs/demo/model) as the lolcats rows' base; "
                             "default: SmolLM2 converted here, untrained")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-factorize"))
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--replot", action="store_true", help="redraw the PNG and table of an existing --out JSON")
    args = parser.parse_args()
    if args.replot:
        record = json.loads(Path(args.out).read_text())
        draw(record["rows"], Path(args.out).with_suffix(".png"), record["device"])
        print(markdown(record["rows"]))
        return
    torch.set_num_threads(1)

    from supra.commands.settings import heldout_perplexity
    from supra.config import load_config
    from supra.data import iter_documents
    from supra.evaluate.perplexity import token_stream
    from supra.factorize import factorized_fraction
    from supra.models import count_parameters, load_model, load_tokenizer, smollm2_dir

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    common = [f"seq_len={args.seq_len}", f"eval.max_tokens={args.ppl_tokens}", "data.source=stdlib",
              f"calibration_tokens={args.calibration_tokens}"]
    heal = ["method=softmax", "train.eval_baselines=false", "train.sample_tokens=0", "train.logger=none",
            f"train.batch_tokens={args.batch_tokens}", f"train.micro_batch_size={args.micro_batch_size}",
            "train.checkpoint_every=1000",
            f"train.stages=[{{name: lora, tokens: {args.heal_tokens}, lr: {args.heal_lr}, min_lr: {args.heal_lr / 10},"
            " warmup_steps: 1}]"]
    cfg = load_config(common)
    tokenizer = load_tokenizer("smollm2-135m")
    heldout = heldout_perplexity(cfg, tokenizer)  # one held-out stream for every model
    prompt = token_stream(tokenizer, iter_documents(cfg.data, "heldout"), args.prompt_tokens)
    prompt = prompt[: args.prompt_tokens].unsqueeze(0)
    bases = {"original": "smollm2-135m"}
    rows: list[dict] = []
    record = {"benchmark": "factorize_smollm2", **provenance(), "settings": vars(args),
              "machine": {"cpus": os.cpu_count(), "timing": "process CPU time on one thread; each row's "
                          "load_average (before, after) says how busy the machine was"}}
    for variant in variants(args):
        print(f"== {variant['name']}", flush=True)
        row = {k: v for k, v in variant.items() if k != "factorize"} | {"factorize": variant["factorize"]}
        load_before = os.getloadavg()[0]
        if variant["base"] == "lolcats" and "lolcats" not in bases and args.lolcats_model:
            bases["lolcats"] = args.lolcats_model
        elif variant["base"] == "lolcats" and "lolcats" not in bases:
            bases["lolcats"] = str(work / "lolcats")
            row["convert_cpu_s"] = cli("convert", "model=smollm2-135m", "method=lolcats", *common,
                                       f"out={bases['lolcats']}")
        source = bases[variant["base"]]
        if variant["factorize"] is not None:
            source = str(work / variant["name"].replace(" ", "-").replace("%", "").replace("(", "").replace(")", ""))
            row["factorize_cpu_s"] = cli("factorize", f"model={bases[variant['base']]}", *variant["factorize"],
                                         *common, f"out={source}")
            report = json.loads((Path(source) / "factorize.json").read_text())
            row["mean_relative_error"] = statistics.mean(x["relative_error"] for x in report["layers"])
            if variant["method"] == "tensor_train":
                row["tt_macs_over_dense"] = statistics.mean(tt_macs_ratio(x["layout"]) for x in report["layers"])
        model = load_model(source).eval()
        counts, fraction = count_parameters(model), factorized_fraction(model)
        row["params"] = counts["total"]
        mlp_dense = sum(m.weight.numel() for n, m in model.named_modules()
                        if ".mlp." in n and isinstance(m, torch.nn.Linear))
        row["mlp_kept"] = (mlp_dense + fraction["factor_parameters"]) / (mlp_dense + fraction["dense_parameters"])
        row["disk_bytes"] = disk_bytes(smollm2_dir() if source == "smollm2-135m" else Path(source))
        start = time.process_time()
        ppl = heldout(model)
        row.update(ppl=ppl["ppl"], ppl_tokens=ppl["tokens"], ppl_cpu_s=time.process_time() - start)
        row.update(cpu_speed(model, prompt, args.new_tokens))
        del model
        if args.heal_tokens > 0 and variant["heal"]:
            healed = work / "healed" / Path(source).name
            # a tensor train's core-by-core intermediates are many times a dense layer's activations:
            # recompute them in the backward instead of keeping them for every layer
            recompute = [f"train.activation_checkpointing={variant['method'] == 'tensor_train'}"]
            row["heal_cpu_s"] = cli("uptrain", f"model={source}", *common, *heal, *recompute, f"out={healed}")
            row["ppl_healed"] = json.loads((healed / "eval.json").read_text())["ppl_uptrained"]["ppl"]
            shutil.rmtree(healed / "checkpoints", ignore_errors=True)
            for weights in healed.glob("model/*.safetensors"):
                weights.unlink()
        row["load_average"] = [load_before, os.getloadavg()[0]]
        rows.append(row)
        print(json.dumps(row), flush=True)
        record.update(rows=rows, markdown=markdown(rows))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=str) + "\n")
    draw(rows, Path(args.out).with_suffix(".png"), record["device"])
    for weights in work.glob("*/*.safetensors"):
        weights.unlink()
    print(record["markdown"])
    print(f"results: {args.out} and .png")


if __name__ == "__main__":
    main()
