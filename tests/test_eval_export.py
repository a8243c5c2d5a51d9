"""`supra export` loaded where supra is not importable; lm-eval wrapper; passkey; speed."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from supra.cli import main
from supra.errors import UserError
from supra.evaluate.lm_eval_task import SupraLM, run_lm_eval
from supra.evaluate.speed import speed
from supra.export import export, has_lora, merge_lora
from supra.layers.linearize import LinearizeSpec, linearize, new_parameter_names, recorded_spec
from supra.models import SourceError, load_model

ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
CACHE = {"cache_budget": 2, "cache_chunk": 1, "cache_recall": 0.5}  # one pair by attention, one by recall error
CASES = {  # name: (base architecture, conversion)
    "supra": ("llama", LinearizeSpec(method="supra")),
    "lolcats": ("llama", LinearizeSpec(method="lolcats", window=8, state_decay="learned")),
    "t2r": ("llama", LinearizeSpec(method="t2r")),
    "gla": ("llama", LinearizeSpec(method="gla", window=8, window_mix="token")),
    "qwen2-gdn-learned": ("qwen2", LinearizeSpec(method="gdn", gate="learned")),
    "hybrid-skip": ("llama", LinearizeSpec(method="lolcats", window=8, softmax_layers=[0], skip_layers=[2])),
    "qwen2-supra-skip": ("qwen2", LinearizeSpec(method="supra", skip_layers=[1])),
    "mistral-softmax": ("mistral", LinearizeSpec(method="softmax")),
}

# Runs in a fresh interpreter where `import supra` fails and triton is hidden: the export must load
# and run on torch + transformers alone.
ISOLATED = textwrap.dedent("""
    import sys
    sys.modules["supra"] = None
    sys.modules["triton"] = None
    try:
        import supra  # noqa: F401
        raise SystemExit("supra is importable in the isolated interpreter")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM
    inputs = torch.load(sys.argv[1])
    results = {}
    for name, directory in inputs["exports"].items():
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(model).__name__ == "SupraForCausalLM", type(model)
        with torch.no_grad():
            logits = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
        greedy = model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=6, do_sample=False)
        sampled = model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=3, do_sample=True)
        try:
            model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=2, num_beams=2)
            beam = "accepted"
        except ValueError as err:
            beam = str(err)
        results[name] = {"logits": logits, "greedy": greedy, "sampled_shape": tuple(sampled.shape), "beam": beam}
    torch.save(results, sys.argv[2])
