"""`supra-launch`: the supra commands as a Hydra app, so that Hydra's launchers and sweepers run them.

    supra-launch command=uptrain recipe=tiny out=runs/tiny                  # one run, here
    supra-launch --multirun recipe=tiny seed=0,1 'out=runs/tiny-s${seed}'    # a sweep, one run after another
    supra-launch --multirun hydra/launcher=submitit_slurm hydra.launcher.nodes=4 \\
        hydra.launcher.gpus_per_node=8 hydra.launcher.tasks_per_node=8 hydra.launcher.timeout_min=1440 \\
        command=uptrain recipe=llama7b out=/scratch/runs/llama7b               # on SLURM, through submitit

`command=` (default uptrain) names the command. Every other key=value that is not Hydra's own
(`hydra.*`, `hydra/...`) goes to that command as it is, through `supra.cli.main`: the same recipe
merge, validation, one-line errors and exit codes as `supra <command> key=value ...`.

How supra's overrides get through Hydra: Hydra composes its config first and refuses keys that config
lacks, while the primary config here holds only `command`. So every plain `key=value` of supra's is
given to Hydra as `++key=value` (set, adding the key if missing); each job then takes its own override
list (`hydra.overrides.task`: one point of the sweep), drops `command=` and the `++`, and passes the
rest to supra.cli.main. Sweeps (`seed=0,1`) and interpolations (`out=runs/s${seed}`, resolved against
supra's config) work as in any Hydra app. Before Hydra starts, and so before anything is submitted,
every job's overrides are checked with supra.config.load_config: a mistake ends with the CLI's one
line and exit code 2, and nothing is written.

Hydra's own files (composed config, submitit's logs) go under outputs/ (`hydra.run.dir`,
`hydra.sweep.dir`), and Hydra does not change directory (`hydra.job.chdir=false`): a relative `out=`
means what it means to `supra`. Under submitit the sweep dir must be on storage the nodes see.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "supra_launch"
DEFAULT_COMMAND = "uptrain"
# Added to hydra/launcher=submitit_slurm unless given. hydra-submitit-launcher defaults to
# max_num_timeout=0: the first time limit would end the job instead of requeueing it, while supra's runs
# resume. `--requeue` (as in scripts/slurm/uptrain.sbatch) lets `scontrol requeue` work where the
# cluster's JobRequeue=0.
SLURM_DEFAULTS = {"hydra.launcher.max_num_timeout": "20", "hydra.launcher.additional_parameters.requeue": "true"}
MAX_JOBS_CHECKED = 256  # sweep points validated before launching

# A job logs as `supra` does (supra.cli.main's logging.basicConfig): plain lines on stderr, SUPRA_LOG's level.
ConfigStore.instance().store(group="hydra/job_logging", name="supra", node={
    "version": 1,
    "formatters": {"plain": {"format": "%(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "root": {"level": "${oc.env:SUPRA_LOG,INFO}", "handlers": ["stderr"]},
    "disable_existing_loggers": False,
})
ConfigStore.instance().store(name=CONFIG_NAME, node={
    "defaults": ["_self_", {"override hydra/job_logging": "supra"}],
    "command": DEFAULT_COMMAND,
    "hydra": {
        "job": {"name": "supra-${command}", "chdir": False},
        "run": {"dir": "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"},
        "sweep": {"dir": "outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}", "subdir": "${hydra.job.num}"},
        "help": {"app_name": "supra-launch", "template": (
            "supra-launch [--multirun] [hydra/launcher=NAME hydra.launcher.KEY=VALUE ...] "
            "command=COMMAND [key=value ...]\n\n"
            "Runs `supra COMMAND key=value ...` (default command: uptrain) as a Hydra app, so that Hydra's "
            "launchers\n(submitit_slurm, submitit_local, the basic one) and sweeps (seed=0,1) run it. "
            "`supra COMMAND --help`\nlists the keys.\n\n$FLAGS_HELP")},
    },
})

# Hydra's flags that take a value in the next argument, and those with which Hydra runs nothing.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--info", "-i", "--shell-completion", "-sc"}
_NO_RUN_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                 "--shell-completion", "-sc"}

_codes: list[int] = []  # exit codes of the jobs run in this process (the basic launcher)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags, hydra_overrides, ours = _split(argv)
    if not _NO_RUN_FLAGS.intersection(flags):
        code = _preflight(ours, multirun=bool({"--multirun", "-m"}.intersection(flags)))
        if code is not None:
            return code
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if "hydra/launcher=submitit_slurm" in hydra_overrides and missing:
            from .cli import fail

            return fail(f"hydra/launcher=submitit_slurm submits jobs to SLURM, and this machine has no "
                        f"{' or '.join(missing)} (not a SLURM login node); run `supra <command> key=value ...` "
                        "here, or hydra/launcher=submitit_local to run the jobs as local processes")
    hydra_argv = [f"++{a}" if a in ours and "=" in a and a[0] not in "+~" else a for a in argv]
    if "hydra/launcher=submitit_slurm" in hydra_overrides:
        given = {a.lstrip("+").split("=", 1)[0] for a in hydra_overrides}
        hydra_argv += [f"++{key}={value}" for key, value in SLURM_DEFAULTS.items() if key not in given]
    _codes.clear()
    saved, sys.argv = sys.argv, [sys.argv[0], *hydra_argv]
    try:
        _hydra_main()
    finally:
        sys.argv = saved
    return next((code for code in _codes if code), 0)


@hydra.main(version_base="1.3", config_path=None, config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> int:
    return task(cfg)


def task(cfg: DictConfig) -> int:
    """One job: `supra <command> <its overrides>`, in this process or in a submitit job."""
    from hydra.core.hydra_config import HydraConfig

    from .cli import main as cli_main

    command = str(cfg.get("command") or DEFAULT_COMMAND)
    overrides = supra_overrides(HydraConfig.get().overrides.task)
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        code = cli_main([command, *overrides])
        _codes.append(code)
        return code
    return _submitit_task(command, overrides, cli_main)


def supra_overrides(task_overrides: Sequence[str]) -> list[str]:
    """A job's overrides as `supra` takes them: without `command=` and the `+`/`++` prefixes."""
    result = []
    for line in task_overrides:
        plain = line[2:] if line.startswith("++") else line[1:] if line.startswith("+") else line
        if plain.split("=", 1)[0] != "command":
            result.append(plain)
    return result


