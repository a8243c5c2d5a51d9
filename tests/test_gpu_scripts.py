"""The GPU campaign's measurement scripts run end to end on CPU (--dry-run: the tiny recipe), so a
GPU session spends its time measuring, not debugging: table, JSON with provenance, PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("script, key, count", [("bench_uptrain", "results", 2), ("bench_decode", "runs", 1)])
def test_gpu_benchmark_dry_run(tmp_path, script, key, count):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / f"{script}.json").read_text())
    assert record["benchmark"] == script and record["git_sha"] and record["command"] and record["date"]
    assert len(record[key]) == count and (tmp_path / f"{script}.png").stat().st_size > 0
    assert "wrote" in done.stdout


def test_quality_per_token_dry_run(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPTS / "quality_per_token.py"), "--dry-run", "--out",
                           str(tmp_path / "out"), "--work", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    methods = json.loads((tmp_path / "out" / "quality_per_token.json").read_text())["methods"]
    assert set(methods) == {"lolcats", "supra"}
    for result in methods.values():
        assert result["exit_code"] == 0 and result["curve"], result
        assert {"ppl_original", "ppl_converted", "ppl_uptrained"} <= set(result["summary"])
