"""`supra uptrain recipe=NAME`: convert, then run the recipe's stages; rerun the command to resume.

The run directory (`out=`, default runs/<recipe>) holds the config snapshot, checkpoints/,
metrics.jsonl, eval.json and, when every stage is done, model/ (a converted HF directory with LoRA
merged, which `supra eval` and `supra export` accept as the run itself).

With `softmax_layers=auto:K` every layer is converted and trained, and the K layers to keep as
softmax are measured on the trained student (softmax_select.restore_softmax_layers): the stages
save it as student/, the measurement turns its K layers back into softmax attention in model/ and
writes softmax_layers.json. A rerun after a stop during the measurement starts again from student/.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torch import nn

from ..build import BuildPlan, build_model, check_convertible, check_softmax_k, lora_step, student_plan, with_cache
from ..config import ConfigError, RecipeConfig, check_batch_tokens, recipe_label, run_dir
from ..data import iter_documents
from ..layers.linearize import recorded_spec
from ..layers.specs import parse_auto
from ..layers.switches import window_alone
from ..models import (
    SourceError,
    count_parameters,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_source,
    save_model,
    source_config,
    source_spec,
)
from ..softmax_select import restore_softmax_layers
from ..train.checkpoint import checkpoint_root
from ..train.parallel import World, init_world, parallelize, shutdown_world
from ..train.plan import memory_per_gpu_gb, plan_stages, trainable_parameters
from ..train.stages import STAGE_KINDS, fold_lora
from ..train.trainer import train
from .common import (
    check_memory,
    console,
    load_model_and_tokenizer,
    perplexity_forward,
    read_json_record,
    read_yaml_record,
    update_json,
    write_softmax_choice,
)
from .settings import build_plan, calibration, heldout_perplexity, train_config, train_settings

# Keys that may differ when a run is resumed: they change how it is watched, not what it computes.
# `out` names the run folder, which is what stays the same (however it is spelled, or after a move);
# `overwrite` is about replacing output directories, and a run is resumed, not replaced.
RESUMABLE_CHANGES = ("train.logger", "train.dry_run", "train.eval_baselines", "train.sample_tokens", "device",
                     "train.checkpoint_every", "train.keep_checkpoints", "eval", "out", "overwrite", "step")


def run(cfg: DictConfig) -> int:
    if cfg.train.dry_run:
        return dry_run(cfg)
    check_batch_tokens(cfg)
    run = run_dir(cfg, f"runs/{recipe_label(cfg) or 'uptrain'}")
    fresh = _check_same_run(cfg, run)
    read_json_record(run / "eval.json")  # damaged: stop now, not after training
    _check_run_folder(run)
    # Mistakes in device=, model=, tokenizer= and data= are reported before anything is written.
    resolve_device(cfg.device)
    for source in {cfg.model, cfg.tokenizer or cfg.model} - {"random"}:
        resolve_source(source)
    check_convertible(source_spec(cfg.model), build_plan(cfg))
    config = source_config(cfg.model, cfg.architecture and dict(cfg.architecture))
    check_memory(config, resolve_device(cfg.device),
                 [("training", cfg.train.micro_batch_size, cfg.seq_len, "train.micro_batch_size or seq_len", True),
                  *(perplexity_forward(cfg, n) for n in report_lengths(cfg, config))])
    iter_documents(cfg.data)
    world = init_world(cfg.device)
    try:
        with _holding(run, world.is_main):
            if fresh and world.is_main:
                _forget_untrained_attempt(run)
            return _uptrain(cfg, run, world)
    finally:
        shutdown_world()


@contextmanager
def _holding(run: Path, main: bool) -> Iterator[None]:
    """One uptrain at a time in a run folder: a second command on a live run (another terminal, a job
    started twice) would write its records and checkpoints over the first's. The lock is the OS's
    (flock), so it ends with its process, kill -9 included; the main rank holds it for all."""
    if not main:
        yield
        return
    run.mkdir(parents=True, exist_ok=True)
    with open(run / RUN_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(f"{run} is in use by a supra uptrain that is still running ({holder}); wait for it "
                              "to finish or stop it, then rerun to resume, or choose another out=") from None
        except OSError as err:  # a filesystem without locks (Lustre mounted noflock, some NFS): run unguarded
            console.print(f"[yellow]{run}: this filesystem takes no lock ({err.strerror}); start no second uptrain "
                          "on this run while this one runs[/yellow]")
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        yield


def _uptrain(cfg: DictConfig, run: Path, world: World) -> int:
    final = run / "model"
    if (final / "config.json").exists():
        console.print(f"{run}: every stage is done; the model is in {final}")
        return 0
    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "uptrain.config.yaml").write_text(OmegaConf.to_yaml(cfg))
    student, restore = run / "student", parse_auto(cfg.softmax_layers)
    if restore is not None and (student / "config.json").exists():  # stopped while measuring: measure again
        return _restore_and_report(cfg, run, student, restore, load_tokenizer(cfg.tokenizer or cfg.model), world)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(_on(cfg, world))
    evaluate = cfg.train.eval_baselines and world.is_main
    lengths = report_lengths(cfg, model.config)
    if evaluate:
        _heldout_ppl(cfg, run, "original", model, tokenizer, lengths)
    finished = build_plan(cfg, factorize=True, lora=True).for_source(recorded_spec(model))
    plan = student_plan(finished)
    # Built without its adapters first: the converted model's perplexity and size are measured
    # before them; the LoRA step then runs alone (B = 0: the adapters change nothing yet).
    model, spec = build_model(model, replace(plan, lora=None), calibration(cfg, tokenizer))
    if restore is not None:  # a K that cannot be met stops the run now, not after training
        check_softmax_k(model, restore)
    if evaluate:
        _heldout_ppl(cfg, run, "converted", model, tokenizer, lengths[:1])
    counts = count_parameters(model)
    model = lora_step(model, plan, None)
    model = parallelize(model, world, cfg.train.param_dtype, cfg.train.activation_checkpointing, cfg.train.compile)
    model.train()
    code = train(train_settings(cfg), run, model, tokenizer, heldout_perplexity(cfg, tokenizer), world,
                 counts["total"])
    if code:
        return code
    rebuild = plan.resolved(spec)
    if restore is not None:
        _save_final(cfg, model, rebuild, finished, tokenizer, student, world)
        return _restore_and_report(cfg, run, student, restore, tokenizer, world)
    _save_final(cfg, model, rebuild, finished, tokenizer, final, world)
    if world.is_main:
        trained = load_model(str(final), cfg.dtype, device=world.device).eval()
        _score_uptrained(cfg, run, trained, tokenizer)
        _report(cfg, run, trained, tokenizer)
    return 0


def _on(cfg: DictConfig, world: World) -> DictConfig:
    """The config with this rank's own device (torchrun gives each process one GPU). A block-wise
    attention transfer loads the model into CPU memory and moves one block at a time to the GPU."""
    local = cfg.copy()
    blockwise = any(stage.block_layers for stage in cfg.train.stages)
    local.device = "cpu" if blockwise else str(world.device)
    return local


DEFAULT_SETTINGS = OmegaConf.to_container(OmegaConf.structured(RecipeConfig))
# What an earlier attempt writes before its first trained step: records of that attempt only.
UNTRAINED_RECORDS = ("uptrain.config.yaml", "eval.json", "metrics.jsonl")
RUN_LOCK = ".uptrain.lock"  # held by the process running the folder's uptrain (_holding)


def _check_same_run(cfg: DictConfig, run: Path) -> bool:
    """Rerunning resumes; a different recipe in the same directory would mix two runs. An attempt
    that stopped before its first checkpoint (a mistake found after the snapshot was written) has
    nothing to protect: True when the run starts afresh and such records are to be replaced."""
    snapshot = run / "uptrain.config.yaml"
    if not snapshot.exists():
        return False
    before, now = _with_new_settings(read_yaml_record(snapshot), DEFAULT_SETTINGS), OmegaConf.to_container(cfg)
    changed = [k for k in _diff(before, now) if not k.startswith(RESUMABLE_CHANGES)]
    if not changed:
        return False
    if not has_trained(run):
        return True
    raise ConfigError(f"{run} holds a run with different settings ({', '.join(changed[:5])}); rerun with the "
                      "same settings to resume, or choose another out=")


def has_trained(run: Path) -> bool:
    """Whether a run directory holds anything training made: a checkpoint, finished blocks, a model."""
    return (any(checkpoint_root(run).glob("step-*")) or (run / "blocks").exists()
            or (run / "student").exists() or (run / "model").exists())


def _check_run_folder(run: Path) -> None:
    """A run goes into a new or empty folder, or resumes one; a model or any other folder stays untouched."""
    if run.exists() and not run.is_dir():
        raise ConfigError(f"output path {run} is a file, not a directory; choose another out=")
    if not run.is_dir() or (run / "uptrain.config.yaml").exists() or all(p.name == RUN_LOCK for p in run.iterdir()):
        return
    what = ("a model directory (it holds config.json)" if (run / "config.json").exists()
            else "not a supra run (it has no uptrain.config.yaml)")
    raise ConfigError(f"out={run} is {what}; uptrain writes a run into a new or empty directory, or resumes one "
                      "there: choose another out=")


def _forget_untrained_attempt(run: Path) -> None:
    """The records of an earlier attempt with other settings that never trained a step (its baseline
    perplexities were of another model): the corrected command starts the run afresh."""
    for name in UNTRAINED_RECORDS:
        (run / name).unlink(missing_ok=True)


def _with_new_settings(snapshot: object, defaults: object) -> object:
    """A snapshot that an older supra wrote, with the settings added since at their `defaults`: the
    same command, rerun after an upgrade, resumes its run instead of reading as other settings."""
    if isinstance(snapshot, list) and isinstance(defaults, list) and defaults:  # train.stages: each a stage
        return [_with_new_settings(item, defaults[0]) for item in snapshot]
    if not (isinstance(snapshot, dict) and isinstance(defaults, dict)):
        return snapshot
    return {**{k: v for k, v in defaults.items() if k not in snapshot},
            **{k: _with_new_settings(v, defaults.get(k, {})) for k, v in snapshot.items()}}


def _diff(a: object, b: object, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def report_lengths(cfg: DictConfig, config: object) -> list[int]:
    """The lengths uptrain's report scores: the training length, and seq_len x eval.long_factor up
    to the positions the original was trained on (past them its own perplexity means little)."""
    longest = cfg.seq_len * cfg.eval.long_factor
    trained = getattr(config, "max_position_embeddings", None)
    if trained:
        longest = min(longest, trained)
    return [cfg.seq_len] + ([longest] if longest > cfg.seq_len else [])


def ppl_key(cfg: DictConfig, which: str, seq_len: int) -> str:
    """eval.json's key of one held-out perplexity: ppl_<which> at the training length, ppl_<which>_<seq_len> past it."""
    return f"ppl_{which}" if seq_len == cfg.seq_len else f"ppl_{which}_{seq_len}"


