"""Where a pretrained model's attention goes once a query is past the sliding window: the share on
the first tokens of the window (the attention sink), inside the last W tokens, and older, per layer.

This is why `sinks=S` exists: the LoLCATs hybrid computes the last W tokens exactly and everything
older through a positive feature map, so a large share on token 0 must be rebuilt by the maps
unless token 0 stays in the exact part.

    .venv/bin/python scripts/bench_attention_sinks.py                 # SmolLM2-135M, held-out stdlib, W=64
    .venv/bin/python scripts/bench_attention_sinks.py --windows 4     # fewer 512-token windows

Writes benchmarks/results/cpu/attention_sinks_smollm2.json and .png.
"""

from __future__ import annotations

import argparse

import torch
from provenance import figure, write_results

from supra.commands.common import load_model_and_tokenizer
from supra.config import load_config
from supra.data import iter_documents
from supra.evaluate.perplexity import token_stream


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of seq_len tokens")
    parser.add_argument("--window", type=int, default=64, help="the hybrid's sliding window W")
    parser.add_argument("--name", default="attention_sinks_smollm2")
    parser.add_argument("--out", default=None)
    return parser.parse_args()


@torch.no_grad()
def attention_shares(model: torch.nn.Module, rows: torch.Tensor, window: int) -> list[dict[str, float]]:
    """Per layer, mean over heads, rows and queries at positions >= window: attention on token 0, on
    tokens 0-3, inside the query's last `window` tokens, and on everything older."""
    T = rows.shape[1]
    n = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    in_window = ((j > n - window) & (j <= n)).float()
    out = model(rows, output_attentions=True)
    shares = []
    for layer, a in enumerate(out.attentions):  # (B, H, T, T)
        late = a[:, :, window:]
        inside = (late * in_window[window:]).sum(-1).mean().item()
        shares.append({"layer": layer, "token_0": late[..., 0].mean().item(),
                       "tokens_0_3": late[..., :4].sum(-1).mean().item(), "last_window": inside,
                       "older_than_window_excluding_0_3": 1 - inside - late[..., :4].sum(-1).mean().item()})
    return shares


def main() -> None:
    args = parse_args()
    cfg = load_config([f"recipe={args.recipe}", "method=softmax"])
    model, tokenizer = load_model_and_tokenizer(cfg)
    model.config._attn_implementation = "eager"  # the attention weights themselves
    stream = token_stream(tokenizer, iter_documents(cfg.data, "heldout", tokenizer), args.windows * cfg.seq_len)
    rows = stream[: args.windows * cfg.seq_len].view(args.windows, cfg.seq_len)
    shares = [attention_shares(model.eval(), row[None], args.window) for row in rows]
    layers = [{key: sum(s[i][key] for s in shares) / len(shares) for key in shares[0][i]}
              for i in range(len(shares[0]))]
    print(f"{'layer':>5} {'token 0':>8} {'0-3':>6} {'last W':>7} {'older':>6}")
    for row in layers:
        print(f"{int(row['layer']):>5} {row['token_0']:>8.3f} {row['tokens_0_3']:>6.3f} {row['last_window']:>7.3f} "
              f"{row['older_than_window_excluding_0_3']:>6.3f}")

    def draw(path, device):
        with figure(path) as (fig, axes):
            ax = axes[0][0]
            x = [r["layer"] for r in layers]
            ax.plot(x, [r["token_0"] for r in layers], marker="o", label="token 0 (sink)")
            ax.plot(x, [r["last_window"] for r in layers], marker="o", label=f"last {args.window} tokens")
            ax.plot(x, [r["older_than_window_excluding_0_3"] for r in layers], marker="o", label="older (not 0-3)")
            ax.set(xlabel="layer", ylabel="share of attention", ylim=(0, 1),
                   title=f"SmolLM2-135M, queries at positions >= {args.window} ({device})")
            ax.legend()

    write_results(args.name, args, {"seq_len": cfg.seq_len, "tokens": int(rows.numel()), "layers": layers}, draw)


if __name__ == "__main__":
    main()
