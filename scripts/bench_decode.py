"""Decode and prefill speed against context length: converted (recurrent) models vs the original with
its KV cache, every method, measured side by side in one process.

For each context length, every model (the original and one converted model per --methods) prefills
the same random prompt into its own cache; then --rounds rounds, each decoding --decode-tokens greedy
tokens with every model in turn (the order rotates each round), so a change of load on a shared
machine touches all models alike. A model's decode time is the median over all its steps; the
converted/original ratio is the median over rounds of the ratio of that round's medians. At every
length after the shortest, each round also decodes each model's shortest-length cache right after its
long one: `decode_wall_vs_shortest` is the within-round ratio (flatness in context). Times are
process CPU time (the work of this process's threads, not the time other processes hold the cores)
and wall time; the table uses CPU time, the steadier on a shared machine, and the JSON has both
(with 2 threads, CPU time also counts a thread that waits for the other: on a quiet machine, read
the wall-clock ratios). Converted models are untrained: speed does not
depend on the weights.

The `no-attention` row is the original with every attention sublayer removed (`supra skip` of all
layers): what a decode step costs with an attention that costs nothing. Its ratio to the original
bounds what any replacement of attention can reach at that context. The `projections-only` row keeps
each sublayer's q/k/v/o products and mixes nothing (the output is o_proj of v): the bound for any
layer that reuses the pretrained projections, as every method here does. After the timed rounds, one more
pass of --decode-tokens steps per model times the attention sublayers alone (forward hooks, wall
clock, q/k/v/o projections included): `attention_share` is their part of the step.

    python scripts/bench_decode.py                    # GPU: SmolLM2-135M and a Llama-7B-shaped model, bf16, 1k..64k
    python scripts/bench_decode.py                    # CPU: SmolLM2-135M, float32, 256 1k 8k (a few minutes a model)
    python scripts/bench_decode.py --lengths 256 32768 --original-max-length 8192 --name bench_decode_32k
    python scripts/bench_decode.py --dry-run          # tiny recipe, contexts 64 and 128

On CPU the original is prefilled only up to --original-max-length (default 8192): its softmax
prefill is quadratic, and 32k tokens take tens of minutes on two threads.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from provenance import figure, write_results

from supra.commands.common import load_model_and_tokenizer
from supra.config import linearize_spec, load_config
from supra.evaluate.speed import cache_bytes, decode, prefill, random_prompt
from supra.layers.linearize import LinearizeSpec, linearize

MODELS = {
    "smollm2-135m": ["recipe=smollm2-135m"],
    "llama7b-shape": ["recipe=llama7b", "model=random", "tokenizer=smollm2-135m"],
    "tiny": ["recipe=tiny"],
}
METHODS = {  # name -> conversion settings
    "supra": {"method": "supra"},
    "t2r": {"method": "t2r"},
    "lolcats": {"method": "lolcats"},
    "lolcats-sinks4": {"method": "lolcats", "sinks": 4},  # what the demo and smollm2-135m recipes run
    "lolcats-sinks4-terrace": {"method": "lolcats", "sinks": 4, "window_kind": "terrace"},  # a 2W ring
    "demo": None,  # recipes/demo.yaml's conversion: the terrace, sinks, a decayed state and the sparse cache
}
FLOOR = "no-attention"
PROJECTIONS = "projections-only"


class ProjectionsOnly(torch.nn.Module):
    """An attention sublayer reduced to its four products: what reusing q/k/v/o costs by itself.
    It keeps no cache (so decode reads positions from an empty cache: fine for timing)."""

    def __init__(self, attention: torch.nn.Module, groups: int):
        super().__init__()
        self.attention, self.groups = attention, groups

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        a = self.attention
        a.q_proj(hidden_states), a.k_proj(hidden_states)
        v = a.v_proj(hidden_states)
        B, T, _ = v.shape
        v = v.view(B, T, -1, a.head_dim).repeat_interleave(self.groups, dim=2).reshape(B, T, -1)
        return a.o_proj(v), None
GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
CPU_LENGTHS = [256, 1024, 8192]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS),
                        help="default: smollm2-135m and llama7b-shape on GPU, smollm2-135m on CPU")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help=f"context lengths; default {GPU_LENGTHS} on GPU, {CPU_LENGTHS} on CPU")
    parser.add_argument("--original-max-length", type=int, default=None,
                        help="longest context the original is measured at; default: all on GPU, 8192 on CPU")
    parser.add_argument("--decode-tokens", type=int, default=8, help="decoded tokens per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--name", default="bench_decode", help="result file name (JSON and PNG)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, contexts 64 and 128")
    args = parser.parse_args()
    if min(args.decode_tokens, args.rounds, args.threads) < 1:
        parser.error("--decode-tokens, --rounds and --threads must be >= 1")
    if args.lengths is not None and min(args.lengths) < 1:
        parser.error("--lengths must be positive")
    return args


def conversion(method: str) -> LinearizeSpec:
    """A --methods name's conversion; `demo` reads the demo recipe, so it follows the recipe."""
    if METHODS[method] is None:
        return linearize_spec(load_config([f"recipe={method}"]))
    return LinearizeSpec(**METHODS[method])


