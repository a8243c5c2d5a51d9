"""Does `softmax_layers=auto:K` pick the layers the distillation loss would? The proxy against the
criterion, per layer, on SmolLM2-135M.

fla-org/hybrid-distillation ranks layers by how much restoring each one alone to softmax lowers the
distillation loss of a trained student. `auto:K` cannot train first, so it ranks them on the
untrained conversion by next-token loss (`supra/softmax_select.py`). This script measures both on
the same calibration text (the recipe's, `calibration_tokens`):
- proxy: `choose_softmax_layers` on a fresh conversion with the trained student's own spec, i.e.
  the next-token loss with each layer alone restored;
- criterion: the trained student (--student, e.g. the demo's model), KL(teacher || student) on the
  next token with each layer alone computing the softmax attention it replaced.
It reports each layer's loss drop under both, their Spearman rank correlation, and the overlap of
the top-K sets.

    .venv/bin/python scripts/bench_softmax_choice.py --student runs/demo/model

Prints a table; writes benchmarks/results/cpu/softmax_choice.json and .png (~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import figure, write_results

from supra.config import load_config
from supra.data import as_data_config
from supra.layers.attention import RecurrentAttention
from supra.layers.linearize import decoder_layers, recorded_spec
from supra.models import load_model, load_tokenizer
from supra.skip import calibration_batches
from supra.softmax_select import choose_softmax_layers
from supra.train.transfer import teacher_layers


@torch.no_grad()
def kl_to_teacher(student: torch.nn.Module, batches: list[torch.Tensor], teachers: list[torch.Tensor]) -> float:
    """Mean KL(teacher || student) of the next-token distribution over every position."""
    total, positions = 0.0, 0
    for batch, teacher in zip(batches, teachers):
        logp = F.log_softmax(student(input_ids=batch, use_cache=False).logits.float(), dim=-1)
        total += (teacher.exp() * (teacher - logp)).sum(-1).sum().item()
        positions += batch.numel()
    return total / positions


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    for rank, i in enumerate(order):
        out[i] = float(rank)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def top(drops: dict[int, float], k: int) -> list[int]:
    return sorted(sorted(drops, key=lambda i: -drops[i])[:k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, required=True, help="a trained converted model (a run's model/)")
    parser.add_argument("--recipe", default="demo", help="calibration text and seq_len come from it")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks/results/cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config([f"recipe={args.recipe}", f"calibration_tokens={args.calibration_tokens}"])
    tokenizer = load_tokenizer(cfg.model)
    batches = calibration_batches(tokenizer, as_data_config(cfg.data), cfg.calibration_tokens, cfg.seq_len)
    teacher = load_model(cfg.model).eval()
    started = time.process_time()
    with torch.no_grad():
        teachers = [F.log_softmax(teacher(input_ids=b, use_cache=False).logits.float(), dim=-1) for b in batches]

    student = load_model(str(args.student)).eval()
    spec = recorded_spec(student)
    converted = {i: layer.self_attn for i, layer in enumerate(decoder_layers(student))
                 if isinstance(layer.self_attn, RecurrentAttention)}
    converted_kl = kl_to_teacher(student, batches, teachers)
    kl_restored = {}
    for i, layer in converted.items():
        with teacher_layers([layer]):
            kl_restored[i] = kl_to_teacher(student, batches, teachers)
        print(f"layer {i:>2}: KL {kl_restored[i]:.4f} (all converted {converted_kl:.4f})", flush=True)
    criterion_s = time.process_time() - started

    started = time.process_time()
    proxy_spec = dataclasses.replace(spec, softmax_layers=[], softmax_choice=None)
    choice = choose_softmax_layers(copy.deepcopy(teacher), proxy_spec, 0, batches)
    proxy_s = time.process_time() - started
    proxy_drop = {int(i): choice["loss_all_converted"] - loss for i, loss in choice["loss_restored"].items()}
    kl_drop = {i: converted_kl - kl for i, kl in kl_restored.items()}

    layer_ids = sorted(kl_drop)
    rho = spearman([proxy_drop[i] for i in layer_ids], [kl_drop[i] for i in layer_ids])
    overlap = {k: len(set(top(proxy_drop, k)) & set(top(kl_drop, k))) for k in (1, 2, 4, 8)}
    print("\n| layer | proxy: next-token loss drop (untrained) | criterion: KL drop (trained student) |")
    print("|---:|---:|---:|")
    for i in layer_ids:
        print(f"| {i} | {proxy_drop[i]:.4f} | {kl_drop[i]:.4f} |")
    print(f"\nSpearman rank correlation {rho:.3f}; top-K overlap {overlap}")
    print(f"proxy top-2 {top(proxy_drop, 2)}, criterion top-2 {top(kl_drop, 2)}; "
          f"CPU s: proxy {proxy_s:.0f}, criterion {criterion_s:.0f}")

    def draw(path: Path, device: str) -> None:
        with figure(path) as (_, axes):
            ax = axes[0][0]
            ax.scatter([proxy_drop[i] for i in layer_ids], [kl_drop[i] for i in layer_ids])
            for i in layer_ids:
                ax.annotate(str(i), (proxy_drop[i], kl_drop[i]), fontsize=7)
            ax.set_xlabel("proxy: next-token loss drop, untrained conversion")
            ax.set_ylabel("criterion: KL drop, trained student")
            ax.set_title(f"restoring one layer to softmax (Spearman {rho:.2f}), {device}")

    write_results("softmax_choice", args, {
        "student": str(args.student), "spec": dataclasses.asdict(spec),
        "calibration_tokens": sum(b.numel() for b in batches),
        "criterion": {"name": "KL(teacher || trained student), next token, one layer restored",
                      "all_converted": converted_kl, "restored": kl_restored, "drop": kl_drop, "cpu_s": criterion_s},
        "proxy": {"name": "next-token loss of the untrained conversion, one layer restored (auto:K)",
                  "all_converted": choice["loss_all_converted"], "drop": proxy_drop, "cpu_s": proxy_s},
        "spearman": rho, "top_k_overlap": overlap,
        "top2": {"proxy": top(proxy_drop, 2), "criterion": top(kl_drop, 2)}}, draw)


if __name__ == "__main__":
    main()
