"""PNG plots of eval results: loss by position, passkey grid, speed and memory vs context.

Each function takes the result dict its task wrote to eval.json, so a plot can be redrawn from
eval.json alone. matplotlib runs headless (Agg); figures are closed after saving.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_loss_by_position(result: dict, path: Path, label: str = "") -> Path:
    """Mean loss per position bucket of the perplexity windows."""
    buckets = result["by_position"]
    centers = [(b["start"] + b["end"]) / 2 for b in buckets]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(centers, [b["loss"] for b in buckets], marker="o", label=label or None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in window (bucket centre)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(f"loss by position (window {result['seq_len']}, {result['tokens']:,} tokens)")
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    return _save(fig, path)


def plot_passkey(result: dict, path: Path, label: str = "") -> Path:
    """Accuracy grid: context length (rows) by needle depth (columns)."""
    accuracy = result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2, 0.6 * len(result["lengths"]) + 2))
    image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(f"passkey retrieval {label}".strip() + f" ({result['trials']} trials/cell)")
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, path)


def plot_speed(runs: dict[str, dict], path: Path) -> Path:
    """Decode ms/token, prefill tokens/s and state bytes vs context; one line per model in `runs`."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, result in runs.items():
        points = result["points"]
        context = [p["context"] for p in points]
        axes[0].plot(context, [p["decode_ms_per_token"] for p in points], marker="o", label=label)
        axes[1].plot(context, [p["prefill_tokens_per_s"] for p in points], marker="o", label=label)
        memory_key = "peak_memory_bytes" if "peak_memory_bytes" in points[0] else "state_bytes"
        axes[2].plot(context, [p[memory_key] / 2**20 for p in points], marker="o",
                     label=f"{label} ({'peak allocated' if memory_key == 'peak_memory_bytes' else 'state/KV cache'})")
    titles = ("decode time per token (ms)", "prefill throughput (tokens/s)", "memory per sequence (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes:  # from zero: a flat line must look flat, not like noise magnified
        ax.set_ylim(bottom=0)
    device = next(iter(runs.values()))["device"]
    fig.suptitle(f"speed and memory vs context ({device})")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
