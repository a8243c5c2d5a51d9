"""Weight factorisation of a model: choose the Linear layers, decompose them, record what was done.

`factorize_model(model, spec, batches)` replaces each Linear a `FactorizeSpec` selects (module name
patterns inside the decoder layers, and a layer list) by a `LowRankLinear` or `TensorTrainLinear`
(supra/layers/factorized.py) and records the layouts in the model's spec (`factorized`, linearize.py), beside
the conversion and skip records; loading the saved model (supra, or an export without supra)
rebuilds the same modules from there. It works on an original, a converted or a skipped model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn

from .config import ConfigError
from .layers.factorized import (
    FACTORIZED,
    LowRankLinear,
    TensorTrainLinear,
    balanced_modes,
    full_tt_ranks,
    low_rank_factors,
    rebuild_factorized,
    tt_parameters,
    tt_svd,
)
from .layers.linearize import decoder_layers, record_spec, recorded_spec
from .layers.specs import FactorizeSpec, LinearizeSpec


class FactorizeError(ConfigError):
    """A factorize setting that does not fit this model; one line for the user."""


@dataclass
class Factorized:
    """One factorized layer, for the report."""

    name: str
    layout: dict
    dense_parameters: int
    parameters: int
    relative_error: float  # ||W - W'||_F / ||W||_F (of the outputs on calibration text when whitened)


def select_targets(model: nn.Module, spec: FactorizeSpec) -> list[str]:
    """Full names of the nn.Linear modules the spec selects, in model order."""
    layers = decoder_layers(model)
    chosen = list(spec.layers) or list(range(len(layers)))
    bad = [i for i in chosen if not 0 <= i < len(layers)]
    if bad:
        raise FactorizeError(f"factorize.layers has layer {bad[0]}; valid layers are 0..{len(layers) - 1}")
    prefix = {id(layer): name for name, layer in model.named_modules() if any(layer is x for x in layers)}
    names, factorized = [], []
    for idx in chosen:
        layer = layers[idx]
        for sub, module in layer.named_modules():
            if any(fnmatch(sub, pattern) for pattern in spec.targets):
                if isinstance(module, FACTORIZED):
                    factorized.append(sub)
                elif isinstance(module, nn.Linear):
                    names.append(f"{prefix[id(layer)]}.{sub}")
    if not names:
        linears = sorted(n for n, m in layers[chosen[0]].named_modules() if isinstance(m, (nn.Linear, *FACTORIZED)))
        already = f" ({', '.join(sorted(set(factorized)))} already factorized)" if factorized else ""
        raise FactorizeError(f"factorize.targets {list(spec.targets)} match no Linear layer{already}; "
                             f"the Linear layers of a decoder layer are: {', '.join(linears)}")
    return names


def tt_modes(spec: FactorizeSpec, dim: int) -> list[int]:
    """The modes of a dimension: a tt_shapes entry whose product is `dim`, else balanced ones."""
    for modes in spec.tt_shapes:
        if math.prod(modes) == dim:
            return list(modes)
    return balanced_modes(dim, spec.tt_cores)


def check_tt_shapes(spec: FactorizeSpec, dims: set[int]) -> None:
    for modes in spec.tt_shapes:
        if math.prod(modes) not in dims:
            raise FactorizeError(f"factorize.tt_shapes entry {list(modes)} multiplies to {math.prod(modes)}, which is "
                                 f"no dimension of the chosen layers ({', '.join(map(str, sorted(dims)))})")


def choose_low_rank(spec: FactorizeSpec, out_features: int, in_features: int, name: str) -> int:
    full = min(out_features, in_features)
    if spec.rank is not None:
        if spec.rank > full:
            raise FactorizeError(f"factorize.rank={spec.rank} is above full rank {full} of {name} "
                                 f"({out_features} x {in_features}); use 1..{full}")
        return spec.rank
    rank = int(spec.ratio * out_features * in_features / (out_features + in_features))
    if rank < 1:
        raise FactorizeError(f"factorize.ratio={spec.ratio} leaves less than rank 1 for {name}; raise it")
    return min(rank, full)


def choose_tt_ranks(spec: FactorizeSpec, out_modes: list[int], in_modes: list[int], name: str) -> list[int]:
    """One rank for every bond, capped at each bond's full rank; from `ratio`, the largest such rank
    whose cores hold at most that fraction of the dense parameters."""
    full = full_tt_ranks(out_modes, in_modes)
    if spec.rank is not None:
        if spec.rank > max(full):
            raise FactorizeError(f"factorize.rank={spec.rank} is above the full TT-rank {max(full)} of {name} "
                                 f"(modes {out_modes} x {in_modes}); use 1..{max(full)}")
        return [min(spec.rank, f) for f in full]
    budget = spec.ratio * math.prod(out_modes) * math.prod(in_modes)
    best = None
    for rank in range(1, max(full) + 1):
        ranks = [min(rank, f) for f in full]
        if tt_parameters(out_modes, in_modes, ranks) > budget:
            break
        best = ranks
    if best is None:
        raise FactorizeError(f"factorize.ratio={spec.ratio} leaves less than TT-rank 1 for {name} "
                             f"(modes {out_modes} x {in_modes}); raise it or change factorize.tt_shapes")
    return best


@torch.no_grad()
def input_grams(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per named Linear, sum of x x^T over every input token of `batches` (float64)."""
    grams: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # (input, its gram): gate/up and q/k/v read the same tensor

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            if args[0] is not last[0]:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                last[:] = [args[0], (x.T @ x).double()]  # one batch in float32, the sum in float64
            grams[name] = grams.get(name, 0) + last[1]
        return accumulate

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        last.clear()
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return grams