# ---- under submitit ------------------------------------------------------------------------------
# Time limits and preemption, as hydra-submitit-launcher 1.2 and submitit 1.5 do them:
# - submitit's sbatch file asks SLURM for `--signal=USR2@<hydra.launcher.signal_delay_s>` (120 s),
#   sent to every task of the job step; on preemption SLURM sends it as well where the cluster sets
#   SlurmctldParameters=preempt_send_user_signal (otherwise preemption sends SIGTERM). submitit_local
#   sends it signal_delay_s (30 s) before timeout_min.
# - In each task, submitit's process_job() ignores SIGTERM and sets SIGUSR2's handler to
#   SignalHandler.checkpoint_and_try_requeue. On the signal, the task of global rank 0 calls the
#   launcher's checkpoint() (BaseSubmititLauncher.checkpoint returns a DelayedSubmission of the same
#   call: the same job, the same overrides), pickles it, runs `scontrol requeue` and sys.exit()s; the
#   other ranks do nothing. Left to itself that would happen in the middle of a training step: rank 0
#   gone without a checkpoint, the others stuck in their next collective.
# - So the trainer takes SIGUSR2 as well (supra.train.trainer.StopSignal, installed when training
#   starts, replaces submitit's handler): every rank finishes its step, they write one checkpoint
#   together and `supra uptrain` returns REQUEUE_EXIT_CODE (75). Only then does this task call
#   submitit's handler, as if the signal came now: rank 0 requeues the job through the launcher's
#   checkpoint(), and the requeued job, the same command, resumes from that checkpoint; the other
#   ranks return. submitit keeps its accounting: a requeue near the time limit counts against
#   max_num_timeout (supra-launch raises the plugin's 0, SLURM_DEFAULTS), preemptions do not;
#   past the limit submitit ends the job with UncompletedJobError ("timed-out too many times").
# - A signal before training starts (model loading) still finds submitit's handler: it requeues at
#   once, and nothing is lost.
# - SIGTERM (scancel; preemption without the user signal) makes the trainer checkpoint and return 75
#   too, but it is no reason to requeue: a cancelled job stays cancelled, and where PreemptMode=REQUEUE
#   SLURM requeues a preempted job itself (as scripts/slurm/uptrain.sbatch does it). The task then
#   exits 75 without writing a result, so SLURM's record of the job stands.


class SupraJobError(RuntimeError):
    """A submitit job whose command failed; its one-line error is in the job's stderr log."""


