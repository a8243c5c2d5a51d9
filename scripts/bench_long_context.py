"""Long-context quality of converted models against the original: what their recurrent state carries.

For the original model (always first) and each converted model given, on each corpus (stdlib's
held-out split and the Debian Reference prose, as in bench_quality.py):
- held-out perplexity in windows of 512, 2,048 and 4,096 tokens (--lengths), its ratio to the
  original's on the same tokens, and the loss by position bucket in the window (the late buckets
  are where a state has distances to serve);
- the same with the window alone where the model has a softmax window (`supra.layers.switches.
  window_alone`: the LoLCATs hybrid's linear terms, or the gla/gdn state's share, switched off). A
  student above its own window-alone curve gets nothing from its state. A model with a sparse cache
  is also measured with its window and sinks alone (cache_budget=0, then the window alone): the
  exact window the converted model would have without any memory beyond it;
- passkey retrieval at 1k/2k/4k tokens, depths 0, 0.25, 0.5, 0.75 and 1, --passkey-keys random keys
  per cell (supra.evaluate.passkey, greedy);
- the bytes of the decode state the model keeps per sequence after a prefill of each length (the
  tensors in its cache, per layer: recurrent states, windows and caches, or softmax keys and values);
- CPU-minutes: this process's CPU time per model and part (torch's threads included).

Windows are consecutive cuts of the held-out stream (documents joined by EOS), as `supra eval
tasks=[ppl] seq_len=L` scores them. `--set key=value` changes an option of every converted model
before it is measured (`switches.respecify`: the window, a cache budget, ...; the trained weights
must still fit). The original's results are kept in --work per settings and reused.

    .venv/bin/python scripts/bench_long_context.py --models runs/demo/model
    .venv/bin/python scripts/bench_long_context.py --models runs/demo/model --set window=128 --name long_context_w128

Prints markdown tables; writes benchmarks/results/cpu/<name>.json and .png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from provenance import REPO, figure, write_results
from torch import nn
from transformers import PreTrainedTokenizerBase

from supra.evaluate.heldout import ORIGINAL, corpora, heldout_streams, load_measured, perplexities, run_label

NAME = "long_context"
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
# Each perplexity variant a row may hold (its label: its field), and how the figure draws it.
VARIANTS = {"as given": "ppl", "window alone": "window_alone",
            "window and sinks alone, no cache": "window_without_cache"}
STYLES = ("-", "--", ":")


def ratio_key(field: str) -> str:
    """Where a row keeps a variant's perplexity / the original's: ratio, window_alone_ratio, ..."""
    return "ratio" if field == "ppl" else f"{field}_ratio"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], help="converted models (model or run directories)")
    parser.add_argument("--original", default=ORIGINAL, help="the model they were converted from")
    parser.add_argument("--recipe", default="demo", help="recipe for dtype, device, seed and the corpora's settings")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of every converted model changed before measuring (YAML value)")
    parser.add_argument("--corpora", nargs="+", default=["stdlib", "prose"], choices=["stdlib", "prose"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096], help="perplexity windows")
    parser.add_argument("--heldout-tokens", type=int, nargs="+", default=[8192],
                        help="tokens scored per corpus: one count, or one per --lengths")
    parser.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 2048, 4096],
                        help="passkey context lengths (none: no passkey)")
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=DEPTHS)
    parser.add_argument("--passkey-keys", type=int, nargs="+", default=[10],
                        help="keys per cell: one count, or one per --passkey-lengths")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-long-context",
                        help="where the prose corpus and the original's results are kept")
    parser.add_argument("--name", default=NAME, help="result file name (without .json/.png)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.heldout_tokens = per_length(parser, args.heldout_tokens, args.lengths, "--heldout-tokens")
    args.passkey_keys = per_length(parser, args.passkey_keys, args.passkey_lengths, "--passkey-keys")
    for length, tokens in zip(args.lengths, args.heldout_tokens):
        if tokens < length:
            parser.error(f"--heldout-tokens {tokens} is less than one window of {length} tokens")
    if min(args.passkey_keys, default=1) < 1:
        parser.error("--passkey-keys must be >= 1")
    try:
        args.changes = dict(parse_change(text) for text in args.changes)
    except ValueError as err:
        parser.error(str(err))
    return args


def per_length(parser: argparse.ArgumentParser, values: list[int], lengths: list[int], flag: str) -> list[int]:
    if len(values) == 1:
        return values * len(lengths)
    if len(values) != len(lengths):
        parser.error(f"{flag} takes one value or one per length ({len(lengths)}), got {len(values)}")
    return values


def parse_change(text: str) -> tuple[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def load(source: str, recipe: str, changes: dict[str, Any]) -> tuple[nn.Module, PreTrainedTokenizerBase, Any]:
    """(model in eval mode, tokenizer, config) of a model source, with `changes` to its options."""
    from supra.layers.switches import respecify

    model, tokenizer, cfg = load_measured(source, recipe)
    if changes:
        try:
            respecify(model, changes)
        except ValueError as err:
            raise SystemExit(f"bench_long_context: error: {source}: {err}") from None
    return model.eval(), tokenizer, cfg  # the layers respecify rebuilt, too


def passkey_grid(model: nn.Module, tokenizer: PreTrainedTokenizerBase, lengths: list[int], depths: list[float],
                 keys: list[int], seed: int) -> dict:
    """supra.evaluate.passkey per length (each with its own number of keys), as one grid."""
    from supra.evaluate.passkey import passkey

    grid: dict[str, Any] = {"lengths": lengths, "depths": depths, "keys": keys, "accuracy": [],
                            "prompt_tokens": [], "examples": []}
    for length, count in zip(lengths, keys):
        try:
            cell = passkey(model, tokenizer, [length], depths, count, seed=seed)
        except ValueError as err:
            raise SystemExit(f"bench_long_context: error: {err}") from None
        for field in ("accuracy", "prompt_tokens", "examples"):
            grid[field] += cell[field]
    grid["mean_accuracy"] = [sum(row) / len(row) for row in grid["accuracy"]]
    return grid


def state_bytes(model: nn.Module, lengths: list[int]) -> dict[str, dict]:
    """{length: {total, per_layer}}: the cache one sequence leaves after a prefill of `length` tokens."""
    from supra.evaluate.speed import cache_bytes_per_layer, prefill, random_prompt

    device = next(model.parameters()).device
    result = {}
    for length in lengths:
        cache, _, _ = prefill(model, random_prompt(model, length).to(device))
        per_layer = cache_bytes_per_layer(cache)
        result[str(length)] = {"total": sum(per_layer), "per_layer": per_layer}
    return result


def measure(source: str, args: argparse.Namespace, texts: dict[str, list[str]], changes: dict[str, Any]) -> dict:
    """Every measurement of one model, with the CPU-minutes of each part."""
    from supra.layers.linearize import recorded_spec
    from supra.layers.switches import respecify, window_alone

    cpu: dict[str, float] = {}
    mark = time.process_time()

    def lap(part: str) -> None:
        nonlocal mark
        now = time.process_time()
        cpu[part], mark = (now - mark) / 60, now
        print(f"{source}: {part} done ({cpu[part]:.1f} CPU-min)", flush=True)

    model, tokenizer, cfg = load(source, args.recipe, changes)
    spec = recorded_spec(model)
    streams = heldout_streams(tokenizer, args.recipe, texts, max(args.heldout_tokens))
    lap("load")
    row: dict[str, Any] = {"model": source, "label": run_label(source), "method": spec.method if spec else "softmax",
                           "spec": None if spec is None else {k: v for k, v in vars(spec).items()
                                                              if k not in ("factorized", "softmax_choice")},
                           "changes": changes}
    with torch.no_grad():
        row["ppl"] = perplexities(model, streams, args.lengths, args.heldout_tokens)
        lap("ppl")
        with window_alone(model) as switched:
            row["window_alone"] = perplexities(model, streams, args.lengths, args.heldout_tokens) if switched else None
        lap("window_alone")
        row["passkey"] = (passkey_grid(model, tokenizer, args.passkey_lengths, args.passkey_depths, args.passkey_keys,
                                       cfg.seed) if args.passkey_lengths else None)
        lap("passkey")
        row["state_bytes"] = state_bytes(model, args.lengths)
        lap("state_bytes")
        row["window_without_cache"] = None
        if spec is not None and spec.cache_budget:
            respecify(model, {"cache_budget": 0})
            with window_alone(model):
                row["window_without_cache"] = perplexities(model, streams, args.lengths, args.heldout_tokens)
            lap("window_without_cache")
    row["cpu_min"] = {**cpu, "total": sum(cpu.values())}
    ppl = {corpus: {n: round(r["ppl"], 3) for n, r in by_length.items()} for corpus, by_length in row["ppl"].items()}
    print(f"{row['label']}: perplexity {json.dumps(ppl)}, {row['cpu_min']['total']:.1f} CPU-min", flush=True)
    return row


def original_row(args: argparse.Namespace, texts: dict[str, list[str]]) -> dict:
    """The original's measurements, kept in --work per settings (it is the same model every run)."""
    settings = {k: getattr(args, k) for k in ("original", "recipe", "corpora", "lengths", "heldout_tokens",
                                              "passkey_lengths", "passkey_depths", "passkey_keys")}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = args.work / f"original-{key}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "reused": str(path)}
    row = measure(args.original, args, texts, {})
    args.work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return row


