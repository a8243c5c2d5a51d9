"""`supra <command> [key=value ...]`: one function per command, overrides in Hydra syntax.

Mistakes (unknown command, recipe, key or value; a number out of range; a missing or unreadable
file; bad data; a damaged checkpoint) are raised as supra.errors.UserError and end with one line on
stderr and exit code 2; nothing is written before the config has been validated. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys

from .errors import UserError

COMMANDS = {
    "uptrain": "convert a model and uptrain it, stage by stage, resumable (recipe=NAME ...)",
    "eval": "perplexity, lm-eval benchmarks, passkey retrieval, speed (model=... tasks=[...])",
    "export": "write a Hugging Face directory loadable without supra (model=RUN out=DIR)",
    "convert": "swap softmax attention for recurrent attention, untrained (method=supra|lolcats|t2r|gla|gdn)",
    "skip": "remove attention sublayers chosen by similarity or position (select=... n=K)",
    "factorize": "replace Linear weights by low-rank or tensor-train factors (factorize.method=... "
                 "factorize.ratio=F)",
    "recipes": "list the shipped recipes, or print one (recipe=NAME)",
}

# The keys each command reads, listed first in its --help (a trailing dot: every key of a section).
COMMAND_KEYS = {
    "uptrain": ("recipe", "model", "tokenizer", "out", "seq_len", "method", "window", "window_kind", "sinks",
                "softmax_layers", "train.", "data.", "dtype", "device", "seed"),
    "eval": ("model", "step", "tasks", "out", "seq_len", "eval.", "data.", "tokenizer", "dtype", "device", "seed"),
    "export": ("model", "step", "out", "overwrite", "dtype", "merge_lora", "tokenizer"),
    "convert": ("model", "out", "overwrite", "method", "decay", "gate", "feature_map_init", "feature_dim", "window",
                "window_kind", "window_mix", "sinks", "state_decay", "cache_budget", "cache_chunk", "cache_recall",
                "softmax_layers", "skip_layers", "n", "select", "calibration_tokens", "seq_len", "data.", "dtype",
                "tokenizer"),
    "skip": ("model", "out", "overwrite", "select", "n", "skip_layers", "calibration_tokens", "seq_len", "data.",
             "dtype", "tokenizer"),
    "factorize": ("model", "out", "overwrite", "factorize.", "calibration_tokens", "seq_len", "data.", "dtype"),
    "recipes": ("recipe",),
}

USAGE = """usage: supra <command> [key=value ...]

Turn a pretrained softmax-attention LLM into a recurrent linear-attention model and uptrain it.

commands:
{commands}

Overrides use Hydra syntax: model=smollm2-135m tasks=[ppl,speed] train.batch_tokens=65536.
`recipe=NAME` loads recipes/NAME.yaml first; `supra recipes` lists them.
`recipe=path/to/my.yaml` runs your own recipe file (`supra recipes recipe=NAME > my.yaml` to start one).
`supra <command> --help` prints the command's keys first, each with its value and a line on it.
`supra --version` prints the version."""

# Operating-system errors about a path the user named (a missing, unwritable or full location):
# one line like any other mistake. Other OSErrors are bugs and keep their traceback.
PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC,
               errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C anywhere, e.g. in the seconds torch takes to import
        return fail("interrupted", code=130)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"supra {version()}")
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    logging.basicConfig(level=os.environ.get("SUPRA_LOG", "INFO"), format="%(message)s")
    from omegaconf import OmegaConf

    from .config import load_config

    want_help = any(a in ("-h", "--help") for a in overrides)
    overrides = [a for a in overrides if a not in ("-h", "--help")]
    option = next((a for a in overrides if a.startswith("-")), None)
    if option is not None:  # `--model X`: the habit of other tools
        name, _, value = option.lstrip("-").partition("=")
        after = overrides[overrides.index(option) + 1:] if not value else []
        value = value or (after[0] if after and "=" not in after[0] else "VALUE")
        return fail(f"supra takes settings as key=value, not options: write {name}={value} instead of "
                    f"{option}{'' if '=' in option or value == 'VALUE' else ' ' + value}")
    try:
        cfg = load_config(overrides)
    except UserError as err:
        return fail(one_line(err))
    if want_help:
        try:
            print(command_help(command, OmegaConf.to_container(cfg)))
            sys.stdout.flush()
        except BrokenPipeError:
            sys.stdout = open(os.devnull, "w")
        return 0
    _quiet_libraries()  # after the settings are checked: transformers alone takes a second to import
    module = importlib.import_module(f"supra.commands.{command}")
    try:
        result = module.run(cfg)
    except UserError as err:
        return fail(one_line(err))
    except OSError as err:
        if err.errno not in PATH_ERRNOS or err.filename is None:
            raise
        return fail(f"{err.filename}: {err.strerror}")
    except BrokenPipeError:  # `supra ... | head`: the reader left; that is not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    return int(result or 0)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("supra")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def command_help(command: str, values: dict) -> str:
    """The command's keys first, then every other: `key: current value  # what it is` (the line from
    the schema, supra.config.key_help), readable as YAML."""
    import yaml

    from .config import key_help

    described = key_help()
    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict) and name in ("factorize", "data", "eval", "train"):  # sections
                walk(value, name + ".")
            else:
                flat[name] = value

    walk(values, "")
    wanted = COMMAND_KEYS[command]

    def own(key: str) -> bool:
        return any(key == w or (w.endswith(".") and key.startswith(w)) for w in wanted)

    def line(key: str) -> str:
        value = yaml.safe_dump(flat[key], default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()
        return f"{key}: {value}  # {described.get(key, '')}".rstrip(" #")

    stage = "train.stages.*."
    stage_keys = [f"#   {k[len(stage):]}: {v}" for k, v in described.items() if k.startswith(stage)]
    own_keys = [line(k) for k in flat if own(k)]
    other_keys = [line(k) for k in flat if not own(k)]
    if own("train.stages"):
        own_keys += ["# a stage's keys (train.stages=[{name: lora, tokens: 1000000, lr: 1e-4}, ...]):", *stage_keys]
    return "\n".join([f"# supra {command}: {COMMANDS[command]}",
                      f"# keys of supra {command}, with their current values:",
                      *own_keys, "", "# other keys:", *other_keys])


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def fail(message: str, code: int = 2) -> int:
    print(f"supra: error: {message}", file=sys.stderr)
    return code


def _quiet_libraries() -> None:
    """Library progress bars and advisories drown the run's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    # peft asks transformers' deprecated is_gradient_checkpointing when it wraps a model for LoRA:
    # an advisory for peft, not for the user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
