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
    "convert": "swap softmax attention for recurrent attention, untrained (method=supra|lolcats|t2r)",
    "skip": "remove attention sublayers chosen by similarity or position (select=... n=K)",
    "factorize": "replace Linear weights by low-rank or tensor-train factors (factorize.method=... ratio=F)",
    "recipes": "list the shipped recipes, or print one (recipe=NAME)",
}

USAGE = """usage: supra <command> [key=value ...]

Turn a pretrained softmax-attention LLM into a recurrent linear-attention model and uptrain it.

commands:
{commands}

Overrides use Hydra syntax: model=smollm2-135m tasks=[ppl,speed] train.batch_tokens=65536.
`recipe=NAME` loads recipes/NAME.yaml first; `supra recipes` lists them.
`supra <command> --help` prints every key with its current value."""

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
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
    logging.basicConfig(level=os.environ.get("SUPRA_LOG", "INFO"), format="%(message)s")
    _quiet_libraries()

    from omegaconf import OmegaConf

    from .config import load_config

    want_help = any(a in ("-h", "--help") for a in overrides)
    try:
        cfg = load_config([a for a in overrides if a not in ("-h", "--help")])
    except UserError as err:
        return fail(one_line(err))
    if want_help:
        try:
            print(f"supra {command}: {COMMANDS[command]}\n\ncurrent configuration:\n{OmegaConf.to_yaml(cfg)}")
            sys.stdout.flush()
        except BrokenPipeError:
            sys.stdout = open(os.devnull, "w")
        return 0
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