def _heldout_ppl(cfg: DictConfig, run: Path, which: str, model: nn.Module, tokenizer, lengths: list[int]) -> None:
    """Held-out perplexity once per run, model and length (a resumed run does not redo the baselines)."""
    path = run / "eval.json"
    score = heldout_perplexity(cfg, tokenizer)
    for seq_len in lengths:
        key = ppl_key(cfg, which, seq_len)
        if key in read_json_record(path):
            continue
        result = score(model, seq_len)
        update_json(path, {key: result})
        console.print(f"held-out perplexity, {which.replace('_', ' ')} model at {seq_len:,} tokens: "
                      f"{result['ppl']:.3f} ({result['tokens']:,} tokens)")


def _score_uptrained(cfg: DictConfig, run: Path, model: nn.Module, tokenizer) -> None:
    """The trained model at the report's lengths, and its softmax window alone (state switched off)
    where it has one: what the state adds over the window is what the conversion is for."""
    lengths = report_lengths(cfg, model.config)
    _heldout_ppl(cfg, run, "uptrained", model, tokenizer, lengths)
    with window_alone(model) as switched:
        if switched:
            _heldout_ppl(cfg, run, "window_alone", model, tokenizer, lengths)


def _restore_and_report(cfg: DictConfig, run: Path, student: Path, k: int, tokenizer, world: World) -> int:
    """softmax_layers=auto:K after the stages: the trained student's K layers whose restoration
    lowers its KL to its teacher most become softmax attention again (measured on the calibration
    text, on the main rank), saved as the run's model."""
    if world.is_main:
        model = load_model(str(student), cfg.dtype, device=world.device).eval()
        try:
            choice = restore_softmax_layers(model, k, calibration(cfg, tokenizer)(), console.print)
        except ValueError as err:  # K larger than the number of converted layers
            raise ConfigError(str(err)) from None
        write_softmax_choice(run, cfg, choice)
        save_model(model, tokenizer, run / "model", overwrite=False)
        _score_uptrained(cfg, run, model, tokenizer)
        _report(cfg, run, model, tokenizer)
    if world.distributed:
        torch.distributed.barrier()
    return 0


