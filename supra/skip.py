"""Attention-sublayer skipping: score each attention sublayer, choose some, remove them.

Two ways to choose:

- `similarity` (LLM-Drop, arXiv 2406.15786): run calibration text through the model and, for each
  decoder layer, average over tokens the cosine similarity between the residual stream entering the
  attention sublayer (h) and the stream after its residual add (h + attn(norm(h))). A sublayer whose
  output barely turns the residual stream scores close to 1 and is the first to go.
- `last` (Tyukin, arXiv 2404.05741): the last n attention sublayers.

A removed sublayer becomes `SkippedAttention` (adds zero, the residual passes through); the list is
recorded in the model's spec (`skip_layers`), so a saved model reloads without those sublayers
whether it was an original (method=softmax) or a converted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import ConfigError
from .data import DataConfig, iter_documents
from .evaluate.perplexity import token_stream
from .layers.linearize import LinearizeSpec, decoder_layers, linearize, record_spec, recorded_spec, swap_attention

SELECTIONS = ("similarity", "last")


@torch.no_grad()
def attention_similarity(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Per decoder layer, the token-averaged cosine similarity of the residual stream before and
    after its attention sublayer, over every token of `batches` (input-id tensors of shape (B, T)).

    HF decoder layers compute `h + self_attn(input_layernorm(h))`, so `h` is the decoder layer's
    input (taken by a forward-pre hook on the layer) and the attention output comes from a forward
    hook on `self_attn`; the layernormed input that self_attn itself receives is not the residual.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    residual: dict[int, torch.Tensor] = {}

    def take_residual(idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            residual[idx] = args[0] if args else kwargs["hidden_states"]
        return hook

    def score(idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
            before = residual.pop(idx).float()
            after = before + output[0].float()
            # eps keeps an all-zero row (never seen in practice) from producing NaN
            cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1, eps=1e-8)
            # a cosine is in [-1, 1]; float32 round-off lands a silent sublayer's at 1 + 2e-9
            cosine = cosine.clamp(-1.0, 1.0)
            sums[idx] += cosine.double().sum().cpu()
        return hook

    handles = []
    for idx, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(take_residual(idx), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(score(idx), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("no calibration tokens: the batches were empty")
    return (sums / tokens).tolist()


def skip_candidates(model: nn.Module) -> list[int]:
    """Layers whose attention may still be removed: not already skipped, and not a softmax layer a
    converted hybrid was told to keep (its spec refuses a layer that is both)."""
    spec = recorded_spec(model) or LinearizeSpec(method="softmax")
    taken = set(spec.skip_layers) | set(spec.softmax_layers)
    return [idx for idx in range(len(decoder_layers(model))) if idx not in taken]


def choose_layers(scores: list[float] | None, num_layers: int, select: str, n: int,
                  candidates: list[int] | None = None) -> list[int]:
    """The n sublayers to remove, sorted: the most similar ones (`similarity`, needs `scores`) or
    the last ones (`last`), among `candidates` (default: every layer)."""
    if select not in SELECTIONS:
        raise ConfigError(f"unknown select {select!r}; valid: {', '.join(SELECTIONS)}")
    pool = list(range(num_layers)) if candidates is None else sorted(candidates)
    if not 0 <= n <= len(pool):
        raise ConfigError(f"n={n} is out of range: this model has {len(pool)} attention sublayers "
                          f"that can be skipped, so n must be in 0..{len(pool)}")
    if select == "last":
        return pool[len(pool) - n:]
    if scores is None or len(scores) != num_layers:
        raise ValueError(f"select=similarity needs one score per layer ({num_layers})")
    # stable sort: ties go to the earlier layer, so choices are reproducible
    ranked = sorted(pool, key=lambda idx: -scores[idx])
    return sorted(ranked[:n])


def apply_skip(model: nn.Module, layers: list[int]) -> nn.Module:
    """Remove the attention sublayers `layers` in place and record them in the model's spec.

    An original model (or one only skipped so far) is re-linearized with method=softmax, which only
    swaps the skipped layers. A converted model is not: linearize would wrap its recurrent layers a
    second time, so only the newly skipped layers are swapped here and the spec is updated to
    match what `load_model` will rebuild from it.
    """
    spec = recorded_spec(model) or LinearizeSpec(method="softmax")
    spec.skip_layers = sorted(set(spec.skip_layers) | set(layers))
    blocks = decoder_layers(model)
    try:
        spec.validate(len(blocks))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if spec.method == "softmax":
        return linearize(model, spec)
    swap_attention(model, spec, layers)
    record_spec(model, spec)
    return model


def calibration_batches(tokenizer: PreTrainedTokenizerBase, data: DataConfig, tokens: int, seq_len: int,
                        batch_size: int = 4) -> list[torch.Tensor]:
    """`tokens` tokens of `data`'s training text (documents joined by EOS) as rows of `seq_len`, in
    batches; fewer rows when the training text is shorter."""
    if tokens < 1:
        raise ConfigError(f"calibration_tokens must be >= 1, got {tokens}")
    try:
        stream = token_stream(tokenizer, iter_documents(data, "train"), tokens)
    except ValueError:  # data= names text that cannot be read: said as for no text at all
        stream = None
    if stream is None or len(stream) < 2:
        raise ConfigError("no training text to calibrate on (check data=)")
    seq_len = min(seq_len, len(stream))
    rows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    return list(rows.split(batch_size))


@dataclass
class SkipResult:
    scores: list[float] | None  # per layer, for select=similarity
    candidates: list[int]
    chosen: list[int]  # skipped by this call: `skip_layers` and the n chosen
    skip_layers: list[int]  # all skipped layers of the model afterwards


def select_and_skip(model: nn.Module, skip_layers: Sequence[int], softmax_layers: Sequence[int], n: int,
                    select: str, calibration: Callable[[], list[torch.Tensor]]) -> SkipResult:
    """Remove `skip_layers`, then `n` more sublayers chosen by `select` (on `calibration` text).

    Layers in `softmax_layers` are never chosen: a hybrid recipe keeps them as softmax, and a
    layer cannot be both. Similarity is scored on the model with `skip_layers` already removed,
    so the scores describe the model the choice is made for.
    """
    num_layers = len(decoder_layers(model))
    fixed = sorted(set(skip_layers))
    try:
        LinearizeSpec(method="softmax", skip_layers=fixed).validate(num_layers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if fixed:
        apply_skip(model, fixed)
    candidates = [idx for idx in skip_candidates(model) if idx not in set(softmax_layers)]
    # check n before the calibration forward passes, so a bad n fails at once
    choose_layers(None, num_layers, "last", n, candidates)
    scores = None
    if select == "similarity" and n > 0:
        was_training = model.training
        model.eval()
        scores = attention_similarity(model, calibration())
        model.train(was_training)
    chosen = choose_layers(scores, num_layers, select, n, candidates)
    apply_skip(model, chosen)
    return SkipResult(scores, candidates, sorted(set(fixed) | set(chosen)), recorded_spec(model).skip_layers)
