"""Uptraining throughput of supra's engine: tokens/s per GPU and MFU, recurrent vs softmax attention.

For each model and sequence length, the engine's own optimizer step (`supra.train.trainer.train_step`:
AdamW over float32 weights, bf16 autocast, gradient accumulation, clipping) runs full uptraining of
  - method=supra: the converted model (Triton chunked linear attention on CUDA), and
  - method=softmax: the same model unconverted, attention through PyTorch SDPA (FlashAttention).
Models: SmolLM2-135M (the offline GGUF) and a Llama-2-7B-shaped model with --layers decoder layers
(random init: throughput does not depend on the weights). Batches are random tokens, one document
per row. After --warmup steps, --steps optimizer steps are timed (CUDA synchronised).

MFU = achieved FLOP/s over --peak-tflops. Model FLOPs per token: 6 x the parameters that multiply
(all but the input embedding), plus attention's own: causal softmax 6*T*d per layer (T = sequence,
d = heads x head dim), recurrent state updates and reads 12*K*V per head and layer.

    python scripts/bench_uptrain.py                      # GPU: both models, seq 2048 and 8192
    python scripts/bench_uptrain.py --dry-run            # CPU: the tiny recipe, to check the script
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from functools import partial
from pathlib import Path

import torch
from provenance import figure, write_results

from supra.commands.common import load_model_and_tokenizer
from supra.commands.settings import convert_model, train_config
from supra.config import load_config
from supra.layers.linearize import recorded_spec
from supra.models import torch_dtype
from supra.train.parallel import World
from supra.train.plan import plan_stages
from supra.train.stages import set_trainable
from supra.train.trainer import compute_precision, make_optimizer, train_step

MODELS = {
    "smollm2-135m": ["recipe=smollm2-135m"],
    "llama7b-shape": ["recipe=llama7b", "model=random", "tokenizer=smollm2-135m", "dtype=float32"],
    "tiny": ["recipe=tiny"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama7b-shape"], choices=sorted(MODELS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--methods", nargs="+", default=["supra", "softmax"])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama-7B-shaped model")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="tokens per optimizer step")
    parser.add_argument("--micro-tokens", type=int, default=16384, help="tokens per micro-batch (rows x seq)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, seq 64, 2 steps")
    return parser.parse_args()


def model_flops_per_token(model: torch.nn.Module, method: str, seq_len: int) -> float:
    config = model.config
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    params = sum(p.numel() for p in model.parameters())
    matmul_params = params - (0 if tied else embedding.numel())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if method == "softmax":
        attention = 6 * seq_len * heads * head_dim * layers
    else:
        spec = recorded_spec(model)
        feature_dim = (spec.feature_dim if spec is not None else None) or head_dim
        attention = 12 * feature_dim * head_dim * heads * layers
    return 6 * matmul_params + attention


def random_batches(vocab: int, rows: int, seq_len: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (rows, seq_len), generator=generator)
        yield {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq_len).expand(rows, -1).contiguous()}


def measure(name: str, method: str, seq_len: int, args: argparse.Namespace, device: torch.device) -> dict:
    rows = max(1, args.micro_tokens // seq_len)
    overrides = [*MODELS[name], f"method={method}", f"seq_len={seq_len}", f"device={device}",
                 f"train.micro_batch_size={rows}", f"train.batch_tokens={args.batch_tokens}",
                 "train.stages=[{name: full, tokens: 1000000000, lr: 1e-5, warmup_steps: 1}]"]
    if name == "llama7b-shape":
        overrides.append(f"architecture.num_hidden_layers={args.layers}")
    cfg = load_config(overrides)
    model, tokenizer = load_model_and_tokenizer(cfg)
    convert_model(model, cfg, tokenizer)
    train_cfg = train_config(cfg)
    stage, plan = train_cfg.stages[0], plan_stages(train_cfg, cfg.seq_len, 1)[0]
    set_trainable(model, stage)
    model.train()
    optimizer, _ = make_optimizer(model, stage, plan.steps)
    world = World(device=device)
    batches = random_batches(model.config.vocab_size, rows, seq_len, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    precision = partial(compute_precision, train_cfg, torch_dtype(cfg.dtype), world)
    for _ in range(args.warmup):
        train_step(model, batches, optimizer, stage, plan, train_cfg.grad_clip, world, precision)
    sync()
    started = time.perf_counter()
    losses = [train_step(model, batches, optimizer, stage, plan, train_cfg.grad_clip, world, precision)[0]
              for _ in range(args.steps)]
    sync()
    seconds = (time.perf_counter() - started) / args.steps
    tokens_per_s = plan.tokens_per_step / seconds
    flops = model_flops_per_token(model, method, seq_len)
    result = {"model": name, "method": method, "seq_len": seq_len, "rows_per_micro_batch": rows,
              "tokens_per_step": plan.tokens_per_step, "accumulation": plan.accumulation,
              "parameters": sum(p.numel() for p in model.parameters()), "step_s": seconds,
              "tokens_per_s": tokens_per_s, "model_flops_per_token": flops,
              "mfu": tokens_per_s * flops / (args.peak_tflops * 1e12), "last_loss": losses[-1],
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def add_ratios(results: list[dict]) -> None:
    softmax = {(r["model"], r["seq_len"]): r for r in results if r["method"] == "softmax" and "tokens_per_s" in r}
    for r in results:
        base = softmax.get((r["model"], r["seq_len"]))
        if base and r["method"] != "softmax" and "tokens_per_s" in r:
            r["speed_vs_softmax"] = r["tokens_per_s"] / base["tokens_per_s"]


def plot(results: list[dict], path: Path, device: str) -> None:
    names = sorted({r["model"] for r in results})
    with figure(path, 1, len(names), (5 * len(names), 4)) as (fig, axes):
        for ax, name in zip(axes[0], names):
            for method in sorted({r["method"] for r in results}):
                points = sorted((r["seq_len"], r["tokens_per_s"]) for r in results
                                if r["model"] == name and r["method"] == method and "tokens_per_s" in r)
                if points:
                    ax.plot(*zip(*points), marker="o", label=method)
            ax.set(xscale="log", xlabel="sequence length", ylabel="tokens/s per GPU", title=name, ylim=(0, None))
            ax.legend()
        fig.suptitle(f"full uptraining throughput, {device}")


def main() -> None:
    args = parse_args()
    if args.dry_run:
        args.models, args.seq_lens, args.batch_tokens, args.micro_tokens = ["tiny"], [64], 256, 128
        args.warmup, args.steps = 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in args.models:
        for seq_len in args.seq_lens:
            for method in args.methods:
                try:
                    r = measure(name, method, seq_len, args, device)
                except torch.OutOfMemoryError as err:  # record it and go on with the other cases
                    r = {"model": name, "method": method, "seq_len": seq_len, "error": str(err).splitlines()[0]}
                    gc.collect()
                    torch.cuda.empty_cache()
                results.append(r)
                print(json.dumps(r), flush=True)
    add_ratios(results)
    print(f"\n{'model':<14} {'method':<8} {'seq':>6} {'tok/s/GPU':>10} {'MFU':>6} {'vs softmax':>10} {'GB':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['model']:<14} {r['method']:<8} {r['seq_len']:>6} {r['error']}")
            continue
        ratio = f"{r['speed_vs_softmax']:.2f}x" if "speed_vs_softmax" in r else ""
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else ""
        print(f"{r['model']:<14} {r['method']:<8} {r['seq_len']:>6} {r['tokens_per_s']:>10,.0f} "
              f"{r['mfu']:>6.1%} {ratio:>10} {memory:>6}")
    write_results("bench_uptrain", args, {"results": results}, lambda path, device: plot(results, path, device))


if __name__ == "__main__":
    main()
