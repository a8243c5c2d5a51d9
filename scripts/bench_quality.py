"""How close uptraining gets to the original model, per CPU-minute: held-out perplexity ratio of
SmolLM2-135M converted to an all-linear LoLCATs model and uptrained by named variants of the stages.

Each variant is one `supra uptrain` run of --recipe (the user's command, in a subprocess) with its
stages overridden, `train.eval_every` set so the held-out stdlib perplexity is logged along the way
(the curve; its x is the run's process CPU time less the CPU its evaluations took). The finished
model is then scored here, beside the original model, on the same held-out tokens at the same
seq_len (position buckets too) of two corpora:
- stdlib: the embedded corpus's held-out split (the recipe trains on the rest of it);
- prose: the Debian Reference (package debian-reference-en, English prose about running a Debian
  system; `make bench-quality` installs it), cut into documents at blank lines, never trained on.

CPU-minutes are the uptrain process's own CPU time (time.process_time, logged in metrics.jsonl): the
machine is shared, and CPU time is what another user's load disturbs least. A quiet 2-core run
takes about CPU time / 2 of wall time when both threads stay busy (torch uses 2 threads here).

    .venv/bin/python scripts/bench_quality.py                          # every variant
    .venv/bin/python scripts/bench_quality.py --variants cached cached+distill-lora

Results of variants not rerun are kept from the previous JSON, so variants can be run one at a time.
Prints a markdown table; writes benchmarks/results/cpu/quality_smollm2.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from provenance import REPO, figure, write_results

from supra.evaluate.heldout import ORIGINAL, PROSE_SOURCE, corpora

PASSKEY_DEPTHS = [0.0, 0.5, 1.0]
NAME = "quality_smollm2"

class Variant(NamedTuple):
    description: str
    stages: str  # train.stages; token budgets are in the stages, the demo's batch is 2,048 tokens
    overrides: tuple[str, ...] = ()  # other settings, e.g. the conversion's
    then: tuple[str, ...] = ()  # settings of a `supra convert` of the uptrained model, scored instead of it


TRANSFER = "name: attention_transfer, lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 4"
CACHED = f"{{{TRANSFER}, tokens: 32768, cache_tokens: 32768, epochs: 4}}"
DEMO = f"[{{{TRANSFER}, tokens: 32768, cache_tokens: 32768, epochs: 12}}]"  # the demo's budget: 192 steps
DISTILL = "{name: distill, train: lora, tokens: 16384, lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 1}"
# Each variant names its whole conversion, so it means the same thing whatever the recipe's defaults.
SLIDING = ("window_kind=sliding", "sinks=0")
TERRACE_SINKS = ("window_kind=terrace", "sinks=4")
VARIANTS: dict[str, Variant] = {
    "demo-before": Variant("the demo of the first release: on-the-fly transfer 81,920 tokens, LoRA 12,288 "
                           "(next-token loss)",
                           f"[{{{TRANSFER}, tokens: 81920}}, {{name: lora, tokens: 12288, lr: 1.0e-4, "
                           "min_lr: 1.0e-5, warmup_steps: 1}]", SLIDING),
    "cached": Variant("cached transfer: 32,768 tokens, 4 epochs", f"[{CACHED}]", SLIDING),
    "cached-64k": Variant("cached transfer: 65,536 tokens in 2 chunks, 4 epochs each",
                          f"[{{{TRANSFER}, tokens: 65536, cache_tokens: 32768, epochs: 4}}]", SLIDING),
    "cached+distill-lora": Variant("cached transfer as `cached`, then distill LoRA r=8 (KL) 16,384 tokens",
                                   f"[{CACHED}, {DISTILL}]", SLIDING),
    "cached+distill-new": Variant("cached transfer as `cached`, then distill the feature maps (KL) 16,384 tokens",
                                  f"[{CACHED}, {{name: distill, train: new, tokens: 16384, lr: 1.0e-3, "
                                  "min_lr: 1.0e-4, warmup_steps: 1}]", SLIDING),
    "cached+lora": Variant("cached transfer as `cached`, then LoRA (next-token loss) 16,384 tokens",
                           f"[{CACHED}, {{name: lora, tokens: 16384, lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 1}}]",
                           SLIDING),
    "cached-sinks4": Variant("as `cached`, with the first 4 tokens kept in the softmax window (sinks=4)",
                             f"[{CACHED}]", ("window_kind=sliding", "sinks=4")),
    "cached-sinks4+distill-lora": Variant("as `cached+distill-lora`, with sinks=4", f"[{CACHED}, {DISTILL}]",
                                          ("window_kind=sliding", "sinks=4")),
    "cached-sinks4-terrace": Variant("as `cached-sinks4`, with LoLCATs' terrace window (window_kind=terrace)",
                                     f"[{CACHED}]", TERRACE_SINKS),
    # One method per row at the demo's budget and conversion (terrace window + 4 sinks where the
    # method has a window): the comparison of the gated students with LoLCATs and SUPRA.
    "demo": Variant("the shipped demo: LoLCATs, terrace + sinks=4, cached transfer 32,768 tokens x 12 epochs",
                    DEMO, ("method=lolcats", *TERRACE_SINKS)),
    "demo-supra": Variant("as `demo`, method=supra (fixed decay, no window)", DEMO, ("method=supra", "sinks=0")),
    "demo-gla": Variant("as `demo`, method=gla (key gate, window mixed per head)", DEMO,
                        ("method=gla", *TERRACE_SINKS)),
    "demo-gdn": Variant("as `demo`, method=gdn (gated delta rule, key gate, window mixed per head)", DEMO,
                        ("method=gdn", *TERRACE_SINKS)),
    "demo-gdn-token": Variant("as `demo-gdn`, the window's share per token (window_mix=token)", DEMO,
                              ("method=gdn", *TERRACE_SINKS, "window_mix=token")),
    "demo-proxy2": Variant("as `demo`, with layers 0 and 1 kept as softmax through training: the untrained "
                           "proxy's choice (`supra convert softmax_layers=auto:2` on the original model)", DEMO,
                           ("method=lolcats", *TERRACE_SINKS, "softmax_layers=[0,1]")),
    "demo-auto2": Variant("as `demo` with softmax_layers=auto:2: after training, the 2 layers whose restoration "
                          "lowers the trained student's KL to its teacher most turned back into softmax (one "
                          "uptrain)", DEMO, ("method=lolcats", *TERRACE_SINKS, "softmax_layers=auto:2")),
    "demo-restore2": Variant("as `demo`, then the 2 layers whose restoration lowers the trained student's KL "
                             "to its teacher most turned back into softmax", DEMO, ("method=lolcats", *TERRACE_SINKS),
                             then=("softmax_layers=auto:2",)),
    "demo-gdn-restore2": Variant("as `demo-gdn`, then the 2 layers whose restoration lowers the trained student's "
                                 "KL to its teacher most turned back into softmax", DEMO,
                                 ("method=gdn", *TERRACE_SINKS), then=("softmax_layers=auto:2",)),
    "demo-gdn-token-restore2": Variant("as `demo-gdn-token`, then the 2 layers whose restoration lowers the trained "
                                       "student's KL to its teacher most turned back into softmax", DEMO,
                                       ("method=gdn", *TERRACE_SINKS, "window_mix=token"),
                                       then=("softmax_layers=auto:2",)),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--heldout-tokens", type=int, default=8192, help="per corpus, at the recipe's seq_len")
    parser.add_argument("--eval-every", type=int, default=8, help="steps between held-out points of the curve")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-quality")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu")
    parser.add_argument("--keep-runs", action="store_true", help="keep each variant's run directory")
    parser.add_argument("--max-cpu-min", type=float, default=None,
                        help="stop a variant (SIGTERM: it checkpoints) past this much CPU time; its curve is kept")
    parser.add_argument("--passkey", type=int, nargs="*", default=None, metavar="LENGTH",
                        help="also score passkey retrieval at these context lengths (default 1024 2048 4096 "
                             "when given bare), depths 0, 0.5 and 1, --passkey-trials keys per cell")
    parser.add_argument("--passkey-trials", type=int, default=4)
    parser.add_argument("--reuse-runs", action="store_true",
                        help="report the variants' run directories already under --work instead of running them")
    args = parser.parse_args()
    if args.passkey == []:
        args.passkey = [1024, 2048, 4096]
    return args


def original_scores(args: argparse.Namespace, texts: dict[str, list[str]]) -> dict[str, dict]:
    """The original model on both corpora, computed once per recipe and token count (kept in --work)."""
    path = args.work / f"original-{args.recipe}-{args.heldout_tokens}.json"
    if not path.exists():
        scores = {c: score(ORIGINAL, args.recipe, o, args.heldout_tokens) for c, o in texts.items()}
        path.write_text(json.dumps(scores))
    return json.loads(path.read_text())


def passkey_score(model_source: str, recipe: str, lengths: list[int], trials: int) -> dict:
    """Passkey retrieval of a model source, as `supra eval tasks=[passkey]` computes it."""
    from supra.commands.common import load_model_and_tokenizer
    from supra.config import load_config
    from supra.evaluate.passkey import passkey

    cfg = load_config([f"recipe={recipe}", f"model={model_source}"])
    model, tokenizer = load_model_and_tokenizer(cfg)
    return passkey(model.eval(), tokenizer, lengths, PASSKEY_DEPTHS, trials, seed=cfg.seed)


def original_passkey(args: argparse.Namespace) -> dict:
    path = args.work / f"original-passkey-{'-'.join(map(str, args.passkey))}-{args.passkey_trials}.json"
    if not path.exists():
        path.write_text(json.dumps(passkey_score(ORIGINAL, args.recipe, args.passkey, args.passkey_trials)))
    return json.loads(path.read_text())


def passkey_cell(result: dict | None) -> str:
    """Accuracy per context length, averaged over the depths."""
    if result is None:
        return "-"
    return " / ".join(f"{sum(row) / len(row):.2f}" for row in result["accuracy"])


def score(model_source: str, recipe: str, corpus: list[str], tokens: int) -> dict:
    """Held-out perplexity of a model source on one corpus, as `supra eval tasks=[ppl]` computes it."""
    import torch

    from supra.commands.common import load_model_and_tokenizer
    from supra.commands.settings import heldout_perplexity
    from supra.config import load_config

    cfg = load_config([f"recipe={recipe}", f"model={model_source}", f"eval.max_tokens={tokens}", *corpus])
    model, tokenizer = load_model_and_tokenizer(cfg)
    with torch.no_grad():
        return heldout_perplexity(cfg, tokenizer)(model.eval())


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """One `supra uptrain` of the variant; its curve from metrics.jsonl and its CPU and wall time."""
    run = args.work / name
    if run.exists() and not args.reuse_runs:
        subprocess.run(["rm", "-rf", str(run)], check=True)
    command = [sys.executable, "-m", "supra.cli", "uptrain", f"recipe={args.recipe}", f"out={run}",
               f"train.stages={VARIANTS[name].stages}", *VARIANTS[name].overrides,
               "train.eval_baselines=false", "train.sample_tokens=0",
               "train.logger=none", f"train.eval_every={args.eval_every}", f"eval.max_tokens={args.heldout_tokens}",
               "train.checkpoint_every=1000"]
    if not args.reuse_runs:
        launch(command, run, args.max_cpu_min)
    done = read_run(run)
    then = VARIANTS[name].then
    if then and done["finished"]:
        converted = run / "converted"
        if not (converted / "config.json").exists():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            command = [sys.executable, "-m", "supra.cli", "convert", f"recipe={args.recipe}",
                       f"model={run / 'model'}", *then, f"out={converted}"]
            print("$ supra convert " + " ".join(command[4:]), flush=True)
            subprocess.run(command, check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            convert_min = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60
            (run / "convert_cpu_min.txt").write_text(f"{convert_min}\n")
        done["convert_cpu_min"] = float((run / "convert_cpu_min.txt").read_text())
        done["cpu_min"] += done["convert_cpu_min"]
        done["model"] = converted
    return done


def launch(command: list[str], run: Path, max_cpu_min: float | None) -> None:
    """Run one uptrain; past max_cpu_min of its CPU time, SIGTERM it (it checkpoints and exits 75)."""
    print("$ supra uptrain " + " ".join(command[4:]), flush=True)
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while process.poll() is None:
        time.sleep(5)
        if max_cpu_min is not None and process_cpu_s(process.pid) > 60 * max_cpu_min:
            process.send_signal(signal.SIGTERM)
            process.wait()
    if process.returncode not in (0, 75):
        raise SystemExit(f"supra uptrain failed with exit code {process.returncode}: {run}")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def read_run(run: Path) -> dict:
    """A run's curve and costs from its metrics.jsonl; CPU times are the uptrain process's own."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve, stages, eval_cpu = [], [], 0.0
    for r in records:  # in the order they happened
        if "stage_start" in r:
            stages.append({"stage": r["stage_start"], "steps": 0, "start_cpu_s": r["cpu_s"], "eval_cpu_s": 0.0})
        elif "heldout_ppl" in r:
            eval_cpu += r["eval_cpu_s"]
            stages[-1]["eval_cpu_s"] += r["eval_cpu_s"]
            curve.append({"step": r["step"], "stage": r["stage"], "tokens": r["tokens"], "ppl": r["heldout_ppl"],
                          "train_cpu_min": (r["cpu_s"] - eval_cpu) / 60})
        elif "loss" in r:
            stages[-1]["steps"] += 1
            stages[-1]["cpu_min"] = (r["cpu_s"] - stages[-1]["start_cpu_s"] - stages[-1]["eval_cpu_s"]) / 60
    for stage in stages:  # teacher caches included: they are built between steps
        stage["steps_per_cpu_min"] = stage["steps"] / stage["cpu_min"]
        del stage["start_cpu_s"], stage["eval_cpu_s"]
    last = records[-1]
    timed = [r["time"] for r in records if "time" in r]  # held-out records carry CPU time only
    return {"run": run, "model": run / "model", "finished": (run / "model" / "config.json").exists(),
            "cpu_min": last["cpu_s"] / 60,
            "train_cpu_min": (last["cpu_s"] - eval_cpu) / 60, "wall_min": (timed[-1] - timed[0]) / 60,
            "steps": max((r["step"] for r in records if "loss" in r), default=0), "curve": curve, "stages": stages}


