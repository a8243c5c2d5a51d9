"""The model builder (supra/build.py) and the stage registry (supra/train/stages.py): the rebuild of a
measured build matches it without measuring, no step writes into the recipe, and every stage kind
owns its settings."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from supra.build import STEPS, BuildPlan, build_model
from supra.commands.settings import build_plan, train_config
from supra.config import ConfigError, load_config
from supra.layers.linearize import LinearizeSpec, decoder_layers
from supra.layers.specs import FactorizeSpec
from supra.models import SourceError, load_model
from supra.train.settings import StageConfig
from supra.train.stages import STAGE_KINDS, LoraSpec, check_stage

ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": True}


def tiny(meta: bool = False) -> torch.nn.Module:
    return load_model("random", architecture=ARCH, meta=meta)


def calibration() -> list[torch.Tensor]:
    return list(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)).split(2))


def kinds(model: torch.nn.Module) -> list[str]:
    return [type(layer.self_attn).__name__ for layer in decoder_layers(model)]


def test_the_resolved_plan_rebuilds_the_measured_model_without_measuring():
    plan = BuildPlan(LinearizeSpec(method="lolcats", window=4), softmax_auto=1, n=1, select="similarity",
                     factorize=FactorizeSpec(method="low_rank", rank=2, layers=[2]),
                     lora=LoraSpec(2, 4, 0.0, ("q_proj",)))
    first, spec = build_model(tiny(), plan, calibration)
    rebuild = plan.resolved(spec)
    assert (rebuild.softmax_auto, rebuild.n, rebuild.factorize.method) == (None, 0, "none")
    second, again = build_model(tiny(), rebuild)  # no calibration: nothing is measured
    assert kinds(second) == kinds(first)
    assert {n: p.shape for n, p in second.state_dict().items()} == {n: p.shape for n, p in first.state_dict().items()}
    assert (again.softmax_layers, again.skip_layers, again.factorized) == (
        spec.softmax_layers, spec.skip_layers, spec.factorized)
    assert plan.conversion.softmax_layers == [] and plan.conversion.skip_layers == []  # the plan is unchanged


def test_no_step_writes_into_the_recipe():
    cfg = load_config(["recipe=tiny", "architecture.num_hidden_layers=3", "softmax_layers=auto:1"])
    before = OmegaConf.to_container(cfg)
    build_model(tiny(), build_plan(cfg), calibration)
    assert OmegaConf.to_container(cfg) == before


def test_measuring_steps_need_calibration_text_and_a_converted_model_is_not_converted_again():
    with pytest.raises(ConfigError, match="calibration text"):
        build_model(tiny(), BuildPlan(LinearizeSpec(method="supra"), softmax_auto=1))
    converted, _ = build_model(tiny(), BuildPlan(LinearizeSpec(method="supra")))
    with pytest.raises(SourceError, match="already converted"):
        build_model(converted, BuildPlan(LinearizeSpec(method="gdn")))
    restored, spec = build_model(converted, BuildPlan(LinearizeSpec(method="softmax", softmax_layers=[1])))
    assert kinds(restored) == ["SupraAttention", "LlamaAttention", "SupraAttention"] and spec.softmax_layers == [1]


def test_on_the_meta_device_factorization_plans_its_layouts_only():
    plan = BuildPlan(LinearizeSpec(method="supra", skip_layers=[0]), factorize=FactorizeSpec(method="low_rank", rank=2))
    model, spec = build_model(tiny(meta=True), plan)
    assert spec.factorized and all(p.is_meta for p in model.parameters())
    assert kinds(model)[0] == "SkippedAttention"


def test_a_plan_without_conversion_leaves_the_model_alone():
    model = tiny()
    assert build_model(model, BuildPlan()) == (model, None)
    assert len(STEPS) == 4


def test_every_stage_kind_owns_its_settings():
    defaults = StageConfig()
    for name in STAGE_KINDS:
        check_stage(replace(defaults, name=name))
    with pytest.raises(ValueError, match="stage full: epochs is for attention_transfer only"):
        check_stage(replace(defaults, name="full", epochs=2))
    with pytest.raises(ValueError, match="stage lora: ce_weight is for distill only"):
        check_stage(replace(defaults, name="lora", ce_weight=0.5))
    with pytest.raises(ValueError, match="unknown stage distill train 'some'"):
        check_stage(replace(defaults, name="distill", train="some"))
    with pytest.raises(ConfigError, match="block_layers is for attention_transfer only"):
        load_config(["recipe=tiny", "train.stages=[{name: lora, block_layers: 2}]"])


def test_the_first_stage_that_trains_lora_gives_the_adapters():
    cfg = load_config(["recipe=tiny", "train.stages=[{name: attention_transfer}, {name: distill, train: lora, "
                       "lora_r: 4}, {name: lora, lora_r: 2}]"])
    assert LoraSpec.of_stages(train_config(cfg).stages).r == 4
    assert replace(build_plan(cfg, lora=True), lora=None).lora is None
    assert build_plan(cfg).lora is None


def test_every_method_name_builds_a_layer():
    """The settings name the methods without importing torch (layers/specs.py); the layers are here."""
    from supra.layers.linearize import METHODS
    from supra.layers.specs import METHOD_NAMES

    assert (*METHODS, "softmax") == METHOD_NAMES