def plan_layouts(model: nn.Module, spec: FactorizeSpec) -> dict[str, dict]:
    """{module name: layout} for every selected Linear; every setting checked before any work."""
    names = select_targets(model, spec)
    linears = {name: model.get_submodule(name) for name in names}
    if spec.method == "tensor_train":
        check_tt_shapes(spec, {d for m in linears.values() for d in (m.in_features, m.out_features)})
    layouts = {}
    for name, linear in linears.items():
        if spec.method == "low_rank":
            layouts[name] = {"kind": "low_rank", "rank": choose_low_rank(spec, linear.out_features,
                                                                         linear.in_features, name)}
        else:
            out_modes, in_modes = tt_modes(spec, linear.out_features), tt_modes(spec, linear.in_features)
            layouts[name] = {"kind": "tensor_train", "in_modes": in_modes, "out_modes": out_modes,
                             "ranks": choose_tt_ranks(spec, out_modes, in_modes, name)}
    return layouts


@torch.no_grad()
def factorize_model(model: nn.Module, spec: FactorizeSpec,
                    batches: list[torch.Tensor] | None = None) -> list[Factorized]:
    """Factorize in place per `spec`; `batches` (input ids) are the calibration text that
    activation-aware low-rank needs. Returns one report entry per layer."""
    spec.validate()
    layouts = plan_layouts(model, spec)
    if spec.activation_aware and not batches:
        raise FactorizeError("factorize.activation_aware=true needs calibration text (calibration_tokens > 0)")
    grams = input_grams(model, list(layouts), batches) if spec.activation_aware else {}
    report = []
    for name, layout in layouts.items():
        linear = model.get_submodule(name)
        w = linear.weight.detach()
        if layout["kind"] == "low_rank":
            u, v, dropped = low_rank_factors(w, layout["rank"], grams.get(name))
            # relative to ||W L|| (the outputs' norm on the calibration text) when whitened
            scale = torch.trace(w.double() @ grams[name] @ w.double().T).sqrt() if name in grams else w.norm()
            factors = {"u": u, "v": v}
        else:
            cores, dropped = tt_svd(w, layout["out_modes"], layout["in_modes"], layout["ranks"])
            scale = w.to(cores[0].dtype).norm()
            factors = {f"cores.{k}": core for k, core in enumerate(cores)}
        rebuild_factorized(model, {name: layout})
        module = model.get_submodule(name)
        module.load_state_dict({k: t.to(w.dtype) for k, t in factors.items()}, strict=False)
        dense = linear.in_features * linear.out_features
        kept = sum(p.numel() for n, p in module.named_parameters() if n != "bias")
        report.append(Factorized(name, layout, dense, kept, float(dropped.norm() / scale.clamp_min(1e-30))))
    record(model, layouts)
    return report


def record(model: nn.Module, layouts: dict[str, dict]) -> None:
    """Add `layouts` to the spec's `factorized` record (an original model gets method=softmax,
    which changes nothing else, so loading it rebuilds the factorized layers)."""
    spec = recorded_spec(model) or LinearizeSpec(method="softmax")
    spec.factorized = {**spec.factorized, **layouts}
    record_spec(model, spec)


def apply_record(model: nn.Module, layouts: dict[str, dict]) -> None:
    """Empty factorized layers per a record (for a copy whose factors will be loaded), recorded."""
    rebuild_factorized(model, layouts)
    record(model, layouts)


def factorized_fraction(model: nn.Module) -> dict[str, int]:
    """Parameters in factorized layers' factors, and of the dense weights they replaced."""
    kept = dense = 0
    for module in model.modules():
        if isinstance(module, (LowRankLinear, TensorTrainLinear)):
            kept += sum(p.numel() for n, p in module.named_parameters() if n != "bias")
            dense += module.in_features * module.out_features
    return {"factor_parameters": kept, "dense_parameters": dense}
