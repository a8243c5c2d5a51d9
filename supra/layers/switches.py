"""Run a converted model's layers another way without retraining them: for measurements.

- `window_alone(model)`: every layer that has a softmax window keeps only its exact softmax part
  (window, sinks and whatever else it scores exactly), with the recurrent state switched off. For
  the LoLCATs hybrid the query features are zero, so the linear terms drop out of both numerator and
  denominator and what remains is the window softmax; for gla/gdn the window's share in the mix is 1.
  A student that does not beat this on long text gets nothing from its state.
- `forced_window_share(model, share, seen)`: the gla/gdn mix's window share set (or only recorded).
- `respecify(model, changes)`: a converted model's recorded options changed in place (a window
  size, a cache budget, ...): its recurrent layers are rebuilt with the new spec and keep their
  trained weights, which must still fit them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .attention import LolcatsAttention, RecurrentAttention
from .gated import GatedAttention
from .linearize import METHODS, LinearizeSpec, decoder_layers, record_spec, recorded_spec

# Options that decide which layers are converted, or how: another value is another conversion.
CONVERSION_FIELDS = ("method", "softmax_layers", "skip_layers", "factorized", "softmax_choice")


class NoFeatures(nn.Module):
    """Zero features of the wrapped map's shape: fq . (anything) = 0, so no linear term is left."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.features(x))


@contextmanager
def forced_window_share(model: nn.Module, share: float | None,
                        seen: dict[int, list[float]] | None = None) -> Iterator[int]:
    """Every gated layer with a window mixes with window share `share` (None: its own); the mean
    share each call used is appended to seen[layer_idx]. Yields the number of such layers."""
    layers = [m for m in model.modules() if isinstance(m, GatedAttention) and m.window_mix is not None]

    def patched(layer: GatedAttention):
        own = layer.window_share

        def window_share(q: torch.Tensor) -> torch.Tensor:
            value = own(q) if share is None else torch.full((1, 1), share, device=q.device)
            if seen is not None:
                seen.setdefault(layer.layer_idx, []).append(value.float().mean().item())
            return value
        return window_share

    for layer in layers:
        layer.window_share = patched(layer)  # an instance attribute hides the method
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.window_share


@contextmanager
def window_alone(model: nn.Module) -> Iterator[int]:
    """Every layer with a softmax window runs it alone, its recurrent state switched off (module
    docstring); softmax layers of a hybrid stay as they are. Yields the number of layers switched:
    0 for a model without a window (nothing to compare)."""
    lolcats = [m for m in model.modules() if isinstance(m, LolcatsAttention)]
    for layer in lolcats:
        layer.feature_map_q = NoFeatures(layer.feature_map_q)
    try:
        with forced_window_share(model, 1.0) as gated:
            yield len(lolcats) + gated
    finally:
        for layer in lolcats:
            layer.feature_map_q = layer.feature_map_q.features


def respecify(model: nn.Module, changes: dict[str, Any]) -> LinearizeSpec:
    """Change options of a converted model in place: each recurrent layer is rebuilt with the new
    spec around the same projections and loads its trained weights (strictly: an option that
    changes the layer's parameters is refused). Returns the new spec, recorded in the config."""
    spec = recorded_spec(model)
    if spec is None or spec.method == "softmax":
        raise ValueError("only a converted model has options to change")
    known = {f.name for f in dataclasses.fields(LinearizeSpec)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; a converted model's options: {', '.join(sorted(known))}")
    fixed = sorted(set(changes) & set(CONVERSION_FIELDS))
    if fixed:
        raise ValueError(f"{fixed[0]} says which layers are converted and how; convert the model again instead")
    new = LinearizeSpec.from_dict({**dataclasses.asdict(spec), **changes})
    if not new.cache_budget:  # no cache: its rule goes too, unless given
        new = dataclasses.replace(new.without_cache(), **changes)
    blocks = decoder_layers(model)
    new.validate(len(blocks))
    rebuilt = {}
    for idx, block in enumerate(blocks):  # all built before any is swapped: a refusal changes nothing
        old = block.self_attn
        if isinstance(old, RecurrentAttention):
            rebuilt[idx] = METHODS[new.method](old, model.config, idx, new)
            try:
                rebuilt[idx].load_state_dict(old.state_dict())
            except RuntimeError as err:
                raise ValueError(f"{', '.join(sorted(changes))} changes the weights of layer {idx}'s attention; "
                                 f"convert and train with it instead ({str(err).splitlines()[-1].strip()})") from None
    for idx, layer in rebuilt.items():
        blocks[idx].self_attn = layer
    record_spec(model, new)
    return new
