"""The GPU campaign rehearsed on CPU: `scripts/gpu_campaign.sh rehearse` runs every part of `all` (the
kernel tests' collection, bench_kernels, bench_uptrain, bench_decode, quality_per_token) at its --dry-run
size without CUDA, so a GPU loan spends its time measuring, not debugging. Every part must write its
result file: table, JSON with provenance, PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CAMPAIGN = Path(__file__).resolve().parent.parent / "scripts" / "gpu_campaign.sh"


def test_campaign_rehearsal(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(CAMPAIGN), "rehearse"], capture_output=True, text=True, env=env, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fla:" in done.stdout  # says whether fla is compared or skipped

    (kernels_path,) = tmp_path.glob("bench_kernels_*.json")
    kernels = json.loads(kernels_path.read_text())
    assert kernels["rows"] and all("ms" in row for row in kernels["rows"])
    # the cost model beside every timing: the H100 roofline time and how far the measurement is from it
    assert all(row["h100_roofline_ms"] > 0 and row["fraction_of_h100_roofline"] > 0 for row in kernels["rows"])
    assert all(row["vs_fp32_ref"] < 2e-2 for row in kernels["correctness"])
    delta = {row["kernel"]: row for row in kernels["delta_rule"]}  # bf16 Triton, float32 torch form
    assert all(delta[name]["o_vs_fp64_ref"] < tol and delta[name]["fwd_bwd_h100_roofline_ms"] > 0
               for name, tol in (("supra", 3e-2), ("torch-form", 1e-5)))
    assert kernels_path.with_suffix(".png").stat().st_size > 0

    for script, key, count in (("bench_uptrain", "results", 2), ("bench_decode", "runs", 1)):
        record = json.loads((tmp_path / f"{script}.json").read_text())
        assert record["benchmark"] == script and record["git_sha"] and record["command"] and record["date"]
        assert len(record[key]) == count and (tmp_path / f"{script}.png").stat().st_size > 0

    methods = json.loads((tmp_path / "quality_per_token.json").read_text())["methods"]
    assert set(methods) == {"lolcats", "supra"}
    for result in methods.values():
        assert result["exit_code"] == 0 and result["curve"], result
        assert {"ppl_original", "ppl_converted", "ppl_uptrained"} <= set(result["summary"])
