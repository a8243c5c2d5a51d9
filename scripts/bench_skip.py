"""Perplexity and decode speed of SmolLM2-135M with 0, 3, 6, 9, 12 attention sublayers skipped,
chosen by LLM-Drop similarity and by position (the last n), on the embedded (stdlib) corpus.

Each model goes through the CLI a user would run:

    supra skip model=smollm2-135m select=S n=K out=DIR calibration_tokens=8192
    supra eval model=DIR tasks=[ppl] eval.max_tokens=8192

then greedy decoding is timed here, on one thread: a 256-token held-out prompt is prefilled into a
cache, then 64 tokens are decoded one at a time; a step's time is the median over those steps (a
shared machine disturbs the median far less than the mean), and the reported speed is the median of
3 rounds, each round timing every model in turn.
The decoded tokens are checked against `generate()` so a skipped model is timed only if it decodes
exactly like its own full forward pass.

    .venv/bin/python scripts/bench_skip.py [--counts 0 3 6 9 12] [--keep-models]

Prints a markdown table and writes benchmarks/results/cpu/skip_smollm2.json (git SHA, command, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import git_sha
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "cpu" / "skip_smollm2.json"


def cli(*args: str) -> None:
    from supra.cli import main

    code = main(list(args))
    if code != 0:
        raise SystemExit(f"supra {' '.join(args)} failed with exit code {code}")


def heldout_prompt(length: int) -> torch.Tensor:
    from supra.data import DataConfig, iter_documents
    from supra.evaluate.perplexity import token_stream
    from supra.models import load_tokenizer

    stream = token_stream(load_tokenizer("smollm2-135m"), iter_documents(DataConfig(), "heldout"), length)
    return stream[:length].unsqueeze(0)


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy tokens and per-step seconds. cache_position is passed because a cache's own length
    comes from layer 0, whose slot stays empty when layer 0's attention is skipped."""
    from supra.layers.cache import cache_kwargs

    cache = DynamicCache(config=model.config)
    length = prompt.shape[1]
    logits = model(prompt, **cache_kwargs(cache), use_cache=True, cache_position=torch.arange(length)).logits
    token = logits[:, -1:].argmax(-1)
    tokens, steps = [token], []
    for position in range(length, length + new_tokens - 1):
        start = time.perf_counter()
        logits = model(token, **cache_kwargs(cache), use_cache=True,
                       cache_position=torch.tensor([position])).logits
        token = logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - start)
        tokens.append(token)
    return torch.cat(tokens, dim=1), steps


def check_decoding(model: torch.nn.Module, prompt: torch.Tensor, tokens: torch.Tensor, name: str) -> None:
    """The timed loop must decode exactly what generate() does, or a wrong model would be timed."""
    reference = model.generate(prompt, max_new_tokens=tokens.shape[1], min_new_tokens=tokens.shape[1],
                               do_sample=False, pad_token_id=model.config.eos_token_id)
    if not torch.equal(reference[:, prompt.shape[1]:], tokens):
        raise SystemExit(f"{name}: cached greedy decoding differs from generate(); not timing a wrong model")


def decode_speeds(sources: list[str], prompt: torch.Tensor, new_tokens: int, repeats: int) -> list[list[float]]:
    """Tokens/s (1 / median step time) of each source, `repeats` rounds. The rounds go over all
    models in turn, so a burst of load from other processes slows every model alike instead of
    one model's runs."""
    from supra.models import load_model

    speeds: list[list[float]] = [[] for _ in sources]
    for round_ in range(repeats):
        for i, source in enumerate(sources):
            model = load_model(source).eval()
            tokens, steps = greedy_decode(model, prompt, new_tokens)
            if round_ == 0:
                check_decoding(model, prompt, tokens, source)
            speeds[i].append(1.0 / statistics.median(steps))
            del model
    return speeds


def markdown(rows: list[dict]) -> str:
    base = next(r for r in rows if r["n"] == 0)
    lines = ["| select | skipped | layers skipped | perplexity | change | decode tokens/s | speed-up |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        change = (r["ppl"] / base["ppl"] - 1) * 100
        speedup = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        lines.append(f"| {r['select']} | {r['n']} | {r['skip_layers'] or '-'} | {r['ppl']:.2f} | "
                     f"{change:+.1f}% | {r['decode_tokens_per_s']:.1f} | {speedup:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 3, 6, 9, 12])
    parser.add_argument("--selects", nargs="+", default=["similarity", "last"])
    parser.add_argument("--max-tokens", type=int, default=8192, help="eval.max_tokens for perplexity")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing decoding")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-skip"))
    parser.add_argument("--keep-models", action="store_true", help="keep the skipped models (0.5 GB each)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    prompt = heldout_prompt(args.prompt_tokens)
    eval_args = ["tasks=[ppl]", f"eval.max_tokens={args.max_tokens}"]
    cases = [("none", 0)] + [(s, n) for s in args.selects for n in args.counts if n > 0]
    rows, sources = [], []
    for select, n in cases:
        directory = work / f"{select}-{n}"
        started = time.perf_counter()
        if n == 0:  # the original model: evaluated from its source, results beside it in `directory`
            source = args.model
            cli("eval", f"model={source}", *eval_args, f"out={directory}")
            skip = {"chosen": [], "scores": None}
        else:
            source = str(directory)
            cli("skip", f"model={args.model}", f"select={select}", f"n={n}",
                f"calibration_tokens={args.calibration_tokens}", f"out={directory}")
            cli("eval", f"model={source}", *eval_args, f"out={directory}")  # eval's own default is runs/eval/
            skip = json.loads((directory / "skip.json").read_text())
        ppl = json.loads((directory / "eval.json").read_text())["ppl"]
        rows.append({"select": select, "n": n, "skip_layers": skip["chosen"], "ppl": ppl["ppl"], "loss": ppl["loss"],
                     "tokens_scored": ppl["tokens"], "similarity_scores": skip["scores"],
                     "skip_and_eval_seconds": round(time.perf_counter() - started, 1)})
        sources.append(source)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "similarity_scores"}), flush=True)

    # decode timing on one thread: with other processes on the machine, two threads that must meet
    # at every matmul lose far more to contention than one
    torch.set_num_threads(args.threads)
    for row, speeds in zip(rows, decode_speeds(sources, prompt, args.new_tokens, args.repeats)):
        row["decode_tokens_per_s"] = statistics.median(speeds)
        row["decode_runs_tokens_per_s"] = [round(s, 2) for s in speeds]
    if not args.keep_models:
        for weights in work.glob("*/*.safetensors"):
            weights.unlink()

    result = {
        "benchmark": "attention-sublayer skipping on SmolLM2-135M: held-out perplexity and greedy decode speed",
        "git_sha": git_sha(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg(), "torch": torch.__version__},
        "settings": {"model": args.model, "data": "stdlib (embedded corpus)", "seq_len": 512,
                     "ppl_max_tokens": args.max_tokens, "calibration_tokens": args.calibration_tokens,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "decode_threads": args.threads,
                     "dtype": "float32", "device": "cpu"},
        "rows": rows,
        "markdown": markdown(rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
