"""The sparse global KV cache (LoLA) on a trained LoLCATs terrace model, per cache budget: held-out
perplexity at a long sequence length (by position bucket), passkey retrieval by length and depth,
the decode state's bytes per sequence, the CPU seconds of each measurement, and of one training
step through the cache (forward + backward of a demo micro-batch: what training with it would cost).

The cache is training-free: each budget is set on the same loaded model (as `supra convert
cache_budget=C` would), nothing is retrained.

    python scripts/bench_sparse_cache.py --model runs/demo/model --budgets 0 64 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from provenance import figure, write_results

NAME = "sparse_cache"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained lolcats model with window_kind=terrace, or an "
                        "original model, converted here by the recipe without training")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity sequence length")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--passkey-lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--passkey-trials", type=int, default=3)
    parser.add_argument("--train-rows", type=int, default=4, help="rows of the timed training step")
    parser.add_argument("--train-len", type=int, default=512, help="tokens per row of the timed training step")
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def state_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of every layer's decode state after a prefill of `ids` (one sequence)."""
    from supra.evaluate.speed import cache_bytes, prefill

    with torch.no_grad():
        return cache_bytes(prefill(model, ids)[0])


def train_step_seconds(model: torch.nn.Module, stream: torch.Tensor, rows: int, length: int) -> float:
    """CPU seconds of one forward + backward (next-token loss) over rows x length held-out tokens."""
    ids = stream[: rows * length].view(rows, length)
    model.train()
    start = time.process_time()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    seconds = time.process_time() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return seconds


def main() -> None:
    from supra.commands.common import load_model_and_tokenizer
    from supra.commands.settings import convert_model, heldout_perplexity
    from supra.config import load_config
    from supra.evaluate.passkey import passkey
    from supra.layers.linearize import recorded_spec
    from supra.layers.switches import respecify

    args = parse_args()
    cfg = load_config([f"recipe={args.recipe}", f"model={args.model}", f"seq_len={args.seq_len}",
                       f"eval.max_tokens={args.heldout_tokens}"])
    model, tokenizer = load_model_and_tokenizer(cfg)
    converted_here = recorded_spec(model) is None
    if converted_here:
        convert_model(model, cfg)
    model.eval()
    heldout = heldout_perplexity(cfg, tokenizer)
    rows = []
    for budget in args.budgets:
        respecify(model, {"cache_budget": budget})
        row: dict = {"cache_budget": budget}
        start = time.process_time()
        with torch.no_grad():
            ppl = heldout(model)
        row["ppl"], row["ppl_by_position"] = ppl["ppl"], ppl["by_position"]
        row["ppl_cpu_s"] = time.process_time() - start
        start = time.process_time()
        keys = passkey(model, tokenizer, args.passkey_lengths, args.passkey_depths, args.passkey_trials, seed=cfg.seed)
        row["passkey"] = {"lengths": keys["lengths"], "depths": args.passkey_depths, "accuracy": keys["accuracy"],
                          "mean_accuracy": keys["mean_accuracy"]}
        row["passkey_cpu_s"] = time.process_time() - start
        row["state_bytes_at"] = {str(n): state_bytes(model, heldout.stream[None, :n]) for n in (1024, 2048)}
        row["train_step_cpu_s"] = train_step_seconds(model, heldout.stream, args.train_rows, args.train_len)
        rows.append(row)
        print(row["cache_budget"], row["ppl"], keys["accuracy"], row["state_bytes_at"], row["train_step_cpu_s"],
              flush=True)

    def draw(out: Path, device: str) -> None:
        with figure(out, 1, 2, size=(11, 4)) as (fig, axes):
            for row in rows:
                buckets = row["ppl_by_position"]
                axes[0][0].plot([b["end"] for b in buckets], [b["ppl"] for b in buckets], marker=".",
                                label=f"cache {row['cache_budget']}")
                for length, accuracy in zip(row["passkey"]["lengths"], row["passkey"]["accuracy"]):
                    axes[0][1].plot(args.passkey_depths, accuracy, marker=".",
                                    label=f"cache {row['cache_budget']}, {length} tokens")
            axes[0][0].set_xlabel("position bucket end")
            axes[0][0].set_ylabel(f"held-out perplexity at seq_len {args.seq_len}")
            axes[0][1].set_xlabel("needle depth")
            axes[0][1].set_ylabel("passkey accuracy")
            for ax in axes[0]:
                ax.legend(fontsize=6)
            fig.suptitle(f"sparse cache on {args.model} ({device})", fontsize=9)

    write_results(args.name, args, {"untrained_conversion": converted_here, "rows": rows}, draw)


if __name__ == "__main__":
    main()
