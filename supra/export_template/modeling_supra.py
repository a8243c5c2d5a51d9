"""Modeling code of a model exported by `supra export`: loads with transformers and torch only.

    AutoModelForCausalLM.from_pretrained(this_directory, trust_remote_code=True)

The model is the base architecture recorded in config.json (llama, mistral or qwen2) with its
attention swapped by `linearize`, from the very layer files supra itself uses, copied beside this
file as supra_<name>.py (linearize, attention, feature_maps, cache and the kernels). `config.supra`
records how (a `LinearizeSpec`): method, feature maps, softmax (hybrid) layers, skipped attention
sublayers, factorized weights.

generate() prefills the prompt in one chunked pass and then decodes from the recurrent state, so
memory per sequence stays constant; greedy and sampling work, with left padding for batches. Beam
search and assisted decoding would need to copy or rewind the state and are refused.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .linearize import LinearizeSpec, linearize, recorded_spec

# Written by `supra export`: the architecture this checkpoint was converted from.
BASE_MODEL_TYPE = "llama"

_BASES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
BaseConfig, BaseForCausalLM = _BASES[BASE_MODEL_TYPE]


class SupraConfig(BaseConfig):
    """The base config plus `supra` (the conversion spec). model_type stays the base's, so that
    transformers without trust_remote_code, and supra itself, still read this config."""

    def __init__(self, supra: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supra = dict(supra or {})


class SupraForCausalLM(BaseForCausalLM):
    """The base causal LM with recurrent attention; parameter names are the base's plus the
    feature maps, exactly as supra saved them."""

    config_class = SupraConfig

    def __init__(self, config: SupraConfig) -> None:
        super().__init__(config)
        linearize(self, recorded_spec(config) or LinearizeSpec(method="softmax"))  # no record: the base model

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise ValueError("beam search is not supported by recurrent attention models (the state cannot be "
                             "reordered cheaply); use greedy decoding or sampling (num_beams=1)")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
            raise ValueError("assisted/speculative decoding is not supported: a recurrent state cannot be rewound")
        return super().generate(*args, **kwargs)