def _submitit_task(command: str, overrides: list[str], cli_main: Any) -> int:
    import submitit

    from .train.trainer import REQUEUE_EXIT_CODE

    env = submitit.JobEnvironment()
    usr_signal = getattr(signal, "SIG" + env.USR_SIG)  # SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
    requeue = signal.getsignal(usr_signal)  # submitit's checkpoint_and_try_requeue, before the trainer's
    if env.num_tasks > 1:
        export_torch_distributed_env()
    code = cli_main([command, *overrides])
    if code == 0:
        return 0
    if code != REQUEUE_EXIT_CODE:
        raise SupraJobError(f"supra {command} exited with code {code}; its error is at the end of "
                            f"{env.paths.stderr}")
    stopped_by = _stop_signal()
    if stopped_by == signal.SIGTERM:
        log.warning("supra-launch: stopped by SIGTERM with a checkpoint written; not requeued (rerun the "
                    "same command to resume)")
        sys.exit(code)
    name = signal.Signals(stopped_by).name if stopped_by else f"SIG{env.USR_SIG}"
    log.warning(f"supra-launch: checkpoint written after {name}; submitit requeues the job")
    if callable(requeue):
        requeue(usr_signal, None)  # rank 0: requeue and exit here (or UncompletedJobError); others: return
    return code


def export_torch_distributed_env() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from SLURM's (or submitit_local's)
    variables, for supra.train.parallel.init_world: one task per GPU, rendezvous on the first node
    at a port derived from the job id (or MASTER_PORT, when set)."""
    from submitit.helpers import TorchDistributedEnvironment

    # CUDA_VISIBLE_DEVICES stays as SLURM set it: init_world takes cuda:LOCAL_RANK among the GPUs the
    # task sees, which are all the node's unless SLURM binds GPUs to tasks (gpus_per_task, --gpu-bind).
    dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1 and dist_env.local_world_size > 1:
        os.environ["LOCAL_RANK"] = "0"  # bound: this task's one GPU is its cuda:0 (LOCAL_RANK picks only that)
    log.info(f"supra-launch: rank {dist_env.rank}/{dist_env.world_size} (local {dist_env.local_rank}), "
             f"rendezvous {dist_env.master_addr}:{dist_env.master_port}")


def _stop_signal() -> int | None:
    """The signal that stopped training (None when training ran to its end, or did not run here)."""
    from .train.trainer import StopSignal

    return StopSignal.latest.received if StopSignal.latest is not None else None


# ---- before Hydra --------------------------------------------------------------------------------


def _split(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(Hydra's flags and their values, Hydra's overrides, supra's overrides), in order."""
    flags, hydra_overrides, ours = [], [], []
    expects_value = False
    for arg in argv:
        if arg.startswith("-"):
            flags.append(arg)
            expects_value = arg in _VALUE_FLAGS
        elif expects_value and "=" not in arg:
            flags.append(arg)
            expects_value = False
        else:
            expects_value = False
            key = arg.split("=", 1)[0].lstrip("+~")
            (hydra_overrides if key == "hydra" or key.startswith(("hydra.", "hydra/")) else ours).append(arg)
    return flags, hydra_overrides, ours


def _preflight(ours: list[str], multirun: bool) -> int | None:
    """Every job's overrides through supra's validation; the CLI's error and exit code on a mistake."""
    from .cli import COMMANDS, fail
    from .config import ConfigError, load_config

    for arg in ours:
        if "=" not in arg and arg in COMMANDS:
            return fail(f"name the command as command={arg} (supra-launch [--multirun] command={arg} key=value ...)")
    try:
        jobs = _jobs(ours, multirun)
    except ConfigError as err:
        return fail(str(err))
    for job in jobs:
        commands = [a.split("=", 1)[1] for a in job if a.split("=", 1)[0].lstrip("+") == "command"]
        command = commands[-1] if commands else DEFAULT_COMMAND
        if command not in COMMANDS:
            return fail(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
        try:
            load_config(supra_overrides(job))
        except ConfigError as err:
            return fail(str(err))
        except Exception:  # e.g. an interpolation only a running Hydra job resolves: the job checks again
            return None
    return None


def _jobs(ours: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of the jobs a sweep makes (at most MAX_JOBS_CHECKED of them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import ConfigError, load_config

    try:
        parsed = OverridesParser.create().parse_overrides(ours)
    except Exception:
        load_config(ours)  # raises the CLI's ConfigError for the same grammar error
        raise
    choices = []
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif not multirun:
            raise ConfigError(f"override {override.input_line!r} is a sweep: add --multirun")
        elif override.is_discrete_sweep():
            choices.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()])
        else:
            raise ConfigError(f"override {override.input_line!r}: only choice and range sweeps are supported")
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_JOBS_CHECKED)]


if __name__ == "__main__":
    from supra.launch import main as _main  # the task function pickled by reference, not from __main__

    sys.exit(_main())
