"""scripts/slurm/uptrain.sbatch run with bash, no SLURM: fake srun, scontrol, scancel and torchrun
(shell scripts in tmp_path, first on PATH) record their arguments and exit as told.

The fake srun runs its command once, as the one task of one node would; the fake torchrun plays the
trainer's side: it exits with a chosen code, or first sends the wrapper the signal SLURM would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SBATCH = Path(__file__).resolve().parent.parent / "scripts" / "slurm" / "uptrain.sbatch"
JOB_ID = "4242"
OVERRIDES = ["recipe=llama7b", "out=/scratch/runs/llama7b", "train.stages=[{name: full, tokens: 2000000, lr: 3e-4}]"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not sys.platform.startswith("linux"),
                                reason="needs bash and /proc")

FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.argv"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done   # the template passes options as --key=value
exec "$@"
"""

FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-01\\ngpu-node-02\\n'; fi
exit 0
"""

FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scancel.log"
"""

# FAKE_TORCHRUN="exit N": exit N. "usr1 N": SIGUSR1 to the node wrapper (as SLURM's --signal would),
# then exit N (real torchrun exits 1 whatever its workers' code). "term N": SIGTERM to the wrapper and
# to the batch shell (as scancel or preemption would), then exit N.
FAKE_TORCHRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/torchrun.argv"
read -r mode code <<< "$FAKE_TORCHRUN"
wrapper=$PPID
batch=$(awk '{print $4}' "/proc/$wrapper/stat")
case $mode in
  usr1) kill -USR1 "$wrapper"; sleep 0.2 ;;
  term) kill -TERM "$wrapper" "$batch"; sleep 0.2 ;;
esac
exit "$code"
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def run_sbatch(tmp_path: Path, torchrun: str, args: list[str] | None = None, **env_extra: str):
    """Run the template like sbatch would on a 2-node, 4-GPU allocation; returns (result, log dir)."""
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    _write(tmp_path / "bin" / "srun", FAKE_SRUN)
    _write(tmp_path / "bin" / "scontrol", FAKE_SCONTROL)
    _write(tmp_path / "bin" / "scancel", FAKE_SCANCEL)
    _write(tmp_path / "venv" / "bin" / "torchrun", FAKE_TORCHRUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUPRA_", "GPUS_", "RDZV_"))}
    env.update(PATH=f"{tmp_path / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", FAKE_LOG=str(log),
               FAKE_TORCHRUN=torchrun, SLURM_JOB_ID=JOB_ID, SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu-node-[01-02]", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="64",
               SLURM_SUBMIT_DIR=str(tmp_path), SUPRA_VENV=str(tmp_path / "venv"), **env_extra)
    result = subprocess.run(["bash", str(SBATCH), *(OVERRIDES if args is None else args)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=30)
    return result, log


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def requeued(log: Path) -> bool:
    return f"requeue {JOB_ID}" in lines(log / "scontrol.log")


def test_directives_ask_for_the_warning_signal_and_requeue():
    directives = re.findall(r"^#SBATCH\s+(\S+)", SBATCH.read_text(), flags=re.M)
    assert "--signal=USR1@120" in directives
    assert "--requeue" in directives
    assert "--ntasks-per-node=1" in directives
    assert "--open-mode=append" in directives  # a requeued job appends to the same log


def test_torchrun_gets_the_rendezvous_and_the_overrides(tmp_path):
    result, log = run_sbatch(tmp_path, "exit 0")
    assert result.returncode == 0, result.stderr
    argv = lines(log / "torchrun.argv")
    options = dict(zip(argv[:argv.index("-m")][::2], argv[:argv.index("-m")][1::2]))
    assert options == {"--nnodes": "2", "--nproc_per_node": "4", "--rdzv_backend": "c10d",
                       "--rdzv_endpoint": "gpu-node-01:29500", "--rdzv_id": JOB_ID, "--max_restarts": "0"}
    # every override arrives as one argument, spaces and braces included
    assert argv[argv.index("-m"):] == ["-m", "supra.cli", "uptrain", *OVERRIDES]
    srun = lines(log / "srun.argv")
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=64"} <= set(srun)
    assert not requeued(log)


def test_settings_come_from_the_environment(tmp_path):
    result, log = run_sbatch(tmp_path, "exit 0", GPUS_PER_NODE="2", RDZV_PORT="29650")
    assert result.returncode == 0, result.stderr
    argv = lines(log / "torchrun.argv")
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("--rdzv_endpoint") + 1] == "gpu-node-01:29650"


def test_exit_75_requeues_the_job(tmp_path):
    result, log = run_sbatch(tmp_path, "exit 75")
    assert requeued(log), result.stdout + result.stderr
    assert result.returncode == 0


@pytest.mark.parametrize("code", [1, 3, 137])
def test_other_exit_codes_are_propagated_without_requeue(tmp_path, code):
    result, log = run_sbatch(tmp_path, f"exit {code}")
    assert result.returncode == code
    assert not requeued(log)


def test_failure_after_the_time_limit_signal_counts_as_75(tmp_path):
    # real torchrun exits 1 when its workers exit 75; the node wrapper saw SIGUSR1, so it reports 75
    result, log = run_sbatch(tmp_path, "usr1 1")
    assert "reporting 75" in result.stderr
    assert requeued(log)
    assert result.returncode == 0


def test_job_ended_by_slurm_is_not_requeued(tmp_path):
    # SIGTERM to the batch shell: scancel, preemption or the time limit itself; SLURM decides
    result, log = run_sbatch(tmp_path, "term 1")
    assert result.returncode == 75, result.stderr
    assert not requeued(log)


def test_requeue_can_be_switched_off(tmp_path):
    result, log = run_sbatch(tmp_path, "exit 75", SUPRA_REQUEUE="0")
    assert result.returncode == 75
    assert not requeued(log)


def test_no_overrides_is_a_usage_error(tmp_path):
    result, log = run_sbatch(tmp_path, "exit 0", args=[])
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert not (log / "torchrun.argv").exists()
