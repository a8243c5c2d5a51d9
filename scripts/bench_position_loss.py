"""Held-out loss by position in a long window: what a student keeps of the context beyond its window.

A student with a sliding-window softmax (LoLCATs' 64 tokens, the terrace's 65-128, plus sinks) sees
older tokens only through its linear state. Scored in windows longer than that (default 2,048
tokens), the original model's loss keeps falling deeper into the window, while a window alone
flattens once the window is full. So the loss at late positions separates a state that carries
context from one that does not. Every student with a window is also scored with its window alone
(`supra.layers.switches.window_alone`): a student below its own window-only curve at late positions
uses its state.

One window length and the loss curve only: bench_long_context.py measures the same (its functions
are called here) at several lengths, with passkey retrieval, state bytes and CPU time.

    python scripts/bench_position_loss.py --models runs/bench-quality/demo/model \
        runs/bench-quality/demo-gdn/model runs/bench-quality/demo-gdn-token/model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from provenance import REPO, figure, write_results

from supra.evaluate.heldout import ORIGINAL, corpora, heldout_streams, load_measured, perplexities, run_label

NAME = "position_loss"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="converted model directories")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--seq-len", type=int, default=2048, help="scoring window (longer than any student's)")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--late-from", type=int, default=512,
                        help="'late' positions start here (the table's last column is their mean loss)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-quality", help="where the prose corpus is")
    parser.add_argument("--corpora", nargs="+", choices=("stdlib", "prose"), default=["stdlib", "prose"])
    parser.add_argument("--no-original", action="store_true",
                        help="skip the original model (its rows at the same settings are in an earlier result)")
    parser.add_argument("--name", default=NAME, help="result file name (without .json)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def late_loss(result: dict, late_from: int) -> float:
    """Mean loss over the buckets at or after `late_from` (token-weighted)."""
    late = [(b["end"] - b["start"], b["loss"]) for b in result["by_position"] if b["start"] >= late_from]
    return sum(n * loss for n, loss in late) / sum(n for n, _ in late)


def main() -> None:
    from supra.layers.switches import window_alone

    args = parse_args()
    if args.late_from >= args.seq_len:
        raise SystemExit(f"--late-from {args.late_from} must be below --seq-len {args.seq_len}")
    texts = corpora(args.work, args.corpora)
    length = str(args.seq_len)
    rows = []
    for path in ([] if args.no_original else [ORIGINAL]) + args.models:
        model, tokenizer, _ = load_measured(path, args.recipe)
        streams = heldout_streams(tokenizer, args.recipe, texts, args.heldout_tokens)
        with torch.no_grad():
            scores = {"as trained": perplexities(model, streams, [args.seq_len], [args.heldout_tokens])}
            with window_alone(model) as switched:
                if switched:  # a student with a window
                    scores["window only"] = perplexities(model, streams, [args.seq_len], [args.heldout_tokens])
        for corpus in texts:
            for variant, by_corpus in scores.items():
                result = by_corpus[corpus][length]
                rows.append({"model": path, "variant": variant, "corpus": corpus, "ppl": result["ppl"],
                             "late_loss": late_loss(result, args.late_from), "by_position": result["by_position"]})
                print(f"{path} {variant} {corpus}: ppl {result['ppl']:.3f}, loss from {args.late_from}: "
                      f"{rows[-1]['late_loss']:.4f}", flush=True)
        del model

    buckets = [f"{b['start']}-{b['end']}" for b in rows[0]["by_position"]]
    table = [f"| model | variant | corpus | {' | '.join(buckets)} | ppl | loss from {args.late_from} |",
             "|---|---|---|" + "---:|" * (len(buckets) + 2)]
    for row in rows:
        losses = " | ".join(f"{b['loss']:.3f}" for b in row["by_position"])
        table.append(f"| {row['model']} | {row['variant']} | {row['corpus']} | {losses} | {row['ppl']:.3f} | "
                     f"{row['late_loss']:.4f} |")
    print("\n".join(table))

    def draw(out: Path, device: str) -> None:
        with figure(out, 1, len(texts), size=(12, 4.5)) as (fig, axes):
            for ax, corpus in zip(axes[0], texts):
                for row in (r for r in rows if r["corpus"] == corpus):
                    middle = [(b["start"] + b["end"]) / 2 for b in row["by_position"]]
                    ax.plot(middle, [b["loss"] for b in row["by_position"]], marker=".",
                            linestyle="--" if row["variant"] == "window only" else "-",
                            label=f"{run_label(row['model'])} ({row['variant']})")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("position in the window (bucket middle)")
                ax.set_ylabel("held-out loss (nats/token)")
                ax.set_title(f"{corpus}, windows of {args.seq_len} tokens ({device})", fontsize=9)
                ax.legend(fontsize=6)

    write_results(args.name, args, {"rows": rows, "table": table}, draw)


if __name__ == "__main__":
    main()
