"""What a trained LoLCATs hybrid's linear state does for the keys beyond its exact part, layer by layer.

For every LoLCATs layer of a converted model, on held-out windows of --seq-len tokens (the model's own
hidden states, one forward), each query n is compared with the softmax attention the layer replaced,
computed on the same rotated q, k, v:
- `teacher_beyond`: the softmax weight the original puts on the keys the student does not hold exactly
  (outside the window, the sinks and the sparse cache): what the linear state has to stand for;
- `student_linear`: the share of the student's normaliser that its linear terms hold (its weight on
  those same keys);
- `direction_cosine`: the cosine between the two read-outs of those keys, the teacher's
  sum_beyond a_nj v_j / sum_beyond a_nj against the state's sum fq.fk_j v_j / sum fq.fk_j: whether the
  state recalls the right values, whatever its weight.
Each is a mean over heads and the queries of a position bucket. A state that carries the context has
student_linear close to teacher_beyond and a cosine close to 1; the weights come from
`supra.kernels.sparse_cache.parallel_cached_hybrid_weights`, the library's definition of the hybrid.

    .venv/bin/python scripts/bench_state_share.py --model runs/demo/model --set cache_budget=0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from provenance import figure, write_results

NAME = "state_share"
BUCKETS = [(0, 128), (128, 512), (512, 1024), (1024, 2048), (2048, 4096)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a converted LoLCATs model (model or run directory)")
    parser.add_argument("--recipe", default="demo", help="recipe for dtype, device and the held-out corpus")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="change an option of the model first (switches.respecify), e.g. cache_budget=0")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2, help="held-out windows of --seq-len tokens")
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.changes = dict((key, yaml.safe_load(value)) for key, _, value in (c.partition("=") for c in args.changes))
    return args


def layer_shares(layer: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per query position (T,), means over rows and heads: teacher_beyond, student_linear, direction_cosine."""
    from supra.kernels.sparse_cache import parallel_cached_hybrid_weights

    q, k, v, fq, fk, gate, log_decay = layer.hybrid_inputs(q, k, v, position_embeddings)
    spec = layer.spec
    exact, linear = parallel_cached_hybrid_weights(q, k, v, fq, fk, gate, spec.window, spec.sinks,
                                                   log_decay=log_decay, **spec.cache_arguments(layer.groups))
    T, D = q.shape[1], q.shape[-1]
    qh, kh, vh = (x.transpose(1, 2).to(exact.dtype) for x in (q, k, v))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    teacher = (qh @ kh.transpose(-1, -2) * D**-0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    beyond = causal & (exact == 0)  # the keys the student holds only in its linear state
    teacher_beyond = teacher * beyond
    mass = teacher_beyond.sum(-1)
    student_linear = linear.sum(-1) / (exact + linear).sum(-1)
    read_teacher = (teacher_beyond @ vh) / mass[..., None].clamp_min(1e-30)
    read_state = (linear @ vh) / linear.sum(-1, keepdim=True).clamp_min(1e-30)
    cosine = torch.nn.functional.cosine_similarity(read_teacher, read_state, dim=-1)
    has_beyond = beyond.any(-1).expand_as(cosine)
    cosine = torch.where(has_beyond, cosine, torch.nan)
    return {"teacher_beyond": mass.mean((0, 1)), "student_linear": student_linear.mean((0, 1)),
            "direction_cosine": cosine.nanmean(0).nanmean(0)}


def by_bucket(values: torch.Tensor, length: int) -> list[dict]:
    rows = []
    for start, end in BUCKETS:
        if start < length:
            chunk = values[start:min(end, length)]
            chunk = chunk[~chunk.isnan()]
            rows.append({"start": start, "end": min(end, length),
                         "mean": float(chunk.mean()) if len(chunk) else None})
    return rows


def measure(args: argparse.Namespace) -> dict:
    from supra.evaluate.heldout import heldout_streams, load_measured
    from supra.layers.attention import LolcatsAttention
    from supra.layers.linearize import recorded_spec
    from supra.layers.switches import respecify

    model, tokenizer, _ = load_measured(args.model, args.recipe)
    if args.changes:
        respecify(model, args.changes)
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, LolcatsAttention)]
    if not layers:
        raise SystemExit(f"bench_state_share: error: {args.model} has no LoLCATs layer (method=lolcats)")
    stream = heldout_streams(tokenizer, args.recipe, {"heldout": []}, args.seq_len * args.windows)["heldout"]
    sums: dict[int, dict[str, torch.Tensor]] = {}

    def recording(layer: LolcatsAttention):
        own = layer.mix

        def mix(q, k, v, position_embeddings, state, starts, want_state):
            shares = layer_shares(layer, q, k, v, position_embeddings)
            for key, value in shares.items():
                sums.setdefault(layer.layer_idx, {}).setdefault(key, []).append(value)
            return own(q, k, v, position_embeddings, state, starts, want_state)
        return mix

    for layer in layers:
        layer.mix = recording(layer)  # an instance attribute hides the method
    start = time.process_time()
    with torch.no_grad():
        for w in range(args.windows):
            ids = stream[w * args.seq_len:(w + 1) * args.seq_len][None]
            if ids.shape[1] < args.seq_len:
                raise SystemExit(f"bench_state_share: error: the held-out stream has fewer than "
                                 f"{args.windows} windows of {args.seq_len} tokens")
            model(input_ids=ids, use_cache=False)
    rows = []
    for idx in sorted(sums):
        row = {"layer": idx}
        for key, values in sums[idx].items():
            row[key] = by_bucket(torch.stack(values).nanmean(0), args.seq_len)
        rows.append(row)
    spec = recorded_spec(model)
    return {"model": args.model, "spec": {"window": spec.window, "window_kind": spec.window_kind,
                                          "sinks": spec.sinks, **spec.cache_arguments(layers[0].groups),
                                          "state_decay": spec.state_decay},
            "cpu_seconds": time.process_time() - start, "rows": rows}


def last_bucket(row: dict, key: str) -> float:
    return row[key][-1]["mean"]


def draw(path: Path, device: str, record: dict) -> None:
    rows = record["rows"]
    with figure(path, size=(8, 4.5)) as (fig, axes):
        ax = axes[0, 0]
        layers = [row["layer"] for row in rows]
        for key, style in (("teacher_beyond", "o-"), ("student_linear", "s-"), ("direction_cosine", "^--")):
            ax.plot(layers, [last_bucket(row, key) for row in rows], style, label=key.replace("_", " "))
        bucket = rows[0]["teacher_beyond"][-1]
        ax.set_xlabel("layer")
        ax.set_title(f"queries at {bucket['start']}-{bucket['end']}: what the linear state stands for ({device})",
                     fontsize=9)
        ax.legend()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    payload = measure(args)
    print("| layer | teacher weight beyond the exact part | student's linear share | read-out cosine |")
    print("|---:|---:|---:|---:|")
    for row in payload["rows"]:
        print(f"| {row['layer']} | {last_bucket(row, 'teacher_beyond'):.3f} | {last_bucket(row, 'student_linear'):.3f} "
              f"| {last_bucket(row, 'direction_cosine'):.3f} |")
    means = {key: sum(last_bucket(r, key) for r in payload["rows"]) / len(payload["rows"])
             for key in ("teacher_beyond", "student_linear", "direction_cosine")}
    payload["mean_over_layers_last_bucket"] = means
    print(f"| mean | {means['teacher_beyond']:.3f} | {means['student_linear']:.3f} | {means['direction_cosine']:.3f} |")
    return write_results(args.name, args, payload, lambda path, device: draw(path, device, payload))


if __name__ == "__main__":
    main()