def load_models(name: str, methods: list[str], dtype: str, device: torch.device) -> dict[str, torch.nn.Module]:
    """The original and one converted copy per method, all from one load."""
    cfg = load_config([*MODELS[name], "method=softmax", f"dtype={dtype}", f"device={device}"])
    original, _ = load_model_and_tokenizer(cfg)
    models = {"original": original.eval()}
    for method in methods:
        models[method] = linearize(copy.deepcopy(original), conversion(method)).eval()
    layers = list(range(original.config.num_hidden_layers))
    models[FLOOR] = linearize(copy.deepcopy(original), LinearizeSpec(method="softmax", skip_layers=layers)).eval()
    models[PROJECTIONS] = copy.deepcopy(original)
    config = original.config
    groups = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    for layer in models[PROJECTIONS].get_decoder().layers:
        layer.self_attn = ProjectionsOnly(layer.self_attn, groups)
    return models


@contextmanager
def attention_clock(model: torch.nn.Module) -> Iterator[list[float]]:
    """Wall seconds spent inside the decoder layers' attention sublayers while the block runs."""
    spent, started = [0.0], []

    def start(*_):
        started.append(time.perf_counter())

    def stop(*_):
        spent[0] += time.perf_counter() - started.pop()

    handles = [h for layer in model.get_decoder().layers
               for h in (layer.self_attn.register_forward_pre_hook(start), layer.self_attn.register_forward_hook(stop))]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def median_ratio(steps: dict[str, list[list[float]]], model: str) -> float:
    """Median over rounds of (this model's median step / the original's median step), same round."""
    return statistics.median(statistics.median(mine) / statistics.median(base)
                             for mine, base in zip(steps[model], steps["original"]))


def bench_length(models: dict[str, torch.nn.Module], length: int, args: argparse.Namespace,
                 shortest: dict[str, list] | None = None) -> tuple[list[dict], dict[str, list]]:
    """Prefill every model at `length`, then decode in rounds. `shortest` holds each model's
    [cache, next token] at the shortest length; each round also decodes those right after the long
    ones, so `decode_wall_vs_shortest` compares the two contexts within the same round (a ratio across
    lengths measured minutes apart also carries the drift of the machine and of the process).
    Returns the points and this length's [cache, next token] per model."""
    device = next(models["original"].parameters()).device
    ids = random_prompt(models["original"], length).to(device)
    running = {n: m for n, m in models.items() if n != "original" or length <= args.original_max_length}
    caches, tokens, prefills, peaks = {}, {}, {}, {}
    for name, model in list(running.items()):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        try:
            caches[name], tokens[name], prefills[name] = prefill(model, ids)
        except torch.OutOfMemoryError as err:
            print(f"  {length:>6} {name:<9} out of memory ({str(err).splitlines()[0]})", flush=True)
            del running[name]
            gc.collect()
            torch.cuda.empty_cache()
            continue
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated(device) - before
        print(f"  {length:>6} {name:<9} prefill {prefills[name]['cpu_s']:.2f} s CPU", flush=True)
    steps: dict[str, dict[str, list[list[float]]]] = {"cpu_s": {n: [] for n in running},
                                                      "wall_s": {n: [] for n in running}}
    short_steps: dict[str, list[list[float]]] = {n: [] for n in running}  # wall clock
    order = list(running)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            tokens[name], times = decode(running[name], caches[name], tokens[name], args.decode_tokens)
            for clock in steps:
                steps[clock][name].append(times[clock])
            if shortest and name in shortest:
                shortest[name][1], times = decode(running[name], *shortest[name], args.decode_tokens)
                short_steps[name].append(times["wall_s"])
    shares = {}
    for name in order:
        with attention_clock(running[name]) as spent:
            tokens[name], times = decode(running[name], caches[name], tokens[name], args.decode_tokens)
        shares[name] = spent[0] / sum(times["wall_s"])
    points = []
    for name in running:
        every = {clock: [t for one_round in steps[clock][name] for t in one_round] for clock in steps}
        point = {
            "model": name, "context": length,
            "prefill_cpu_s": prefills[name]["cpu_s"], "prefill_wall_s": prefills[name]["wall_s"],
            "decode_ms_per_token": 1e3 * statistics.median(every["cpu_s"]),
            "decode_wall_ms_per_token": 1e3 * statistics.median(every["wall_s"]),
            "state_bytes": cache_bytes(caches[name]),
            "attention_share": shares[name],
        }
        if short_steps[name]:
            point["decode_wall_vs_shortest"] = statistics.median(
                statistics.median(long) / statistics.median(short)
                for long, short in zip(steps["wall_s"][name], short_steps[name]))
        if name in peaks:  # CUDA: the prefill's peak above what was allocated before it
            point["prefill_peak_memory_bytes"] = peaks[name]
        if name != "original" and "original" in running:  # both measured in the same rounds
            point["decode_vs_original"] = median_ratio(steps["cpu_s"], name)
            point["decode_wall_vs_original"] = median_ratio(steps["wall_s"], name)
            point["prefill_vs_original"] = prefills[name]["cpu_s"] / prefills["original"]["cpu_s"]
        points.append(point)
    return points, {name: [caches[name], tokens[name]] for name in running}