def add_ratios(rows: list[dict]) -> None:
    """ratio (and window_alone_ratio, window_without_cache_ratio): perplexity / the original's on the
    same tokens, per corpus and length."""
    original = rows[0]["ppl"]
    for row in rows:
        for field in VARIANTS.values():
            if row.get(field) is not None:
                row[ratio_key(field)] = {
                    corpus: {n: r["ppl"] / original[corpus][n]["ppl"] for n, r in by_length.items()}
                    for corpus, by_length in row[field].items()}


def tables(rows: list[dict], args: argparse.Namespace) -> list[str]:
    lengths = [str(n) for n in args.lengths]
    out = []
    for corpus in args.corpora:
        last = {n: rows[0]["ppl"][corpus][n]["by_position"][-1] for n in lengths}
        out += [f"**{corpus}**: perplexity / the original's at each window length; loss (nats/token) in each "
                "window's last position bucket", "",
                "| model | variant | " + " | ".join(f"ratio {n}" for n in lengths) + " | "
                + " | ".join(f"loss {last[n]['start']}-{last[n]['end']}" for n in lengths) + " |",
                "|---|---|" + "---:|" * (2 * len(lengths))]
        for row in rows:
            for variant, field in VARIANTS.items():
                if row.get(field) is None:
                    continue
                ratio = ratio_key(field)
                ratios = " | ".join(f"{row[ratio][corpus][n]:.3f}" for n in lengths)
                losses = " | ".join(f"{row[field][corpus][n]['by_position'][-1]['loss']:.3f}" for n in lengths)
                out.append(f"| {row['label']} | {variant} | {ratios} | {losses} |")
        out.append("")
    if args.passkey_lengths:
        depths = args.passkey_depths
        out += ["**passkey**: accuracy per context length and depth (keys per cell: "
                f"{', '.join(map(str, args.passkey_keys))})", "",
                "| model | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
                "|---|---:|" + "---:|" * (len(depths) + 1)]
        for row in rows:
            grid = row["passkey"]
            for length, accuracy, mean in zip(grid["lengths"], grid["accuracy"], grid["mean_accuracy"]):
                out.append(f"| {row['label']} | {length} | " + " | ".join(f"{a:.2f}" for a in accuracy)
                           + f" | {mean:.2f} |")
        out.append("")
    out += ["**cost**: decode state + cache bytes per sequence after a prefill; CPU-minutes (process time)", "",
            "| model | " + " | ".join(f"bytes at {n}" for n in lengths) + " | CPU-min | of which passkey |",
            "|---|" + "---:|" * (len(lengths) + 2)]
    for row in rows:
        sizes = " | ".join(f"{row['state_bytes'][n]['total'] / 2**20:.2f} MiB" for n in lengths)
        out.append(f"| {row['label']} | {sizes} | {row['cpu_min']['total']:.1f} | {row['cpu_min']['passkey']:.1f} |")
    return out