def _save_final(cfg: DictConfig, model: nn.Module, rebuild: BuildPlan, finished: BuildPlan, tokenizer, final: Path,
                world: World) -> None:
    """LoRA merged, float weights, the `finished` plan's sparse cache, one HF directory. Under FSDP the
    full state is gathered to rank 0 and loaded into an unsharded copy (built by `rebuild`: the first
    build with its measurements' results), since sharded modules cannot be merged or saved as they are."""
    if not world.distributed:
        save_model(with_cache(fold_lora(model), finished), tokenizer, final, overwrite=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        local = cfg.copy()
        local.device = "cpu"
        plain, _ = load_model_and_tokenizer(local)
        plain, _ = build_model(plain, rebuild)
        plain.load_state_dict(state)
        save_model(with_cache(fold_lora(plain), finished), tokenizer, final, overwrite=False)
    torch.distributed.barrier()


def _report(cfg: DictConfig, run: Path, model: nn.Module, tokenizer) -> None:
    results = read_json_record(run / "eval.json")
    lengths = report_lengths(cfg, model.config)
    table = Table(title=f"held-out perplexity ({cfg.data.source}; trained at {cfg.seq_len:,} tokens)")
    table.add_column("model")
    for seq_len in lengths:
        table.add_column(f"{seq_len:,} tokens (x original)", justify="right")
    spec = recorded_spec(model)
    exact = "window and cache" if spec is not None and spec.cache_budget else "window"  # what window_alone keeps
    labels = {"original": "original", "converted": "converted, untrained", "uptrained": "uptrained",
              "window_alone": f"uptrained, its {exact} alone"}
    for which, label in labels.items():
        cells = []
        for seq_len in lengths:
            r, base = results.get(ppl_key(cfg, which, seq_len)), results.get(ppl_key(cfg, "original", seq_len))
            ratio = f" ({r['ppl'] / base['ppl']:.3f})" if r and base and which != "original" else ""
            cells.append(f"{r['ppl']:.3f}{ratio}" if r else "")
        if any(cells):
            table.add_row(label, *cells)
    console.print(table)
    if cfg.train.sample_tokens > 0:
        prompt = next(iter(iter_documents(cfg.data, "heldout")))
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :48].to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=cfg.train.sample_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        console.print("[bold]recurrent model, greedy continuation of a held-out prompt:[/bold]")
        console.print(tokenizer.decode(ids[0]), markup=False, highlight=False, end="")
        console.print(tokenizer.decode(out[0, ids.shape[1]:]), style="green", markup=False, highlight=False)
    console.print(f"run directory: {run} (model/, metrics.jsonl, eval.json)")


