"""Weight factorisation: the decompositions against their float64 definitions, the factorized
forward against x @ W^T, and a factorized + converted model through save, export and uptrain."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig

from supra.cli import main
from supra.export import export
from supra.factorize import factorize_model
from supra.layers.factorized import (
    LowRankLinear,
    TensorTrainLinear,
    balanced_modes,
    factor_parameter_names,
    full_tt_ranks,
    low_rank_factors,
    tt_svd,
)
from supra.layers.linearize import linearize, recorded_spec
from supra.layers.specs import FactorizeSpec, LinearizeSpec
from supra.models import load_model
from supra.skip import apply_skip

ARCH = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
TINY = ["recipe=tiny", "train.eval_baselines=false", "train.sample_tokens=0", "train.logger=none"]


def weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def low_rank_module(w: torch.Tensor, rank: int, bias: bool = True) -> LowRankLinear:
    u, v, _ = low_rank_factors(w, rank)
    module = LowRankLinear(w.shape[1], w.shape[0], rank, torch.nn.Parameter(torch.randn(w.shape[0], dtype=w.dtype))
                           if bias else None, dtype=w.dtype)
    module.load_state_dict({"u": u, "v": v}, strict=False)
    return module


def tt_module(w: torch.Tensor, out_modes: list[int], in_modes: list[int], ranks: list[int]) -> TensorTrainLinear:
    cores, _ = tt_svd(w, out_modes, in_modes, ranks)
    module = TensorTrainLinear(in_modes, out_modes, ranks, torch.nn.Parameter(torch.randn(w.shape[0], dtype=w.dtype)),
                               dtype=w.dtype)
    module.load_state_dict({f"cores.{k}": c for k, c in enumerate(cores)}, strict=False)
    return module


def test_full_rank_reproduces_the_weight_exactly():
    w = weight(23, 37)
    u, v, dropped = low_rank_factors(w, 23)
    assert dropped.numel() == 0 and torch.allclose(u @ v, w, atol=1e-12)
    w2 = weight(24, 30, seed=1)
    for out_modes, in_modes in (([2, 3, 4], [5, 3, 2]), ([4, 6], [6, 5]), ([1, 2, 3, 4], [2, 1, 5, 3])):
        module = tt_module(w2, out_modes, in_modes, full_tt_ranks(out_modes, in_modes))
        assert torch.allclose(module.to_dense(), w2, atol=1e-12), (out_modes, in_modes)


@pytest.mark.parametrize("rank", [1, 4, 11])
def test_svd_error_is_the_discarded_singular_values(rank):
    w = weight(19, 29, seed=rank)
    u, v, dropped = low_rank_factors(w, rank)
    assert torch.allclose((w - u @ v).norm(), dropped.norm(), rtol=1e-10)
    assert torch.allclose(dropped, torch.linalg.svdvals(w)[rank:])


def test_whitened_svd_error_is_the_output_error_on_the_calibration_inputs():
    """SVD-LLM: with L L^T = X^T X the discarded values of W L are ||(W - U V) X^T||_F, and no
    rank-r matrix does better on X than that (the plain SVD's is larger)."""
    w, rank = weight(16, 24), 5
    x = torch.randn(200, 24, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    u, v, dropped = low_rank_factors(w, rank, gram=x.T @ x, eps=0.0)
    output_error = ((w - u @ v) @ x.T).norm()
    assert torch.allclose(output_error, dropped.norm(), rtol=1e-8)
    u0, v0, _ = low_rank_factors(w, rank)
    assert output_error < ((w - u0 @ v0) @ x.T).norm()


def test_whitening_survives_fewer_calibration_tokens_than_input_channels():
    """Gram of rank 10 < 24 channels: singular, so the eps shift must keep Cholesky going (in float32
    weights, as a model has them), and the result still fits the seen inputs better than plain SVD."""
    w, x = weight(16, 24).float(), torch.randn(10, 24)
    u, v, _ = low_rank_factors(w, 5, gram=(x.T @ x).double())
    u0, v0, _ = low_rank_factors(w, 5)
    assert torch.isfinite(u @ v).all()
    assert ((w - (u @ v).float()) @ x.T).norm() < ((w - u0 @ v0) @ x.T).norm()
    indefinite = (x.T @ x).double() - 1e-3 * torch.eye(24, dtype=torch.float64)  # float32 sums can be
    assert torch.isfinite(low_rank_factors(w, 5, gram=indefinite)[0]).all()


@pytest.mark.parametrize("ranks", [[1, 1], [3, 5], [6, 2]])
def test_tt_svd_error_is_the_discarded_singular_values(ranks):
    w = weight(30, 24, seed=sum(ranks))
    out_modes, in_modes = [2, 5, 3], [3, 2, 4]
    cores, dropped = tt_svd(w, out_modes, in_modes, ranks)
    module = tt_module(w, out_modes, in_modes, ranks)
    assert torch.allclose((w - module.to_dense()).norm(), dropped.norm(), rtol=1e-10)
    # the first step is a plain SVD of the (m_1 n_1) x rest matricisation
    first = w.reshape(2, 5, 3, 3, 2, 4).permute(0, 3, 1, 4, 2, 5).reshape(6, -1)
    assert torch.allclose(dropped[: 6 - ranks[0]], torch.linalg.svdvals(first)[ranks[0]:])


@pytest.mark.parametrize("kind", ["low_rank", "tensor_train"])
def test_factorized_forward_is_x_times_dense_transposed(kind):
    w = weight(30, 24)
    module = low_rank_module(w, 7) if kind == "low_rank" else tt_module(w, [2, 5, 3], [3, 2, 4], [4, 5])
    x = torch.randn(3, 11, 24, dtype=torch.float64)  # odd length, extra batch dimensions
    expected = x @ module.to_dense().T + module.bias
    assert torch.allclose(module(x), expected, atol=1e-12)
    assert module(x[0, :1]).shape == (1, 30)


@pytest.mark.parametrize("kind", ["low_rank", "tensor_train"])
def test_gradients_reach_the_factors_and_match_the_dense_path(kind):
    w = weight(30, 24)
    module = low_rank_module(w, 7) if kind == "low_rank" else tt_module(w, [2, 5, 3], [3, 2, 4], [4, 5])
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 30, dtype=torch.float64)
    factors = [p for n, p in module.named_parameters() if n != "bias"]
    ((module(x) - target) ** 2).sum().backward()
    fast = [p.grad.clone() for p in factors] + [x.grad.clone()]
    module.zero_grad()
    x.grad = None
    ((x @ module.to_dense().T + module.bias - target) ** 2).sum().backward()
    for got, want in zip(fast, [p.grad for p in factors] + [x.grad]):
        assert got.abs().sum() > 0 and torch.allclose(got, want, atol=1e-10)


def test_balanced_modes():
    assert balanced_modes(576, 3) == [8, 8, 9]
    assert balanced_modes(1536, 3) == [8, 12, 16]
    assert balanced_modes(13, 2) == [1, 13]


def tiny_model(model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return load_model("random", architecture={"model_type": model_type, **ARCH}).eval()


def test_factorize_records_and_reloads(tmp_path, smollm2_tokenizer):
    """Low-rank MLPs, tensor-train attention projections (with qwen2's q/k/v biases), then
    conversion: a save reloads as the same model, and the factors are what lora trains."""
    model = tiny_model("qwen2")
    factorize_model(model, FactorizeSpec(method="low_rank", ratio=0.5, layers=[0, 2]))
    factorize_model(model, FactorizeSpec(method="tensor_train", targets=["self_attn.[qk]_proj"], rank=3, tt_cores=2))
    linearize(model, LinearizeSpec(method="lolcats", window=8, factorized=recorded_spec(model).factorized))
    record = recorded_spec(model).factorized
    assert sorted(record) == sorted([f"model.layers.{i}.mlp.{p}_proj" for i in (0, 2) for p in ("gate", "up", "down")]
                                    + [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qk"])
    assert isinstance(model.model.layers[1].self_attn.q_proj, TensorTrainLinear)
    assert model.model.layers[1].self_attn.q_proj.bias is not None
    apply_skip(model, [1])  # its factorized q/k projections go with it
    model.save_pretrained(tmp_path / "m")
    reloaded = load_model(str(tmp_path / "m")).eval()
    ids = smollm2_tokenizer("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    names = factor_parameter_names(reloaded)
    assert len(names) == 2 * 6 + 2 * 4 and "model.layers.0.mlp.up_proj.u" in names
    assert "model.layers.1.self_attn.q_proj" not in recorded_spec(reloaded).factorized


def test_factorized_converted_export_loads_without_supra_and_generates_exactly(tmp_path, smollm2_tokenizer):
    model = tiny_model()
    linearize(model, LinearizeSpec(method="lolcats", window=8, skip_layers=[1]))
    factorize_model(model, FactorizeSpec(method="low_rank", ratio=0.6))
    factorize_model(model, FactorizeSpec(method="tensor_train", targets=["self_attn.o_proj"], ratio=0.5))
    out = export(copy.deepcopy(model), smollm2_tokenizer, tmp_path / "hf", dtype="float32")
    assert (out / "supra_factorized.py").exists()
    ids = smollm2_tokenizer("import os\nprint(", return_tensors="pt").input_ids
    script = textwrap.dedent("""
        import sys
        sys.modules["supra"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
        ids = torch.load(sys.argv[2])
        with torch.no_grad():
            logits = model(ids).logits
        torch.save({"logits": logits, "greedy": model.generate(ids, max_new_tokens=8, do_sample=False),
                    "kinds": sorted({type(m).__name__ for m in model.modules()})}, sys.argv[3])
    """)
    (tmp_path / "load.py").write_text(script)
    torch.save(ids, tmp_path / "ids.pt")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-s", str(tmp_path / "load.py"), str(out), str(tmp_path / "ids.pt"),
               str(tmp_path / "out.pt")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert {"LowRankLinear", "TensorTrainLinear"} <= set(got["kinds"])
    with torch.no_grad():
        assert torch.allclose(got["logits"], model(ids).logits, atol=1e-5)
    assert torch.equal(got["greedy"], model.generate(ids, max_new_tokens=8, do_sample=False))


def test_cli_factorize_then_convert_then_uptrain_which_heals_the_factors(tmp_path):
    factorized, converted, run = tmp_path / "f", tmp_path / "c", tmp_path / "run"
    assert main(["factorize", "recipe=tiny", "factorize.method=low_rank", "factorize.ratio=0.5",
                 "factorize.activation_aware=true", "calibration_tokens=512", f"out={factorized}"]) == 0
    report = json.loads((factorized / "factorize.json").read_text())
    assert len(report["layers"]) == 6 and report["parameters_after"] < report["parameters_before"]
    assert main(["convert", "recipe=tiny", f"model={factorized}", f"out={converted}"]) == 0
    spec = recorded_spec(AutoConfig.from_pretrained(converted))
    assert spec.method == "lolcats" and len(spec.factorized) == 6
    # healing a converted model: method=softmax converts nothing more
    assert main(["uptrain", *TINY, f"model={converted}", "method=softmax", f"out={run}",
                 "train.stages=[{name: lora, tokens: 1024, lr: 1e-3, warmup_steps: 1}]"]) == 0
    before, after = load_model(str(converted)), load_model(str(run))
    assert recorded_spec(after).method == "lolcats"
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    factors = factor_parameter_names(after)
    assert len(factors) == 12 and all(not torch.equal(old[n], new[n]) for n in factors)
    assert torch.equal(old["model.embed_tokens.weight"], new["model.embed_tokens.weight"])


def test_uptrain_factorizes_converted_layers_before_the_stages(tmp_path):
    run = tmp_path / "run"
    assert main(["uptrain", *TINY, f"out={run}", "factorize.method=tensor_train", "factorize.rank=4",
                 "factorize.targets=[mlp.down_proj,self_attn.v_proj]",
                 "train.stages=[{name: full, tokens: 512, lr: 1e-3, warmup_steps: 1}]"]) == 0
    spec = recorded_spec(AutoConfig.from_pretrained(run / "model"))
    assert spec.method == "lolcats" and len(spec.factorized) == 4


@pytest.mark.parametrize("overrides, message", [
    (["factorize.rank=0"], "factorize.rank must be an integer >= 1"),
    (["factorize.rank=65"], "above full rank 64"),
    (["factorize.rank=4", "factorize.targets=[mlp.nothing*]"], "match no Linear layer"),
    (["factorize.rank=4", "factorize.layers=[7]"], "valid layers are 0..1"),
    (["factorize.rank=4", "factorize.ratio=0.5"], "exactly one of"),
    (["factorize.method=tensor_train", "factorize.rank=2", "factorize.tt_shapes=[[4,4,5]]"], "multiplies to 80"),
    (["factorize.method=tensor_train", "factorize.rank=2", "factorize.tt_shapes=[[8,8]]"], "must be 3 positive"),
    (["factorize.method=tensor_train", "factorize.ratio=0.5", "factorize.activation_aware=true"], "low_rank only"),
    (["factorize.method=svd", "factorize.rank=2"], "valid: none, low_rank, tensor_train"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, overrides, message):
    out = tmp_path / "out"
    method = [] if any("method" in o for o in overrides) else ["factorize.method=low_rank"]
    assert main(["factorize", "recipe=tiny", f"out={out}", *method, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supra: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_dry_run_counts_the_factorized_parameters(capsys):
    def total(*extra: str) -> float:
        assert main(["uptrain", "recipe=llama7b", "train.dry_run=true", "train.world_size=8", *extra]) == 0
        return float(re.search(r"parameters: total ([\d.]+)B", capsys.readouterr().out).group(1))

    mlp = 32 * 3 * 4096 * 11008 / 1e9
    assert total("factorize.method=low_rank", "factorize.ratio=0.5") == pytest.approx(total() - mlp / 2, abs=0.01)