def main() -> None:
    args = parse_args()
    out_json = args.out / f"{NAME}.json"
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    texts = corpora(args.work)
    load = os.getloadavg()
    original = original_scores(args, texts)
    passkey_original = original_passkey(args) if args.passkey else None
    results = {v["name"]: v for v in previous.get("variants", [])
               if v["name"] not in args.variants and v.get("heldout_tokens") == args.heldout_tokens
               and v.get("recipe") == args.recipe}
    for name in args.variants:
        done = run_variant(name, args)
        for point in done["curve"]:
            point["ratio"] = point["ppl"] / original["stdlib"]["ppl"]
        results[name] = {
            "name": name, "description": VARIANTS[name].description, "stages": VARIANTS[name].stages,
            "overrides": list(VARIANTS[name].overrides), "then_convert": list(VARIANTS[name].then),
            "convert_cpu_min": done.get("convert_cpu_min"), "recipe": args.recipe,
            "heldout_tokens": args.heldout_tokens, "finished": done["finished"], "steps": done["steps"],
            "cpu_min": round(done["cpu_min"], 2), "train_cpu_min": round(done["train_cpu_min"], 2),
            "wall_min": round(done["wall_min"], 2), "stage_costs": done["stages"], "curve": done["curve"]}
        if done["finished"]:  # a variant stopped at --max-cpu-min has its curve only
            # stdlib: uptrain's own final score (the same held-out tokens); prose: scored here
            model = str(done["model"])
            stdlib = (score(model, args.recipe, texts["stdlib"], args.heldout_tokens) if VARIANTS[name].then
                      else json.loads((done["run"] / "eval.json").read_text())["ppl_uptrained"])
            final = {"stdlib": stdlib, "prose": score(model, args.recipe, texts["prose"], args.heldout_tokens)}
            results[name].update({**{f"ppl_{c}": final[c]["ppl"] for c in texts},
                                  **{f"ratio_{c}": final[c]["ppl"] / original[c]["ppl"] for c in texts},
                                  **{f"by_position_{c}": final[c]["by_position"] for c in texts}})
            if args.passkey:
                results[name]["passkey"] = passkey_score(str(done["model"]), args.recipe, args.passkey,
                                                         args.passkey_trials)
        if not args.keep_runs:
            subprocess.run(["rm", "-rf", str(done["run"])], check=True)
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k.startswith('ratio')})}, "
              f"{done['cpu_min']:.1f} CPU-min", flush=True)
    variants = [results[n] for n in VARIANTS if n in results]
    table = ["| variant | CPU-min (train) | wall min | stdlib ppl | stdlib ratio | prose ppl | prose ratio | "
             f"passkey at {'/'.join(map(str, args.passkey or []))} |", "|---|---|---|---|---|---|---|---|"]
    table.append(f"| original | | | {original['stdlib']['ppl']:.3f} | 1 | {original['prose']['ppl']:.3f} | 1 | "
                 f"{passkey_cell(passkey_original)} |")
    for v in variants:
        if v["finished"]:
            scores = (f"{v['ppl_stdlib']:.3f} | {v['ratio_stdlib']:.3f} | {v['ppl_prose']:.3f} | "
                      f"{v['ratio_prose']:.3f}")
        elif v["curve"]:  # stopped at the CPU budget: the last point of its curve
            last = v["curve"][-1]
            scores = f"{last['ppl']:.3f} (step {last['step']}, stopped) | {last['ratio']:.3f} | - | -"
        else:
            scores = "- | - | - | -"
        table.append(f"| {v['name']} | {v['cpu_min']:.1f} ({v['train_cpu_min']:.1f}) | {v['wall_min']:.1f} | "
                     f"{scores} | {passkey_cell(v.get('passkey'))} |")
    print("\n".join(table))
    payload = {"machine": f"shared: {os.cpu_count()} cores, load average {load[0]:.1f} at the start; "
                          "CPU times are process times", "recipe": args.recipe,
               "seq_len": original["stdlib"]["seq_len"],
               "heldout_tokens": args.heldout_tokens, "prose_source": str(PROSE_SOURCE),
               "original": {c: {"ppl": r["ppl"], "by_position": r["by_position"]} for c, r in original.items()},
               "passkey_original": passkey_original, "variants": variants, "table": table}

    def draw(path: Path, device: str) -> None:
        with figure(path) as (fig, axes):
            ax = axes[0][0]
            for v in variants:
                points = [(0.0, math.nan)] + [(p["train_cpu_min"], p["ratio"]) for p in v["curve"]]
                line, = ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=v["name"])
                if v["finished"]:
                    ax.scatter([v["train_cpu_min"]], [v["ratio_prose"]], marker="x", color=line.get_color())
            ax.axhline(1.3, color="grey", linestyle=":", linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel("training CPU-minutes (process time, evaluations excluded)")
            ax.set_ylabel("held-out perplexity / original's")
            ax.set_title(f"SmolLM2-135M -> LoLCATs, {args.recipe} recipe ({device}; x: prose corpus)", fontsize=9)
            ax.legend(fontsize=7)

    write_results(NAME, args, payload, draw)


if __name__ == "__main__":
    main()
