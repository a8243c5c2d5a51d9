"""The settings of a conversion and of a factorisation, as plain dataclasses: what a recipe's keys
become, what a converted model records in its config.json, and what `supra` validates before it
loads anything. Nothing here imports torch or transformers, so a mistake on the command line is
refused in well under a second.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

# The conversion methods (supra.layers.linearize.METHODS builds their layers); softmax: no conversion.
METHOD_NAMES = ("supra", "lolcats", "t2r", "gla", "gdn", "softmax")


# Which methods each conversion option changes (window is left out: every recipe sets it, and it
# is the window of lolcats, gla and gdn alike).
OPTION_METHODS: dict[str, tuple[str, ...]] = {
    "decay": ("supra", "gla", "gdn"), "gate": ("gla", "gdn"), "feature_map_init": ("supra", "t2r"),
    "feature_dim": ("lolcats", "t2r", "gla"), "window_kind": ("lolcats", "gla", "gdn"),
    "window_mix": ("gla", "gdn"), "sinks": ("lolcats", "gla", "gdn"), "state_decay": ("lolcats",),
    "cache_budget": ("lolcats", "gla", "gdn"),
}
WINDOW_OPTIONS = ("window_kind", "window_mix", "sinks", "cache_budget")  # meaningful only with a softmax window
# The sparse cache needs no training (LoLA): these are settings of a trained model, not a new conversion.
CACHE_OPTIONS = ("cache_budget", "cache_chunk", "cache_recall")


@dataclass
class LinearizeSpec:
    method: str = "lolcats"  # supra | lolcats | t2r | gla | gdn | softmax
    decay: str = "supra"  # supra: Lightning slopes (SUPRA's choice); retnet: 1 - 2^(-5-h); none
    gate: str = "key"  # gla/gdn decay: key (Liger, from the key projection) | learned (starts at `decay`)
    feature_map_init: str = "default"  # supra/t2r maps: default nn.Linear init (SUPRA) or identity
    feature_dim: int | None = None  # lolcats/t2r features per head; default head_dim
    window: int = 64  # softmax window of lolcats, and of gla/gdn (0: none)
    window_kind: str = "sliding"  # sliding: the last W tokens | terrace: own block of W + the previous one
    window_mix: str = "head"  # gla/gdn: the window's share per head, or per head and token (gated.py)
    sinks: int = 0  # first tokens of each document kept in that softmax window for good (kernels/hybrid.py)
    # lolcats: per-head decay of the linear part (tokens older than the window), which keeps it bounded
    # past the training length: none | supra | retnet (the rates of `decay`) | learned (starts at supra's)
    state_decay: str = "none"
    # lolcats, gla, gdn: pairs per layer and key/value head kept exactly beyond the window (a LoLA-style cache,
    # kernels/sparse_cache.py; gla/gdn attend them in their window's softmax); 0: none (a recipe that
    # leaves it unset: none, and a converted model keeps its own; uptrain adds it after the stages).
    # They are kept in runs of cache_chunk consecutive tokens: a share cache_recall of them the runs the
    # linear state recalls worst (LoLA's choice), the rest the runs the last block's queries attended
    # most (SnapKV's). The query heads of one key/value head choose together and share one copy.
    cache_budget: int = 0
    cache_chunk: int = 8
    cache_recall: float = 0.25
    softmax_layers: list[int] = field(default_factory=list)  # layers kept as softmax attention
    skip_layers: list[int] = field(default_factory=list)  # attention sublayers removed outright
    backend: str = "auto"  # auto | torch | triton
    # Linear layers replaced by factors (supra factorize): module name -> layout, see factorized.py
    factorized: dict[str, dict[str, Any]] = field(default_factory=dict)
    # How softmax_layers=auto:K chose softmax_layers (softmax_select.py): the losses measured, the choice
    softmax_choice: dict[str, Any] | None = None

    def validate(self, num_layers: int | None = None) -> None:
        choices = {"method": METHOD_NAMES, "decay": ("supra", "retnet", "none"), "gate": ("key", "learned"),
                   "feature_map_init": ("default", "identity"), "backend": ("auto", "torch", "triton"),
                   "window_kind": ("sliding", "terrace"), "window_mix": ("head", "token"),
                   "state_decay": ("none", "supra", "retnet", "learned")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.window < (1 if self.method == "lolcats" else 0):
            raise ValueError(f"window must be >= 1 for lolcats (>= 0 otherwise), got {self.window}")
        if self.method in ("gla", "gdn") and self.gate == "learned" and self.decay == "none":
            raise ValueError("gate=learned starts at the fixed rates of `decay`, and decay=none has none; "
                             "use decay=supra or decay=retnet")
        if self.sinks < 0 or (self.sinks and not self.window):
            raise ValueError(f"sinks must be >= 0 and needs a softmax window (window >= 1), got sinks={self.sinks} "
                             f"with window={self.window}")
        if self.cache_budget < 0:
            raise ValueError(f"cache_budget must be >= 0 (pairs per layer and key/value head), got {self.cache_budget}")
        defaults = LinearizeSpec()
        if not self.cache_budget and (self.cache_chunk, self.cache_recall) != (defaults.cache_chunk,
                                                                              defaults.cache_recall):
            raise ValueError(f"cache_chunk and cache_recall choose the sparse cache's pairs; they need cache_budget "
                             f">= 1 (got cache_chunk={self.cache_chunk}, cache_recall={self.cache_recall})")
        if self.feature_dim is not None and (self.feature_dim < 2 or self.feature_dim % 2):
            raise ValueError(f"feature_dim must be a positive even number, got {self.feature_dim}")
        for name in ("softmax_layers", "skip_layers"):
            for idx in getattr(self, name):
                if num_layers is not None and not 0 <= idx < num_layers:
                    raise ValueError(f"{name} has layer {idx}; valid layers are 0..{num_layers - 1}")
        both = set(self.softmax_layers) & set(self.skip_layers)
        if both:
            raise ValueError(f"layers {sorted(both)} are both kept as softmax and skipped; choose one")
        unused = self.unused_options()
        if unused:
            name = unused[0]
            where = ", ".join(OPTION_METHODS[name])
            window = " with a softmax window (window >= 1)" if name in WINDOW_OPTIONS and self.window == 0 else ""
            raise ValueError(f"{name}={getattr(self, name)} does nothing with method={self.method}"
                             f"{' and window=0' if window else ''}; it is for method={where}{window}. "
                             f"Remove it, or choose one of those methods")
        if self.cache_budget and (self.cache_chunk < 1 or self.cache_budget % self.cache_chunk
                                  or self.window % self.cache_chunk):
            raise ValueError(f"cache_chunk must divide both cache_budget and window; got "
                             f"cache_chunk={self.cache_chunk}, cache_budget={self.cache_budget}, window={self.window}")
        if not 0 <= self.cache_recall <= 1:
            raise ValueError(f"cache_recall is a share of the cache, in [0, 1]; got {self.cache_recall}")

    def without_cache(self) -> LinearizeSpec:
        """The same conversion with no sparse cache (its options at their defaults)."""
        defaults = LinearizeSpec()
        return replace(self, **{name: getattr(defaults, name) for name in CACHE_OPTIONS})

    def cache_arguments(self, groups: int) -> dict[str, int]:
        """The kernels' arguments for the sparse cache (dispatch.window_hybrid_attention) of a layer whose
        key/value heads each serve `groups` query heads: its pairs per head, the run length, the pairs
        chosen by recall error (whole runs), and the heads that share one choice and one copy of them."""
        runs = self.cache_budget // self.cache_chunk
        return {"cache_budget": self.cache_budget, "cache_chunk": self.cache_chunk,
                "cache_recall": round(runs * self.cache_recall) * self.cache_chunk, "cache_groups": groups}

    def unused_options(self) -> list[str]:
        """The options set away from their defaults that the method ignores (they would do nothing)."""
        defaults = LinearizeSpec()
        unused = []
        for name, methods in OPTION_METHODS.items():
            if getattr(self, name) == getattr(defaults, name):
                continue
            if self.method not in methods or (name in WINDOW_OPTIONS and self.window == 0):
                unused.append(name)
        if "cache_budget" in unused or not self.cache_budget:  # the cache's rule needs a cache
            unused += [name for name in CACHE_OPTIONS[1:] if getattr(self, name) != getattr(defaults, name)]
        return unused

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LinearizeSpec:
        """The spec a record describes. Keys this version does not know (a newer checkpoint's) are
        ignored, and fields the record lacks (an older one's) take their defaults. A copy: changing
        the spec does not change the record."""
        known = {f.name for f in fields(cls)}
        values = copy.deepcopy({k: v for k, v in values.items() if k in known})
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()})


FACTORIZE_METHODS = ("none", "low_rank", "tensor_train")


@dataclass
class FactorizeSpec:
    """What to factorize and how; the `factorize` section of a recipe."""

    method: str = "none"  # none | low_rank | tensor_train
    # fnmatch patterns on module names inside a decoder layer, e.g. mlp.*, self_attn.q_proj
    targets: list[str] = field(default_factory=lambda: ["mlp.*"])
    layers: list[int] = field(default_factory=list)  # decoder layers to factorize (empty: all)
    rank: int | None = None  # low_rank: the rank; tensor_train: every TT-rank (capped at full per bond)
    ratio: float | None = None  # instead of rank: fraction of each matrix's parameters kept
    activation_aware: bool = False  # low_rank: whiten by calibration inputs (SVD-LLM)
    tt_cores: int = 3  # tensor_train: d, the number of cores
    # tensor_train: modes for a dimension, e.g. [[8, 8, 9]] factors every 576 as 8 x 8 x 9; other
    # dimensions get the most balanced d-way factorization
    tt_shapes: list[list[int]] = field(default_factory=list)

    def validate(self) -> None:
        if self.method not in FACTORIZE_METHODS:
            raise ValueError(f"unknown factorize.method {self.method!r}; valid: {', '.join(FACTORIZE_METHODS)}")
        if self.method == "none":
            return
        if (self.rank is None) == (self.ratio is None):
            raise ValueError(f"factorize.method={self.method} needs exactly one of factorize.rank=R or "
                             "factorize.ratio=F (fraction of parameters kept)")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"factorize.rank must be >= 1, got {self.rank}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"factorize.ratio must be in (0, 1], got {self.ratio}")
        if not self.targets:
            raise ValueError("factorize.targets is empty; give name patterns such as [mlp.*] or [self_attn.q_proj]")
        if self.activation_aware and self.method != "low_rank":
            raise ValueError("factorize.activation_aware=true is for method=low_rank only")
        if self.method == "tensor_train":
            if self.tt_cores < 2:
                raise ValueError(f"factorize.tt_cores must be >= 2, got {self.tt_cores}")
            for modes in self.tt_shapes:
                if len(modes) != self.tt_cores or min(modes) < 1:
                    raise ValueError(f"factorize.tt_shapes entry {list(modes)} must be {self.tt_cores} "
                                     "positive numbers (one per core, factorize.tt_cores)")


def parse_auto(value: Any) -> int | None:
    """K for "auto:K", None for an explicit list of layers; ValueError for anything else."""
    match = re.fullmatch(r"auto:(\d+)", value.strip()) if isinstance(value, str) else None
    if match is not None:
        return int(match.group(1))
    if not isinstance(value, str) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        return None
    raise ValueError(f"softmax_layers must be a list of layer indices or auto:K (K layers chosen by "
                     f"measurement), got {value!r}")