def draw_figure(rows: list[dict], args: argparse.Namespace, out: Path, device: str) -> None:
    longest = str(max(args.lengths))
    with figure(out, 2, 2, size=(12, 9)) as (fig, axes):
        colour = {row["label"]: f"C{i}" for i, row in enumerate(rows)}  # a model's window alone: its colour, dashed
        if len(args.corpora) == 1:
            axes[0][1].axis("off")
        for ax, corpus in zip(axes[0], args.corpora):
            for row in rows:
                for (variant, field), style in zip(VARIANTS.items(), STYLES):
                    if row.get(field) is None:
                        continue
                    buckets = row[field][corpus][longest]["by_position"]
                    ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["loss"] for b in buckets],
                            marker=".", linestyle=style, color=colour[row["label"]],
                            label=row["label"] + (f" ({variant})" if field != "ppl" else ""))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("position in the window (bucket middle)")
            ax.set_ylabel("held-out loss (nats/token)")
            ax.set_title(f"{corpus}, windows of {longest} tokens ({device})", fontsize=9)
            ax.legend(fontsize=6)
        ax = axes[1][0]
        for row in rows[1:]:
            for corpus, marker in zip(args.corpora, "os"):
                for (variant, field), style in zip(VARIANTS.items(), STYLES):
                    ratio = ratio_key(field)
                    if ratio in row:
                        ax.plot(args.lengths, [row[ratio][corpus][str(n)] for n in args.lengths], marker=marker,
                                linestyle=style, color=colour[row["label"]], label=f"{row['label']} {corpus}"
                                + (f" ({variant})" if field != "ppl" else ""))
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("window length (tokens)")
        ax.set_ylabel("perplexity / original's")
        ax.set_title("ratio to the original by window length", fontsize=9)
        if len(rows) > 1:
            ax.legend(fontsize=6)
        ax = axes[1][1]
        if args.passkey_lengths:
            for row in rows:
                ax.plot(args.passkey_lengths, row["passkey"]["mean_accuracy"], marker="o", color=colour[row["label"]],
                        label=row["label"])
            ax.set_ylim(-0.05, 1.05)
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=6)
        ax.set_xlabel("passkey context length (tokens)")
        ax.set_ylabel("accuracy (mean over depths)")
        ax.set_title("passkey retrieval", fontsize=9)


def main(argv: list[str] | None = None) -> dict:
    from supra.models import SourceError, resolve_source

    args = parse_args(argv)
    for source in args.models:  # a wrong path stops the run before an hour of measuring
        try:
            resolve_source(source)
        except SourceError as err:
            raise SystemExit(f"bench_long_context: error: {err}") from None
    texts = corpora(args.work, args.corpora)
    load_average = os.getloadavg()[0]  # the machine may be shared: CPU times are this process's own
    converted = [measure(source, args, texts, args.changes) for source in args.models]
    rows = [original_row(args, texts), *converted]
    add_ratios(rows)
    table = tables(rows, args)
    print("\n".join(table))
    machine = f"{os.cpu_count()} cores, load average {load_average:.1f} at the start; CPU times are process times"
    return write_results(args.name, args, {"machine": machine, "rows": rows, "table": table},
                         lambda out, device: draw_figure(rows, args, out, device))


if __name__ == "__main__":
    main()
