"""The model a recipe trains or saves, built from a loaded model in explicit steps.

`build_model(model, plan, calibration)` runs `STEPS` in order, each reading only its own part of
the `BuildPlan`:

1. `skip`: remove `n` more attention sublayers chosen by `select` (LLM-Drop similarity or the last
   ones), measured on the softmax model before conversion, as `supra skip` would;
2. `convert`: linearize with the plan's method keys, or keep `softmax_auto` K layers as softmax,
   chosen by measurement (softmax_select.choose_softmax_layers); on a model already converted,
   give layers back their softmax attention instead (a list, or auto:K measured on it as a trained
   student: softmax_select.restore_softmax_layers), or set its sparse cache (`cache_budget`);
3. `factorize`: replace linear layers by factors (factorize.py), or rebuild recorded layouts empty
   for factors about to be loaded;
4. `lora`: wrap the model with LoRA adapters (B = 0: they change nothing until trained).

It returns the model and the spec recorded in it. `plan.resolved(spec)` is the plan that builds the
same module tree again without measuring anything (uptrain's FSDP rebuild for the final save): the
measured choices become explicit lists. No step writes into the plan or a recipe.

Adding a step: a function `(model, plan, context) -> model` in `STEPS`, its settings as a field of
`BuildPlan` (read from the recipe in `supra/commands/settings.py`), and a test in tests/test_build.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .config import ConfigError
from .factorize import apply_record, factorize_model, plan_layouts
from .layers.linearize import LinearizeSpec, linearize, recorded_spec, set_cache
from .layers.specs import CACHE_OPTIONS, FactorizeSpec
from .models import SourceError
from .softmax_select import choose_softmax_layers, converted_layers, restore_layers, restore_softmax_layers
from .train.stages import LoraSpec, add_lora

# Calibration text on demand (rows of token ids, in batches): only steps that measure call it.
Calibration = Callable[[], list[torch.Tensor]]


@dataclass
class BuildPlan:
    """Every step's settings. `conversion` holds the method keys with explicit layer lists (None:
    no skip or conversion step)."""

    conversion: LinearizeSpec | None = None
    softmax_auto: int | None = None  # auto:K: K softmax layers chosen by measurement
    n: int = 0  # attention sublayers to skip besides conversion.skip_layers, chosen by `select`
    select: str = "similarity"
    factorize: FactorizeSpec = field(default_factory=FactorizeSpec)
    factorized: dict[str, dict] = field(default_factory=dict)  # recorded layouts to rebuild empty
    lora: LoraSpec | None = None
    source: str = "the model"  # names the model in messages
    keep_cache: bool = False  # no cache_budget given: a converted model keeps its own sparse cache

    def for_source(self, source: LinearizeSpec | None) -> BuildPlan:
        """This plan for a model whose recorded conversion is `source`: with keep_cache, a converted
        model's sparse cache settings replace the plan's (`supra convert model=RUN/model
        softmax_layers=...` keeps the cache the model was saved with)."""
        if not self.keep_cache or self.conversion is None or not _converted(source):
            return replace(self, keep_cache=False)
        cache = {name: getattr(source, name) for name in CACHE_OPTIONS}
        return replace(self, conversion=replace(self.conversion, **cache), keep_cache=False)

    def resolved(self, spec: LinearizeSpec) -> BuildPlan:
        """This plan with the results of its measurements (`spec`, what `build_model` returned) in
        place of the measurements and factors to be loaded in place of the factorization."""
        conversion = copy.deepcopy(self.conversion)
        if conversion is None:
            return replace(self, factorize=FactorizeSpec(), factorized=dict(spec.factorized) if spec else {})
        if self.softmax_auto is not None:
            conversion.softmax_layers = list(spec.softmax_layers)
        if self.n:
            conversion.skip_layers = list(spec.skip_layers)
        return replace(self, conversion=conversion, softmax_auto=None, n=0, factorize=FactorizeSpec(),
                       factorized=dict(spec.factorized))


def student_plan(plan: BuildPlan) -> BuildPlan:
    """What uptrain's stages train: with softmax_layers=auto:K every layer converted (the K softmax
    layers are chosen on the trained student, after the stages), and no sparse cache: it is
    training-free (LoLA), so the stages train the same maps whatever the budget, and the trained
    model takes it at the end (`with_cache`), as `supra convert cache_budget=C` would."""
    conversion = plan.conversion and plan.conversion.without_cache()
    return replace(plan, softmax_auto=None, conversion=conversion, keep_cache=False)


def with_cache(model: nn.Module, plan: BuildPlan) -> nn.Module:
    """A trained student with the plan's sparse cache (`student_plan` trains without it)."""
    if plan.conversion is not None and plan.conversion.cache_budget:
        set_cache(model, plan.conversion)
    return model


@dataclass
class BuildContext:
    calibration: Calibration | None
    report: Callable[[str], None] | None

    def batches(self, why: str) -> list[torch.Tensor]:
        if self.calibration is None:
            raise ConfigError(f"{why} measures layers on calibration text here; "
                              "run `supra convert` with it first and use its output")
        return self.calibration()


def build_model(model: nn.Module, plan: BuildPlan, calibration: Calibration | None = None,
                report: Callable[[str], None] | None = None) -> tuple[nn.Module, LinearizeSpec | None]:
    """Run every step of `plan` on `model` (in place where the step allows); returns the model and
    its recorded spec (None for a model no step touched)."""
    context = BuildContext(calibration, report)
    plan = plan.for_source(recorded_spec(model))
    for step in STEPS:
        model = step(model, plan, context)
    return model, recorded_spec(model)