def summarise(points: list[dict]) -> dict[str, dict]:
    """Per converted model: the goals' figures where their lengths were measured."""
    at = {(p["model"], p["context"]): p for p in points}
    lengths = sorted({p["context"] for p in points})
    summary = {}
    for model in sorted({p["model"] for p in points}):
        mine = {n: at[(model, n)] for n in lengths if (model, n) in at}
        row = {}
        for n in (1024, 8192):
            if n in mine and "decode_vs_original" in mine[n]:
                row[f"decode_vs_original_{n}"] = mine[n]["decode_vs_original"]
                row[f"decode_wall_vs_original_{n}"] = mine[n]["decode_wall_vs_original"]
        if 1024 in mine and 8192 in mine:
            row["prefill_8k_over_1k"] = mine[8192]["prefill_cpu_s"] / mine[1024]["prefill_cpu_s"]
            row["prefill_wall_8k_over_1k"] = mine[8192]["prefill_wall_s"] / mine[1024]["prefill_wall_s"]
        first, last = min(mine), max(mine)
        row[f"decode_{last}_over_{first}"] = mine[last]["decode_ms_per_token"] / mine[first]["decode_ms_per_token"]
        if "decode_wall_vs_shortest" in mine[last]:
            row[f"decode_wall_{last}_over_{first}_same_rounds"] = mine[last]["decode_wall_vs_shortest"]
        summary[model] = row
    return summary


def plot(runs: list[dict], path: Path, device: str) -> None:
    with figure(path, 2, len(runs), (5.5 * len(runs), 8)) as (fig, axes):
        for column, run in enumerate(runs):
            for model in dict.fromkeys(p["model"] for p in run["points"]):
                mine = [p for p in run["points"] if p["model"] == model]
                contexts = [p["context"] for p in mine]
                axes[0][column].plot(contexts, [p["decode_ms_per_token"] for p in mine], marker="o", label=model)
                axes[1][column].plot(contexts, [p["prefill_cpu_s"] for p in mine], marker="o", label=model)
            axes[0][column].set(xscale="log", ylabel="decode ms/token (batch 1)", title=run["model"], ylim=(0, None))
            axes[1][column].set(xscale="log", yscale="log", xlabel="context length", ylabel="prefill s")
            axes[0][column].legend()
        fig.suptitle(f"decode and prefill vs context, {device} (process CPU time)")


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if args.dry_run:
        args.models, args.lengths, args.decode_tokens, args.rounds, args.dtype = ["tiny"], [64, 128], 2, 2, "float32"
    args.models = args.models or (["smollm2-135m", "llama7b-shape"] if on_gpu else ["smollm2-135m"])
    args.lengths = sorted(args.lengths or (GPU_LENGTHS if on_gpu else CPU_LENGTHS))
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.original_max_length is None:
        args.original_max_length = max(args.lengths) if on_gpu else 8192
    if not on_gpu:
        torch.set_num_threads(args.threads)
    runs = []
    load_before = os.getloadavg()
    for name in args.models:
        print(f"{name}: original and {', '.join(args.methods)}", flush=True)
        models = load_models(name, args.methods, args.dtype, device)
        points, shortest = bench_length(models, args.lengths[0], args)
        for length in args.lengths[1:]:
            points += bench_length(models, length, args, shortest)[0]
        del shortest
        runs.append({"model": name, "points": points, "summary": summarise(points)})
        del models
        gc.collect()
    print(f"\n{'model':<14} {'method':<22} {'context':>8} {'decode ms':>10} {'x orig':>7} {'attn %':>7} "
          f"{'prefill s':>10} {'x orig':>7} {'state MiB':>10}")
    for run in runs:
        for p in run["points"]:
            ratio = f"{p['decode_vs_original']:.2f}" if "decode_vs_original" in p else ""
            pre = f"{p['prefill_vs_original']:.2f}" if "prefill_vs_original" in p else ""
            print(f"{run['model']:<14} {p['model']:<22} {p['context']:>8} {p['decode_ms_per_token']:>10.1f} {ratio:>7} "
                  f"{100 * p['attention_share']:>7.1f} {p['prefill_cpu_s']:>10.2f} {pre:>7} "
                  f"{p['state_bytes'] / 2**20:>10.2f}")
        for model, row in run["summary"].items():
            print(f"{run['model']} {model}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    machine = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "note": "shared machine: other processes ran during the measurement; times are process CPU "
                       "time, ratios are taken within a round"}
    write_results(args.name, args, {"machine": machine, "runs": runs},
                  lambda path, device_name: plot(runs, path, device_name))


if __name__ == "__main__":
    main()