""")


def tiny_model(model_type: str, spec: LinearizeSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = load_model("random", architecture={"model_type": model_type, **ARCH}).eval()
    linearize(model, copy.deepcopy(spec))
    with torch.no_grad():  # trained-looking new weights: a reload that re-initialised them would show
        params = dict(model.named_parameters())
        for name in new_parameter_names(model):
            params[name].add_(0.1 * torch.randn_like(params[name]))
    return model


def padded_prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(["def fibonacci(n): return", "import os"], return_tensors="pt", padding=True,
                      padding_side="left")
    return batch["input_ids"], batch["attention_mask"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, smollm2_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("exports")
    models, dirs = {}, {}
    for name, (model_type, spec) in CASES.items():
        models[name] = tiny_model(model_type, spec)
        dirs[name] = export(copy.deepcopy(models[name]), smollm2_tokenizer, root / name, dtype="float32")
    return {"models": models, "dirs": dirs, "root": root}


def test_exports_load_without_supra_and_match(exports, smollm2_tokenizer):
    ids, mask = padded_prompts(smollm2_tokenizer)
    root = exports["root"]
    torch.save({"ids": ids, "mask": mask, "exports": {n: str(d) for n, d in exports["dirs"].items()}}, root / "in.pt")
    (root / "isolated.py").write_text(ISOLATED)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "hf_modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-s", str(root / "isolated.py"), str(root / "in.pt"), str(root / "out.pt")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(root / "out.pt")
    for name, model in exports["models"].items():
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
        got = results[name]["logits"]
        real = mask.bool()  # pad positions' logits are meaningless; compare the real tokens
        error = ((got - expected)[real].norm() / expected[real].norm()).item()
        assert error < 1e-4, f"{name}: relative logit error {error:.2e}"
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(results[name]["greedy"], greedy), name
        assert results[name]["sampled_shape"] == (2, ids.shape[1] + 3)
        assert "beam search is not supported" in results[name]["beam"], name


def test_the_spec_round_trips_through_config_json(tmp_path, monkeypatch):
    """Every field of LinearizeSpec, set away from its default in one of three specs (a sparse cache
    needs the default method, lolcats), comes back from a save (supra's load_model,
    transformers' config) and from an export loaded with trust_remote_code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from supra.factorize import factorize_model
    from supra.layers.specs import FactorizeSpec

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    specs = []
    for name in ("gla", "lolcats-cache", "lolcats-decay"):
        torch.manual_seed(0)
        model = load_model("random", architecture={"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                                                   "num_hidden_layers": 3, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "vocab_size": 128}).eval()
        factorize_model(model, FactorizeSpec(method="low_rank", ratio=0.5, layers=[1], targets=["mlp.up_proj"]))
        if name == "gla":
            spec = LinearizeSpec(method="gla", decay="retnet", gate="learned", feature_dim=8, window=3,
                                 window_kind="terrace", window_mix="token", sinks=2, softmax_layers=[0],
                                 skip_layers=[2], backend="torch",
                                 factorized=recorded_spec(model).factorized,
                                 softmax_choice={"k": 1, "chosen": [0], "loss_restored": {"0": 1.5, "1": 2.5},
                                                 "note": None})
        else:  # lolcats' options: a sparse cache with a decayed state, and a decayed state alone
            spec = LinearizeSpec(window=3, window_kind="terrace", sinks=1, backend="torch",
                                 factorized=recorded_spec(model).factorized,
                                 state_decay="retnet", **(CACHE if name == "lolcats-cache" else {}))
        specs.append(spec)
        linearize(model, copy.deepcopy(spec))
        assert recorded_spec(model) == spec
        ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(ids).logits

        model.save_pretrained(tmp_path / name / "saved")
        assert recorded_spec(AutoConfig.from_pretrained(tmp_path / name / "saved")) == spec
        reloaded = load_model(str(tmp_path / name / "saved")).eval()
        exported = export(copy.deepcopy(model), None, tmp_path / name / "exported", dtype="float32")
        remote = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(remote).__name__ == "SupraForCausalLM"
        for loaded in (reloaded, remote):
            assert recorded_spec(loaded) == spec
            with torch.no_grad():
                torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
    defaults = LinearizeSpec()
    # feature_map_init is for supra/t2r only: gla refuses it (LinearizeSpec.validate), so it keeps its default
    unset = [f.name for f in dataclasses.fields(defaults) if f.name != "feature_map_init"
             and all(getattr(spec, f.name) == getattr(defaults, f.name) for spec in specs)]
    assert not unset, f"give {unset} a non-default value here, so that their round trip is checked"


def test_a_record_from_another_version_still_loads():
    """Keys a newer supra wrote are ignored; keys an older one did not write take their defaults."""
    from transformers import AutoConfig

    spec = LinearizeSpec.from_dict({"method": "t2r", "skip_layers": (1,), "a_field_from_the_future": 3})
    assert spec == LinearizeSpec(method="t2r", skip_layers=[1])
    assert recorded_spec(AutoConfig.for_model("llama")) is None  # supra never touched it


def test_supra_loads_an_export_too(exports, smollm2_tokenizer):
    ids, mask = padded_prompts(smollm2_tokenizer)
    name = "hybrid-skip"
    reloaded = load_model(str(exports["dirs"][name])).eval()
    assert recorded_spec(reloaded).skip_layers == [2]
    with torch.no_grad():
        expected = exports["models"][name](input_ids=ids).logits
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


def test_export_refuses_a_non_empty_directory_and_unmerged_lora(exports, smollm2_tokenizer, tmp_path):
    model = exports["models"]["supra"]
    with pytest.raises(UserError, match="exists and is not empty"):
        export(model, smollm2_tokenizer, exports["dirs"]["supra"])
    assert main(["export", "recipe=tiny", f"model={exports['dirs']['t2r']}", f"out={exports['dirs']['t2r']}"]) == 2

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # B starts at zero: make the adapter change the output
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    with pytest.raises(SourceError, match="merge_lora=true"):
        export(lora.base_model.model, smollm2_tokenizer, tmp_path / "unmerged")
    merged = merge_lora(lora)
    assert not has_lora(merged)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
    export(merged, smollm2_tokenizer, tmp_path / "merged", dtype="bfloat16")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["auto_map"]["AutoModelForCausalLM"].endswith("SupraForCausalLM")


LOCAL_TASK = """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
DOCS = [{"question": "The capital of France is", "choices": ["Paris", "Berlin", "a banana"], "answer": 0},
        {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
        {"question": "The sky is", "choices": ["blue", "made of cheese"], "answer": 0}]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    (root / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_mc.yaml").write_text(LOCAL_TASK.format(data=root / "data.jsonl"))
    return root


def test_lm_eval_wrapper_matches_a_hand_computed_loglikelihood(exports, smollm2_tokenizer, local_task):
    model, tok = exports["models"]["lolcats"], smollm2_tokenizer
    results = run_lm_eval(model, tok, ["tiny_mc"], include_path=str(local_task), batch_size=3, log_samples=True)
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    sample = next(s for s in results["samples"]["tiny_mc"] if s["doc_id"] == 0)
    scored = [resp[0][0] for resp in sample["resps"]]
    # By hand: context "The capital of France is", continuation " Paris"; tokens of the whole
    # string split where the context's tokens end; sum of log p over the continuation's tokens.
    for choice, lm_eval_score in zip(DOCS[0]["choices"], scored):
        context = tok(DOCS[0]["question"], add_special_tokens=False)["input_ids"]
        whole = tok(DOCS[0]["question"] + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
        by_hand = sum(logprobs[t - 1, whole[t]].item() for t in range(len(context), len(whole)))
        assert lm_eval_score == pytest.approx(by_hand, abs=1e-4)
    # Batched and padded scoring agrees with one-at-a-time scoring.
    pairs = [(context, whole[len(context):]), ([1, 2, 3, 4, 5, 6, 7], [8, 9])]
    batched = SupraLM(model, tok, batch_size=2).score_tokens(pairs)
    single = [SupraLM(model, tok, batch_size=1).score_tokens([p])[0] for p in pairs]
    assert [b[0] for b in batched] == pytest.approx([s[0] for s in single], abs=1e-4)


def test_eval_cli_runs_lm_eval_passkey_and_speed_on_an_export(exports, local_task, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "recipe=tiny", f"model={exports['dirs']['supra']}", f"out={out}",
            "tasks=[lm_eval:tiny_mc,passkey,speed]", f"eval.lm_eval_include_path={local_task}",
            "eval.passkey_lengths=[96,160]", "eval.passkey_depths=[0.0,1.0]", "eval.passkey_trials=2",
            "eval.speed_lengths=[16,64]", "eval.speed_decode_tokens=4",
            f"eval.baseline={exports['dirs']['mistral-softmax']}"]
    assert main(args) == 0
    results = json.loads((out / "eval.json").read_text())
    assert 0.0 <= results["lm_eval:tiny_mc"]["tasks"]["tiny_mc"]["acc"] <= 1.0
    grid = results["passkey"]["accuracy"]
    assert len(grid) == 2 and all(len(row) == 2 and all(0.0 <= a <= 1.0 for a in row) for row in grid)
    assert results["passkey"]["prompt_tokens"][1] <= 160
    recurrent, softmax = results["speed"]["points"], results["speed"]["baseline"]["points"]
    assert recurrent[0]["state_bytes"] == recurrent[1]["state_bytes"] > 0  # a fixed-size state
    assert softmax[1]["state_bytes"] > softmax[0]["state_bytes"]  # the KV cache grows with the context
    for png in ("passkey.png", "passkey_baseline.png", "speed.png"):
        assert (out / png).stat().st_size > 1000


def test_recurrent_decode_time_is_flat_in_context(exports):
    """Median per-token decode time at 2048 tokens of context vs 32; the best of three tries, so a
    busy shared machine cannot fail it, while a cost that grows with context fails every try."""
    model = exports["models"]["supra"]
    ratios = []
    for _ in range(3):
        ratios.append(speed(model, [32, 2048], decode_tokens=16)["decode_time_ratio_longest_vs_shortest"])
        if ratios[-1] < 1.5:
            break
    assert min(ratios) < 1.5, ratios


@pytest.mark.slow
def test_smollm2_lolcats_export_loads_without_supra(smollm2, smollm2_tokenizer, tmp_path):
    model = linearize(copy.deepcopy(smollm2), LinearizeSpec(method="lolcats"))
    export(model, smollm2_tokenizer, tmp_path / "smol", dtype="float32")
    ids, mask = padded_prompts(smollm2_tokenizer)
    torch.save({"ids": ids, "mask": mask, "exports": {"smol": str(tmp_path / "smol")}}, tmp_path / "in.pt")
    (tmp_path / "isolated.py").write_text(ISOLATED)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    done = subprocess.run([sys.executable, "-s", str(tmp_path / "isolated.py"), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")["smol"]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert ((result["logits"] - expected)[real].norm() / expected[real].norm()).item() < 1e-4
    assert torch.equal(result["greedy"], model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
