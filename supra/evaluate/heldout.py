"""Held-out text the benchmarks score on, and models measured on it as `supra eval` measures them.

The benchmarks (scripts/bench_*.py) compare models on two corpora: stdlib's held-out split (the
training text's own distribution) and the Debian Reference, prose no model has trained on. A model
source is loaded under a recipe, as `supra eval recipe=R model=SOURCE` loads it, and scored on
each corpus's held-out token stream at several window lengths.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import DataError
from .perplexity import perplexity

ORIGINAL = "smollm2-135m"  # the model the benchmarks convert and compare against
PROSE_SOURCE = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
BATCH_TOKENS = 4096  # tokens per forward when scoring at several lengths: batch 8 at 512, 1 at 4,096


def prose_corpus(work: Path) -> Path:
    """The Debian Reference as a jsonl of documents (blank-line paragraphs joined to ~4,000 chars),
    written into `work` once."""
    if not PROSE_SOURCE.exists():
        raise DataError(f"{PROSE_SOURCE} is missing: apt-get install debian-reference-en (make bench-quality does)")
    path = work / "prose.jsonl"
    if path.exists():
        return path
    work.mkdir(parents=True, exist_ok=True)
    text = gzip.decompress(PROSE_SOURCE.read_bytes()).decode("utf-8")
    documents, current = [], ""
    for paragraph in text.split("\n\n"):
        current += paragraph + "\n\n"
        if len(current) > 4000:
            documents.append(current.strip())
            current = ""
    documents.append(current.strip())
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents if d))
    return path


def corpora(work: Path, names: list[str] | tuple[str, ...] = ("stdlib", "prose")) -> dict[str, list[str]]:
    """The recipe overrides that select each named corpus's held-out text (prose: kept in `work`)."""
    # prose: every document is new to the model; heldout_fraction only picks enough of them to score
    choices = {"stdlib": lambda: ["data.source=stdlib"],
               "prose": lambda: [f"data.source={prose_corpus(work)}", "data.heldout_fraction=0.9"]}
    return {name: choices[name]() for name in names}


def run_label(path: str) -> str:
    """runs/x/demo/model -> demo; runs/x/y-restore2/converted -> y-restore2; runs/x/gdn-untrained -> itself."""
    where = Path(path)
    return where.parent.name if where.name in ("model", "converted") else where.name


def load_measured(source: str, recipe: str) -> tuple[nn.Module, PreTrainedTokenizerBase, DictConfig]:
    """(model in eval mode, tokenizer, config) of a model source under `recipe`, as `supra eval` loads it."""
    from ..commands.common import load_model_and_tokenizer
    from ..config import load_config

    cfg = load_config([f"recipe={recipe}", f"model={source}"])
    model, tokenizer = load_model_and_tokenizer(cfg)
    return model.eval(), tokenizer, cfg


def heldout_streams(tokenizer: PreTrainedTokenizerBase, recipe: str, texts: dict[str, list[str]],
                    tokens: int) -> dict[str, torch.Tensor]:
    """Each corpus's held-out token stream (tokens + 1 ids), formatted as `supra eval` formats it."""
    from ..commands.settings import heldout_perplexity
    from ..config import load_config

    return {corpus: heldout_perplexity(load_config([f"recipe={recipe}", f"eval.max_tokens={tokens}", *overrides]),
                                       tokenizer).tokens()
            for corpus, overrides in texts.items()}


def perplexities(model: nn.Module, streams: dict[str, torch.Tensor], lengths: list[int],
                 tokens: list[int]) -> dict[str, dict]:
    """{corpus: {length: perplexity result (ppl, loss, by_position, ...)}} on the first tokens of each stream."""
    return {corpus: {str(length): perplexity(model, stream[:count + 1], length, max(1, BATCH_TOKENS // length))
                     for length, count in zip(lengths, tokens)}
            for corpus, stream in streams.items()}
