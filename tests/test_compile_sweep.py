"""Every Triton kernel launch the recipes make fits an A100 (sm_80) and an H100 (sm_90), checked on CPU:
scripts/compile_sweep.py captures the launches of every method's layer (head dim 64 and 128, bf16 and
float32 models) and compiles each for both targets through Triton's own passes; it fails when one does
not compile or needs more shared memory per block than the GPU has. Spills (ptxas) are the script's
--ptxas run, too slow for the suite: benchmarks/results/compile/kernels.json holds its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_sweep.py"
KERNELS = {  # every kernel of the three training modules and the decode step
    "triton_chunk": {"_states_kernel", "output_kernel", "_dstates_kernel", "_dv_kernel", "dqdk_kernel"},
    "triton_hybrid": {"_states_kernel", "_forward_kernel", "_dstates_kernel", "_dq_kernel", "_dsinks_kernel",
                      "_dkv_kernel"},
    "triton_delta_rule": {"_wy_kernel", "_delta_states_kernel", "_delta_dstates_kernel", "_wy_backward_kernel"},
    "triton_decode": {"_step_kernel"},
}


def test_every_launch_fits_a100_and_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "kernels.json").read_text())
    rows = record["results"]
    assert {r["target"] for r in rows} == {80, 90} and record["failing"] == 0
    assert {r["kernel"] for r in rows} == {f"{m}.{k}" for m, names in KERNELS.items() for k in names}
    limits = record["limits_shared_bytes"]
    over = {(r["kernel"], r["target"]) for r in rows if r["shared_bytes"] > limits[str(r["target"])]}
    assert over == {(x["kernel"], x["target"]) for x in record["shared_exceptions"]}  # each with its reason
    # every launch of a bf16 model and of a float32 one, at both head dims, was compiled
    assert any("bfloat16" in r["launch"] for r in rows) and any("BD=128" in r["launch"] for r in rows)
    check = record["shared_check"]  # the cheap pass agrees with the whole pipeline, ptxas included
    assert check["agrees"] and check["full_pipeline"]["registers"] > 0
