"""Recurrent state inside a transformers Cache.

A converted layer keeps a fixed-size state (plus, for the LoLCATs hybrid, a short window of
keys) instead of a growing KV cache. The state lives in the Cache that `generate()` (or the user)
passes in: the layer swaps its own slot for a `RecurrentStateLayer` on first use. Softmax layers
of a hybrid keep their ordinary KV slots, so one Cache serves both kinds, and `get_seq_length` /
mask sizes stay right for position ids and for the softmax layers' masks.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.llama.modeling_llama import LlamaModel

# transformers 5.24 renamed the argument that carries the cache from `past_key_values` to `cache`
# (the old name is deprecated, "removed in 5.40"). Callers of our own pass it under this name.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """`model(ids, **cache_kwargs(cache))` under the installed transformers' spelling."""
    return {CACHE_ARGUMENT: cache}


def handed_cache(cache: Cache | None, past_key_values: Cache | None, kwargs: dict[str, Any],
                 where: str) -> Cache | None:
    """The cache a decoder layer handed to `where`, under either spelling.

    A layer that misses its cache silently runs without state (decoding then diverges with no
    error), so a Cache found under any other name, or `use_cache=True` with no cache at all, is an
    error: a transformers release renamed the argument again and this function must learn it."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise TypeError(f"{where} was handed two different caches (cache= and past_key_values=)")
    found = cache if cache is not None else past_key_values
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if stray:
        raise TypeError(f"{where} was handed its cache as {stray[0]!r}, an argument supra does not know "
                        f"(it reads 'cache' and 'past_key_values'); this transformers release is not supported")
    if found is None and kwargs.get("use_cache"):
        raise TypeError(f"{where} was called with use_cache=True but found no cache under 'cache' or "
                        "'past_key_values'; this transformers release is not supported")
    return found


def _map_state(state: Any, fn) -> Any:
    """fn on every tensor of a (nested) state; other fields (a ring buffer's next slot) are kept."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, tuple):
        return type(state)(*(_map_state(x, fn) for x in state))
    return state


class RecurrentStateLayer(DynamicLayer):
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.state: Any = None
        self.seen_tokens = 0

    def advance(self, state: Any, new_tokens: int) -> None:
        self.state = state
        self.seen_tokens += new_tokens
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, *args, **kwargs):
        raise RuntimeError("a recurrent attention layer keeps a state, not keys and values")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("beam search is not supported by recurrent attention models; "
                         "use greedy decoding or sampling (num_beams=1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a recurrent state cannot be cropped (assisted/speculative decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = _map_state(self.state, lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = _map_state(self.state, lambda x: x[indices])


def recurrent_slot(cache: Cache, layer_idx: int) -> RecurrentStateLayer:
    """This layer's slot in `cache`, turned into a recurrent-state slot on first use."""
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    slot = cache.layers[layer_idx]
    if not isinstance(slot, RecurrentStateLayer):
        if slot.get_seq_length() > 0:
            raise ValueError(f"cache layer {layer_idx} already holds softmax keys; a recurrent layer cannot reuse it")
        slot = RecurrentStateLayer()
        cache.layers[layer_idx] = slot
    return slot
