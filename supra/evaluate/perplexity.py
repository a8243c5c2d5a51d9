"""Held-out perplexity by non-overlapping windows, with loss broken down by position in the window.

Held-out documents are joined with EOS into one token stream; window i covers tokens
[i*L, i*L + L] so its L predictions score every token after the first exactly once across windows.
The per-position buckets show how the loss behaves deep into a window (past the training length
when seq_len is set longer than the one trained on).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import DataConfig, DataError, iter_documents


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: Iterable[str], max_tokens: int) -> torch.Tensor:
    """Token ids of documents separated by EOS, cut at max_tokens + 1 (the +1 is the last target);
    fewer than two ids when the documents hold no text."""
    separator = tokenizer.eos_token_id
    ids: list[int] = []
    for text in documents:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            ids.append(separator)
        if len(ids) > max_tokens:
            break
    return torch.tensor(ids[: max_tokens + 1], dtype=torch.long)


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """[0, 64), [64, 128), [128, 256), ... doubling up to seq_len."""
    edges = [0, min(64, seq_len)]
    while edges[-1] < seq_len:
        edges.append(min(edges[-1] * 2, seq_len))
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def perplexity(model: nn.Module, stream: torch.Tensor, seq_len: int, batch_size: int = 4) -> dict:
    device = next(model.parameters()).device
    windows = (len(stream) - 1) // seq_len
    if windows == 0:
        seq_len, windows = len(stream) - 1, 1  # less text than one window: score what there is
    loss_sum = torch.zeros(seq_len, dtype=torch.float64)
    for first in range(0, windows, batch_size):
        rows = range(first, min(first + batch_size, windows))
        batch = torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in rows]).to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        losses = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none")
        loss_sum += losses.sum(0).double().cpu()
    tokens = windows * seq_len
    mean = loss_sum.sum().item() / tokens
    by_position = []
    for lo, hi in position_buckets(seq_len):
        bucket = loss_sum[lo:hi].sum().item() / (windows * (hi - lo))
        by_position.append({"start": lo, "end": hi, "loss": bucket, "ppl": math.exp(bucket)})
    return {"ppl": math.exp(mean), "loss": mean, "tokens": tokens, "windows": windows, "seq_len": seq_len,
            "by_position": by_position}


class HeldoutPerplexity:
    """Perplexity on the first `max_tokens` of `data`'s held-out split, in windows of `seq_len` tokens
    and batches of `batch_size` windows, for a model in training or not: its train/eval mode is
    restored. The text is tokenized once, on first use."""

    def __init__(self, data: DataConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int, max_tokens: int,
                 batch_size: int) -> None:
        self.data, self.tokenizer = data, tokenizer
        self.seq_len, self.max_tokens, self.batch_size = seq_len, max_tokens, batch_size
        self.stream: torch.Tensor | None = None

    def tokens(self) -> torch.Tensor:
        """The held-out token stream (max_tokens + 1 ids), tokenized on first use."""
        if self.stream is None:
            # Formatted as training formats it (chat templates), so a document cut in two between
            # training and held-out text is cut in the same text.
            documents = iter_documents(self.data, "heldout", self.tokenizer)
            stream = token_stream(self.tokenizer, documents, self.max_tokens)
            if len(stream) < 2:
                raise DataError("the held-out split has no text to score; set data.heldout_fraction > 0 (or "
                                "train.eval_baselines=false train.eval_every=0 to train without held-out perplexity)")
            self.stream = stream
        return self.stream

    def __call__(self, model: nn.Module, seq_len: int | None = None) -> dict:
        """Scored in windows of seq_len tokens (default: the one given at construction)."""
        stream = self.tokens()
        was_training = model.training
        model.eval()
        try:
            return perplexity(model, stream, seq_len or self.seq_len, self.batch_size)
        finally:
            model.train(was_training)
