"""supra-launch, the Hydra entry point: one run with the basic launcher, a two-seed sweep through
submitit_local (jobs as local processes, as submitit_slurm would run them on nodes), the CLI's one-line
errors, and what a job does under submitit when training stopped on a signal (requeue or not)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supra import launch
from supra.cli import main as cli_main
from supra.train.trainer import REQUEUE_EXIT_CODE, StopSignal

SCRIPT = Path(sys.executable).with_name("supra-launch")
LAUNCH = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "supra.launch"]
QUICK = ["command=uptrain", "recipe=tiny", "train.logger=none", "train.eval_baselines=false", "train.sample_tokens=0",
         "train.stages=[{name: full, tokens: 256, lr: 1e-3}]", "eval.max_tokens=256"]


def supra_launch(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_one_run_with_the_basic_launcher(tmp_path, capsys):
    run = tmp_path / "run"
    done = supra_launch(tmp_path, *QUICK, f"out={run}")
    assert done.returncode == 0, done.stderr
    assert (run / "model" / "config.json").exists()
    assert [p.name for p in (tmp_path / "outputs").iterdir()]  # Hydra's own dir, where it ran: no chdir
    # An error found only when the job runs (not by validation): the CLI's line and code too.
    again = supra_launch(tmp_path, *QUICK, f"out={run}", "seed=7")
    assert cli_main(["uptrain", *QUICK[1:], f"out={run}", "seed=7"]) == 2
    assert (again.returncode, again.stderr) == (2, capsys.readouterr().err)
    assert again.stderr.startswith("supra: error: ") and "holds a run with different settings" in again.stderr


def test_seed_sweep_through_submitit_local(tmp_path):
    done = supra_launch(tmp_path, "--multirun", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=2",
                        *QUICK, f"out={tmp_path}/s${{seed}}", "seed=0,1")
    assert done.returncode == 0, done.stderr
    for seed in (0, 1):
        assert (tmp_path / f"s{seed}" / "model" / "config.json").exists()
        assert f"seed: {seed}\n" in (tmp_path / f"s{seed}" / "uptrain.config.yaml").read_text()
    assert list((tmp_path / "outputs" / "multirun").glob("*/*/.submitit"))


def test_a_mistake_gets_the_cli_error_before_anything_runs(tmp_path, capsys):
    assert cli_main(["uptrain", "recipe=tiny", "train.bogus=1"]) == 2
    expected = capsys.readouterr().err
    done = supra_launch(tmp_path, "command=uptrain", "recipe=tiny", "train.bogus=1")
    assert (done.returncode, done.stderr) == (2, expected)
    assert expected.startswith("supra: error: unknown key 'train.bogus'") and expected.count("\n") == 1
    swept = supra_launch(tmp_path, "--multirun", "hydra/launcher=submitit_local", "recipe=tiny", "seed=0,x")
    assert swept.returncode == 2 and swept.stderr.startswith("supra: error: bad value for seed")
    assert not (tmp_path / "outputs").exists()  # nothing written, nothing submitted


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$FAKE_SLURM_DIR/job.sbatch"
echo "Submitted batch job 4242"
"""
FAKE_SACCT = """#!/bin/sh
echo 'JobID|State|NodeList'
"""


def test_the_readme_slurm_command_submits_a_requeueable_job(tmp_path):
    # A fake sbatch (and srun, which submitit looks for) take the job; what matters is what submitit
    # gives them: the sbatch file and the pickled call that every task of the job runs.
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "sacct": FAKE_SACCT, "srun": "#!/bin/sh\n"}.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path))
    parent = subprocess.Popen(
        [*LAUNCH, "--multirun", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=4",
         "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8", "hydra.launcher.timeout_min=1440",
         "command=uptrain", "recipe=llama7b", f"out={tmp_path}/llama7b"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # supra-launch waits for the job's results, which never come: stop it once the job is submitted
        for _ in range(600):
            submitted = list(tmp_path.glob("outputs/multirun/*/*/.submitit/4242/4242_submitted.pkl"))
            if submitted or parent.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        parent.kill()
        output = parent.communicate()[0]
    assert submitted, output
    sbatch = (tmp_path / "job.sbatch").read_text().splitlines()
    for line in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=1440", "--signal=USR2@120",
                 "--requeue", "--job-name=supra-uptrain"]:
        assert f"#SBATCH {line}" in sbatch
    from submitit.core.utils import DelayedSubmission

    job = DelayedSubmission.load(submitted[0])
    assert job._timeout_countdown == int(launch.SLURM_DEFAULTS["hydra.launcher.max_num_timeout"])
    assert hasattr(job.function, "checkpoint")  # the launcher: submitit requeues through it
    assert launch.supra_overrides(job.args[0]) == ["recipe=llama7b", f"out={tmp_path}/llama7b"]


def test_overrides_reach_supra_as_typed():
    flags, hydra_overrides, ours = launch._split(
        ["--multirun", "--cfg", "job", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=4", "recipe=tiny",
         "seed=0,1", "out=runs/s${seed}", "+train.compile=true"])
    assert flags == ["--multirun", "--cfg", "job"]
    assert hydra_overrides == ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=4"]
    assert ours == ["recipe=tiny", "seed=0,1", "out=runs/s${seed}", "+train.compile=true"]
    assert launch.supra_overrides(["++command=eval", "++recipe=tiny", "++out=runs/s$\\{seed\\}", "+seed=1"]) == [
        "recipe=tiny", "out=runs/s$\\{seed\\}", "seed=1"]


# ---- a job under submitit, after `supra uptrain` stopped on a signal -------------------------------


class FakeJobEnvironment:
    USR_SIG = "USR2"
    num_tasks = 1

    class paths:
        stderr = Path("job_0_log.err")


@pytest.fixture
def submitit_job(monkeypatch):
    """submitit's environment as a job sees it, with a stand-in for submitit's SIGUSR2 handler."""
    import submitit

    monkeypatch.setattr(submitit, "JobEnvironment", FakeJobEnvironment)
    saved = {sig: signal.getsignal(sig) for sig in (*StopSignal.SIGNALS, signal.SIGINT)}  # StopSignal takes Ctrl-C too
    requeued = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))
    yield requeued
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def trainer_stopped_by(signum: int | None, code: int = REQUEUE_EXIT_CODE):
    def fake_cli_main(argv):
        stop = StopSignal()  # what train() leaves installed
        if signum is not None:
            os.kill(os.getpid(), signum)
            assert stop.received == signum
        return code
    return fake_cli_main


def test_signal_stop_hands_over_to_submitits_requeue(submitit_job):
    # The trainer takes SIGUSR2 from submitit's handler, checkpoints, returns 75; then the job calls
    # submitit's handler itself (rank 0: launcher.checkpoint(), scontrol requeue, exit).
    code = launch._submitit_task("uptrain", ["recipe=tiny"], trainer_stopped_by(signal.SIGUSR2))
    assert code == REQUEUE_EXIT_CODE and submitit_job == [signal.SIGUSR2]


def test_sigterm_stop_is_not_requeued(submitit_job):
    with pytest.raises(SystemExit) as stopped:
        launch._submitit_task("uptrain", [], trainer_stopped_by(signal.SIGTERM))
    assert stopped.value.code == REQUEUE_EXIT_CODE and submitit_job == []


def test_a_failed_command_fails_the_job(submitit_job):
    assert launch._submitit_task("uptrain", [], trainer_stopped_by(None, code=0)) == 0
    with pytest.raises(launch.SupraJobError, match="exited with code 2"):
        launch._submitit_task("uptrain", [], trainer_stopped_by(None, code=2))
    assert submitit_job == []