def _converted(spec: LinearizeSpec | None) -> bool:
    return spec is not None and spec.method != "softmax"


def check_convertible(previous: LinearizeSpec | None, plan: BuildPlan) -> None:
    """Refuse to convert a model that is already converted (`previous`: its recorded spec); commands
    call this before writing anything. Softmax layers on it give layers back their softmax attention,
    and method=softmax keeps it as it is (to train it further)."""
    if not _converted(previous) or plan.conversion is None:
        return
    if plan.n > 0:
        raise SourceError(f"model {plan.source} is already converted (method={previous.method}); skip layers of "
                          "the original model (n=...) before converting it, or pass n=0")
    restoring = plan.conversion.softmax_layers or plan.softmax_auto is not None
    if plan.conversion.method != "softmax" and not restoring:
        raise SourceError(f"model {plan.source} is already converted (method={previous.method}); pass "
                          "method=softmax to keep training it as it is, or convert the original model instead")


def skip_step(model: nn.Module, plan: BuildPlan, context: BuildContext) -> nn.Module:
    """`n` attention sublayers chosen on the softmax model (conversion.skip_layers go first)."""
    from .skip import select_and_skip  # supra.skip imports the data pipeline; only needed here

    if plan.conversion is None or plan.n <= 0:
        return model
    if context.calibration is None:
        raise ConfigError(f"n={plan.n} (skip by select={plan.select}) needs calibration text here; "
                         "run `supra skip` first and convert its output")
    check_convertible(recorded_spec(model), plan)
    select_and_skip(model, plan.conversion.skip_layers, plan.conversion.softmax_layers, plan.n, plan.select,
                    context.calibration)
    return model


def convert_step(model: nn.Module, plan: BuildPlan, context: BuildContext) -> nn.Module:
    """Linearize a softmax model (skips it holds are kept); a converted one goes to `_on_converted`:
    converting twice would stack feature maps."""
    if plan.conversion is None:
        return model
    previous = recorded_spec(model)
    if _converted(previous):
        return _on_converted(model, plan, previous, context)
    spec = copy.deepcopy(plan.conversion)
    if previous is not None:
        spec.skip_layers = sorted(set(spec.skip_layers) | set(previous.skip_layers))
        spec.factorized = previous.factorized
    try:
        if plan.softmax_auto is None:
            return linearize(model, spec)
        batches = context.batches(f"softmax_layers=auto:{plan.softmax_auto}")
        choose_softmax_layers(model, spec, plan.softmax_auto, batches)
    except ValueError as err:  # e.g. a layer index the model does not have
        raise ConfigError(str(err)) from None
    return model


def _on_converted(model: nn.Module, plan: BuildPlan, previous: LinearizeSpec, context: BuildContext) -> nn.Module:
    """A converted model can take another sparse cache, more skipped sublayers, and layers given back
    their softmax attention; anything else needs method=softmax (it stays as it is, to be trained
    further). The method keys describe a conversion from softmax: on a converted model softmax
    layers can only mean layers given back their softmax attention."""
    from .skip import apply_skip

    new_cache = any(getattr(plan.conversion, name) != getattr(previous, name) for name in CACHE_OPTIONS)
    restore = bool(plan.conversion.softmax_layers) or plan.softmax_auto is not None
    if not (new_cache or restore):
        check_convertible(previous, plan)
    try:
        if new_cache:  # the sparse cache is training-free (LoLA): a trained model takes one as it is
            set_cache(model, plan.conversion)
        if plan.conversion.skip_layers:
            apply_skip(model, list(plan.conversion.skip_layers))
        if plan.softmax_auto is not None:
            batches = context.batches(f"softmax_layers=auto:{plan.softmax_auto}")
            restore_softmax_layers(model, plan.softmax_auto, batches, context.report)
        elif restore:
            restore_layers(model, list(plan.conversion.softmax_layers))
    except ValueError as err:  # e.g. a layer index the model does not have
        raise ConfigError(str(err)) from None
    return model


def factorize_step(model: nn.Module, plan: BuildPlan, context: BuildContext) -> nn.Module:
    """The factorization the plan asks for; on the meta device (a dry run) only its layouts, which
    need shapes alone. Recorded layouts (`plan.factorized`) are rebuilt empty."""
    if plan.factorized:
        apply_record(model, plan.factorized)
    if plan.factorize.method == "none":
        return model
    if next(model.parameters()).is_meta:
        apply_record(model, plan_layouts(model, plan.factorize))
        return model
    batches = context.batches("factorize.activation_aware=true") if plan.factorize.activation_aware else None
    factorize_model(model, plan.factorize, batches)
    return model


def lora_step(model: nn.Module, plan: BuildPlan, context: BuildContext) -> nn.Module:
    return model if plan.lora is None else add_lora(model, plan.lora)


STEPS: tuple[Callable[[nn.Module, BuildPlan, BuildContext], nn.Module], ...] = (
    skip_step, convert_step, factorize_step, lora_step)


def check_softmax_k(model: nn.Module, k: int) -> None:
    """auto:K after training: a K that cannot be met stops the run before training, not after."""
    from .softmax_select import check_k

    try:
        check_k(k, len(converted_layers(model)))
    except ValueError as err:
        raise ConfigError(str(err)) from None
