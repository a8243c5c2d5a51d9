"""The sparse global KV cache (LoLA) on a trained LoLCATs terrace model, per cache setting: held-out
perplexity at a long sequence length (by position bucket), passkey retrieval by length and depth,
the decode state's bytes per sequence, the CPU seconds of each measurement, and of one training
step through the cache (forward + backward of a demo micro-batch: what training with it would cost).

The cache is training-free: each setting is applied to the same loaded model (as `supra convert
cache_budget=C cache_chunk=R cache_recall=S` would), nothing is retrained. A setting is BUDGET or
BUDGET:CHUNK:RECALL (pairs per head, run length, share chosen by recall error).

    python scripts/bench_sparse_cache.py --model runs/demo/model --caches 0 64 256
    python scripts/bench_sparse_cache.py --model runs/demo/model --caches 256:1:0 256:8:0 256:8:0.25 256:1:1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from provenance import figure, write_results

from supra.layers.specs import LinearizeSpec

NAME = "sparse_cache"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained lolcats model, or an "
                        "original model, converted here by the recipe without training")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--caches", type=cache_setting, nargs="+", default=["0", "64", "256"],
                        help="BUDGET or BUDGET:CHUNK:RECALL; a budget alone keeps the default chunk and recall")
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


def cache_setting(text: str) -> dict:
    """`256` or `256:8:0.25` as the options it sets."""
    parts = text.split(":")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: expected BUDGET or BUDGET:CHUNK:RECALL, e.g. 256:8:0.25")
    try:
        values = [int(parts[0])] + ([int(parts[1]), float(parts[2])] if len(parts) == 3 else [])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: BUDGET and CHUNK are integers, RECALL a share in [0, 1]") from None
    return dict(zip(("cache_budget", "cache_chunk", "cache_recall"), values))


def label(spec: LinearizeSpec) -> str:
    if not spec.cache_budget:
        return "no cache"
    return f"cache {spec.cache_budget}, runs of {spec.cache_chunk}, {spec.cache_recall:g} by recall"


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
    groups = model.config.num_attention_heads // (model.config.num_key_value_heads or model.config.num_attention_heads)
    heldout = heldout_perplexity(cfg, tokenizer)
    rows = []
    defaults = LinearizeSpec()
    for setting in args.caches:
        try:
            spec = respecify(model, {"cache_chunk": defaults.cache_chunk, "cache_recall": defaults.cache_recall,
                                     **setting})
        except ValueError as err:
            raise SystemExit(f"bench_sparse_cache: error: {err}") from None
        row: dict = {**spec.cache_arguments(groups), "label": label(spec)}
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
        print(row["label"], row["ppl"], keys["accuracy"], row["state_bytes_at"], row["train_step_cpu_s"],
              flush=True)

    def draw(out: Path, device: str) -> None:
        with figure(out, 1, 2, size=(11, 4)) as (fig, axes):
            for row in rows:
                buckets = row["ppl_by_position"]
                axes[0][0].plot([b["end"] for b in buckets], [b["ppl"] for b in buckets], marker=".",
                                label=row["label"])
                for length, accuracy in zip(row["passkey"]["lengths"], row["passkey"]["accuracy"]):
                    axes[0][1].plot(args.passkey_depths, accuracy, marker=".",
                                    label=f"{row['label']}, {length} tokens")
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
