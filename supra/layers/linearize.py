"""Convert a pretrained Llama / Mistral / Qwen2 model in place: the one conversion entry point.

`linearize(model, spec)` swaps the self-attention of every decoder layer (except those kept as
softmax) for a recurrent layer, removes skipped attention sublayers, and records the spec in
`model.config.supra`, from which an exported checkpoint rebuilds the same model. That record is
read and written only through `recorded_spec` and `record_spec`: it is a plain dict in the config
(so that config.json holds it), and a `LinearizeSpec` everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .attention import LolcatsAttention, RecurrentAttention, SupraAttention, T2RAttention
from .cache import handed_cache, recurrent_slot
from .factorized import rebuild_factorized
from .gated import GatedDeltaAttention, GlaAttention
from .specs import CACHE_OPTIONS, LinearizeSpec

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
METHODS: dict[str, type[RecurrentAttention]] = {
    "supra": SupraAttention,
    "lolcats": LolcatsAttention,
    "t2r": T2RAttention,
    "gla": GlaAttention,
    "gdn": GatedDeltaAttention,
}


def recorded_spec(model_or_config: nn.Module | PretrainedConfig) -> LinearizeSpec | None:
    """The spec recorded in a model's config (or in the config itself), None if supra never touched it."""
    config = getattr(model_or_config, "config", model_or_config)
    values = getattr(config, "supra", None)
    return LinearizeSpec.from_dict(values) if values else None


def record_spec(model: nn.Module, spec: LinearizeSpec) -> None:
    """Record `spec` in model.config.supra, as the plain dict that config.json saves."""
    model.config.supra = asdict(spec)


class SkippedAttention(nn.Module):
    """An attention sublayer that was removed: it adds nothing, so the residual passes through.
    In a cache it still counts the tokens it passed (an empty recurrent slot): transformers reads
    the sequence length, hence positions and masks, from layer 0's slot, which may be this one."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, cache: Any = None, past_key_values: Any = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        cache = handed_cache(cache, past_key_values, kwargs, f"layer {self.layer_idx}'s skipped attention")
        if cache is not None:
            recurrent_slot(cache, self.layer_idx).advance(None, hidden_states.shape[1])
        return torch.zeros_like(hidden_states), None


def check_supported(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}; supra converts: {', '.join(SUPPORTED_MODEL_TYPES)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def linearize(model: nn.Module, spec: LinearizeSpec) -> nn.Module:
    """Replace attention in place; idempotent on the recorded spec (a reloaded export is re-linearized).
    Factorized layers the spec records are rebuilt empty, for their saved factors to load into."""
    check_supported(model.config)
    layers = decoder_layers(model)
    spec.validate(len(layers))
    swap_attention(model, spec, range(len(layers)))
    present = dict(model.named_modules())  # a skipped attention sublayer took its factorized projections
    spec.factorized = {name: layout for name, layout in spec.factorized.items() if name in present}
    rebuild_factorized(model, spec.factorized)
    record_spec(model, spec)
    decoder = model.get_decoder()
    if not getattr(decoder, "_supra_positions_hook", False):
        decoder.register_forward_pre_hook(_positions_from_padding, with_kwargs=True)
        decoder._supra_positions_hook = True
    return model


def swap_attention(model: nn.Module, spec: LinearizeSpec, layers: Iterable[int]) -> None:
    """Give each of `layers` the attention `spec` asks for: removed (in skip_layers), left as it is
    (method=softmax, or in softmax_layers), or a recurrent layer of spec.method around its q/k/v/o."""
    blocks = decoder_layers(model)
    for idx in layers:
        if idx in spec.skip_layers:
            blocks[idx].self_attn = SkippedAttention(idx)
        elif spec.method != "softmax" and idx not in spec.softmax_layers:
            blocks[idx].self_attn = METHODS[spec.method](blocks[idx].self_attn, model.config, idx, spec)


def set_cache(model: nn.Module, settings: LinearizeSpec) -> None:
    """Give a converted model's layers the sparse cache of `settings` (its CACHE_OPTIONS; cache_budget
    0: none) and record it. The cache needs no training (LoLA), so it is a setting of a trained model,
    not a new conversion."""
    spec = recorded_spec(model)
    for name in CACHE_OPTIONS:
        setattr(spec, name, getattr(settings, name))
    spec.validate()
    for module in model.modules():
        if isinstance(module, RecurrentAttention):
            module.spec = spec
    record_spec(model, spec)


def new_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that conversion added (feature maps, window gates)."""
    names = []
    for module_name, module in model.named_modules():
        for prefix in getattr(module, "new_parameter_prefixes", ()):
            child = getattr(module, prefix, None)
            if isinstance(child, nn.Parameter):
                names.append(f"{module_name}.{prefix}")
            elif isinstance(child, nn.Module):
                names.extend(f"{module_name}.{prefix}.{n}" for n, _ in child.named_parameters())
    return names


def _positions_from_padding(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A padded batch without explicit position ids: derive them from the mask, as generate() does,
    so each row's first real token has position 0 and the pads before it are not in the state."""
    mask = kwargs.get("attention_mask")
    if mask is None or kwargs.get("position_ids") is not None or mask.dim() != 2 or bool(mask.all()):
        return None
    mask = mask.long()
    continuing = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    if continuing and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("right padding cannot be continued by a recurrent state; pad on the left")
    ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    length = ids.shape[1] if ids is not None else mask.shape[1]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -length:]
    return args, {**kwargs, "position_ids": positions}
