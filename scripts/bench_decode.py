"""Decode speed and memory against context length: a converted (recurrent) model vs the original with
its KV cache, through `supra.evaluate.speed` (the `supra eval tasks=[speed]` measurement).

Models: SmolLM2-135M and a Llama-2-7B-shaped model (random init, all 32 layers; decode cost does
not depend on the weights), each original and converted with --method, in bf16. For each context
length: prefill of random tokens, then the median time of single-token decode steps; peak GPU memory
above the weights; the bytes the sequence holds (recurrent state vs keys and values).

    python scripts/bench_decode.py                    # GPU: 1k..64k
    python scripts/bench_decode.py --dry-run          # CPU: tiny recipe, short contexts
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from provenance import figure, write_results

from supra.commands.common import load_model_and_tokenizer
from supra.config import load_config
from supra.convert import convert_model
from supra.evaluate.speed import speed

MODELS = {
    "smollm2-135m": ["recipe=smollm2-135m"],
    "llama7b-shape": ["recipe=llama7b", "model=random", "tokenizer=smollm2-135m"],
    "tiny": ["recipe=tiny"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama7b-shape"], choices=sorted(MODELS))
    parser.add_argument("--method", default="supra", help="conversion method of the recurrent model")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, contexts 64 and 128")
    return parser.parse_args()


def run(name: str, method: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = load_config([*MODELS[name], f"method={method}", f"dtype={args.dtype}", f"device={device}"])
    model, tokenizer = load_model_and_tokenizer(cfg)
    if method != "softmax":
        convert_model(model, cfg, tokenizer)
    result = speed(model.eval(), list(args.lengths), args.decode_tokens)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "method": "original" if method == "softmax" else method, **result}


def plot(runs: list[dict], path: Path, device: str) -> None:
    names = sorted({r["model"] for r in runs})
    with figure(path, 2, len(names), (5 * len(names), 7)) as (fig, axes):
        draw_decode(runs, names, axes)
        fig.suptitle(f"decode, {device}")


def draw_decode(runs: list[dict], names: list[str], axes) -> None:
    for column, name in enumerate(names):
        for r in (r for r in runs if r["model"] == name):
            contexts = [p["context"] for p in r["points"]]
            axes[0][column].plot(contexts, [p["decode_tokens_per_s"] for p in r["points"]], marker="o",
                                 label=r["method"])
            axes[1][column].plot(contexts, [p["state_bytes"] / 2**20 for p in r["points"]], marker="o",
                                 label=r["method"])
        axes[0][column].set(xscale="log", ylabel="decode tokens/s (batch 1)", title=name, ylim=(0, None))
        axes[1][column].set(xscale="log", yscale="log", xlabel="context length",
                            ylabel="cache / state per sequence (MiB)")
        axes[0][column].legend()


def main() -> None:
    args = parse_args()
    if args.dry_run:
        args.models, args.lengths, args.decode_tokens, args.dtype = ["tiny"], [64, 128], 4, "float32"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = []
    for name in args.models:
        for method in ("softmax", args.method):
            try:
                runs.append(run(name, method, args, device))
            except torch.OutOfMemoryError as err:
                print(f"{name} {method}: out of memory ({str(err).splitlines()[0]})", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    print(f"\n{'model':<14} {'method':<9} {'context':>8} {'decode tok/s':>12} {'ms/token':>9} "
          f"{'state MiB':>10} {'peak GB':>8}")
    for r in runs:
        for p in r["points"]:
            peak = p.get("peak_memory_over_weights_bytes")
            print(f"{r['model']:<14} {r['method']:<9} {p['context']:>8} {p['decode_tokens_per_s']:>12.1f} "
                  f"{p['decode_ms_per_token']:>9.2f} {p['state_bytes'] / 2**20:>10.2f} "
                  f"{'' if peak is None else f'{peak / 2**30:.2f}':>8}")
    write_results("bench_decode", args, {"runs": runs}, lambda path, device: plot(runs, path, device))


if __name__ == "__main__":
    main()
