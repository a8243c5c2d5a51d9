"""How much of a trained gated student (gla/gdn with a window) is its recurrent part?

For each model: its held-out perplexity as trained, with the window softmax alone (the mix's window
share forced to 1: no recurrent state), and with the recurrent part alone (share 0); plus the mean
share per layer over the held-out text. If the window alone scores as well as the student, the
student is a sliding-window model and its state carries nothing the benchmark sees.

    python scripts/bench_window_share.py --models runs/bench-quality/demo-gdn/model \
        runs/bench-quality/demo-gdn-token/model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from provenance import REPO, figure, write_results

from supra.evaluate.heldout import corpora

NAME = "window_share"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="trained gla/gdn model directories")
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--heldout-tokens", type=int, default=8192)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-quality", help="where the prose corpus is")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def main() -> None:
    from supra.commands.common import load_model_and_tokenizer
    from supra.commands.settings import heldout_perplexity
    from supra.config import load_config
    from supra.layers.switches import forced_window_share

    args = parse_args()
    texts = corpora(args.work)
    rows = []
    for path in args.models:
        row = {"model": path}
        for corpus, overrides in texts.items():
            cfg = load_config([f"recipe={args.recipe}", f"model={path}", f"eval.max_tokens={args.heldout_tokens}",
                               *overrides])
            model, tokenizer = load_model_and_tokenizer(cfg)
            model.eval()
            heldout = heldout_perplexity(cfg, tokenizer)
            for which, share in (("trained", None), ("window_only", 1.0), ("recurrent_only", 0.0)):
                seen: dict[int, list[float]] = {}
                with torch.no_grad(), forced_window_share(model, share, seen) as gated:
                    if not gated:
                        raise SystemExit(f"{path} has no gated layer with a window (method=gla or gdn, window > 0)")
                    row[f"ppl_{corpus}_{which}"] = heldout(model)["ppl"]
                if share is None:
                    row[f"share_{corpus}"] = {str(i): sum(v) / len(v) for i, v in sorted(seen.items())}
        rows.append(row)
    table = ["| model | corpus | as trained | window only | recurrent only | mean window share (min-max over layers) |",
             "|---|---|---:|---:|---:|---|"]
    for row in rows:
        for corpus in texts:
            shares = list(row[f"share_{corpus}"].values())
            table.append(f"| {row['model']} | {corpus} | {row[f'ppl_{corpus}_trained']:.3f} | "
                         f"{row[f'ppl_{corpus}_window_only']:.3f} | {row[f'ppl_{corpus}_recurrent_only']:.3f} | "
                         f"{sum(shares) / len(shares):.2f} ({min(shares):.2f}-{max(shares):.2f}) |")
    print("\n".join(table))

    def draw(out: Path, device: str) -> None:
        with figure(out) as (fig, axes):
            ax = axes[0][0]
            for row in rows:
                shares = row["share_stdlib"]
                ax.plot([int(i) for i in shares], list(shares.values()), marker=".", label=row["model"])
            ax.set_xlabel("layer")
            ax.set_ylabel("mean window share (stdlib held-out)")
            ax.set_ylim(0, 1)
            ax.set_title(f"window softmax's share in the mix ({device})", fontsize=9)
            ax.legend(fontsize=6)

    write_results(NAME, args, {"rows": rows, "table": table}, draw)


if __name__ == "__main__":
    main()
