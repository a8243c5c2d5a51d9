"""Every method's layer in a bf16 model through the Triton wrappers (backend=triton, the interpreter on
CPU): the dtypes a bf16 GPU run passes the kernels (float32 feature maps beside bf16 values, ...) are
the ones tested here. Forward and backward against the same model in float32 through the torch forms."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from supra.layers.linearize import LinearizeSpec, linearize

SPECS = {
    "supra": {"method": "supra"},
    "lolcats": {"method": "lolcats", "window_kind": "terrace", "sinks": 2},
    "t2r": {"method": "t2r"},
    "gla": {"method": "gla"},
    "gdn": {"method": "gdn"},
}


def converted(spec: dict, backend: str, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=53, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    linearize(model, LinearizeSpec(**{"window": 8, **spec, "backend": backend}))
    return model.to(dtype)


@pytest.mark.parametrize("name", list(SPECS))
def test_bf16_layer_through_triton(name):
    ids = torch.randint(0, 53, (2, 40), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for backend, dtype in (("triton", torch.bfloat16), ("torch", torch.float32)):
        model = converted(SPECS[name], backend, dtype)
        logits = model(ids).logits
        logits.float().square().mean().backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        outputs[backend] = (logits.float(), grad.float())
    for got, want in zip(outputs["triton"], outputs["torch"]):
        assert torch.isfinite(got).all()
        assert ((got - want).norm() / want.norm()).item() < 0.05, name