def duration(hours: float) -> str:
    """Hours as a person reads them: 12.3 h, 4.5 min, 20 s (a tiny job is not `0.0 h`)."""
    if hours >= 1:
        return f"{hours:,.1f} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.1f} min"
    return f"{hours * 3600:.1f} s"


def dry_run(cfg: DictConfig) -> int:
    """Plan the job on the meta device: no weights, no download when the recipe has an architecture."""
    world_size = cfg.train.world_size or int(os.environ.get("WORLD_SIZE", "8"))
    if cfg.architecture:
        model = load_model("random", cfg.dtype, dict(cfg.architecture), meta=True)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        where, extra = resolve_source(cfg.model)  # smollm2-135m, a .gguf, a directory or a hub id
        try:
            config = AutoConfig.from_pretrained(where, **extra)
        except OSError as err:
            raise SourceError(f"dry run needs an `architecture` in the recipe or a reachable model config: "
                              f"{str(err).splitlines()[0]}") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    build = student_plan(build_plan(cfg, factorize=True))
    if build.n > 0:  # which sublayers `select` drops needs real weights; any n of them cost the same
        layers = model.config.num_hidden_layers
        skip = sorted(set(build.conversion.skip_layers) | set(range(layers - build.n, layers)))
        build = replace(build, n=0, conversion=replace(build.conversion, skip_layers=skip))
    model, spec = build_model(model, build)  # on meta, factorization plans its layouts only
    counts = count_parameters(model)
    train_cfg = train_config(cfg)
    plans = plan_stages(train_cfg, cfg.seq_len, world_size)
    table = Table(title=f"dry run: {cfg.recipe or cfg.model} on {world_size} GPUs")
    for column in ("stage", "tokens", "steps", "tokens/step", "micro x accum", "trainable", "memory/GPU",
                   "est. time"):
        table.add_column(column, justify="right")
    total_hours = 0.0
    for stage, plan in zip(train_cfg.stages, plans):
        trainable = trainable_parameters(model, stage)
        flops = plan.tokens * STAGE_KINDS[stage.name].flops_per_param * counts["total"]
        hours = flops / (world_size * cfg.train.gpu_tflops * 1e12 * cfg.train.expected_mfu) / 3600
        total_hours += hours
        memory = memory_per_gpu_gb(model, train_cfg, cfg.seq_len, world_size, trainable)
        warn = " (!)" if memory > cfg.train.gpu_memory_gb else ""
        table.add_row(stage.name, f"{plan.tokens / 1e9:.3f}B", f"{plan.steps:,}", f"{plan.tokens_per_step:,}",
                      f"{cfg.train.micro_batch_size} x {plan.accumulation}", f"{trainable / 1e9:.3f}B",
                      f"{memory:.1f} GB{warn}", duration(hours))
    console.print(f"parameters: total {counts['total'] / 1e9:.3f}B, new {counts['new'] / 1e9:.3f}B "
                  f"({spec.method}, {len(spec.softmax_layers)} softmax layers, {len(spec.skip_layers)} skipped)")
    console.print(table)
    console.print(f"estimated wall time {duration(total_hours)} at {cfg.train.expected_mfu:.0%} MFU of "
                  f"{cfg.train.gpu_tflops:.0f} TFLOP/s per GPU; memory assumes FSDP2 over {world_size} GPUs "
                  f"(train.world_size=N to change)")
    return 0
