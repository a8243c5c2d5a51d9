"""`softmax_layers=auto:K`: the K layers kept as softmax are those whose restoration lowers the loss most."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from supra.cli import main
from supra.layers.attention import RecurrentAttention
from supra.layers.linearize import LinearizeSpec, decoder_layers, linearize, recorded_spec
from supra.layers.specs import parse_auto
from supra.models import load_model
from supra.softmax_select import choose_softmax_layers, next_token_loss
from supra.train.transfer import teacher_layers

TINY4 = ["recipe=tiny", "architecture.num_hidden_layers=4", "calibration_tokens=512"]


@pytest.fixture
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return AutoModelForCausalLM.from_config(config).eval()


def test_the_chosen_layers_are_those_whose_restoration_lowers_the_loss_most(llama):
    batches = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    spec = LinearizeSpec(method="gla", window=4, skip_layers=[1])
    model = copy.deepcopy(llama)
    choice = choose_softmax_layers(model, spec, 2, batches)
    restored = {int(i): loss for i, loss in choice["loss_restored"].items()}
    assert sorted(restored) == [0, 2, 3]  # the skipped layer is no candidate
    assert choice["chosen"] == sorted(sorted(restored, key=restored.get)[:2])
    assert recorded_spec(model).softmax_layers == choice["chosen"] and recorded_spec(model).softmax_choice == choice
    # each restored loss is that of the hybrid converted with that one layer kept as softmax
    for i, loss in restored.items():
        hybrid = linearize(copy.deepcopy(llama), LinearizeSpec(method="gla", window=4, skip_layers=[1],
                                                               softmax_layers=[i]))
        assert next_token_loss(hybrid, batches) == pytest.approx(loss, rel=1e-6)
    # and the model handed back is the chosen hybrid (gla's new weights start deterministic)
    expected = linearize(copy.deepcopy(llama), recorded_spec(model))
    assert next_token_loss(model, batches) == pytest.approx(next_token_loss(expected, batches), rel=1e-6)
    kinds = [isinstance(layer.self_attn, RecurrentAttention) for layer in decoder_layers(model)]
    assert kinds == [i not in choice["chosen"] + [1] for i in range(4)]


def test_parse_auto():
    assert parse_auto("auto:3") == 3 and parse_auto([1, 2]) is None
    with pytest.raises(ValueError, match="list of layer indices or auto:K"):
        parse_auto("best")


def test_convert_command_records_the_measured_choice(tmp_path, smollm2_tokenizer):
    out = tmp_path / "hybrid"
    assert main(["convert", *TINY4, "method=gdn", "softmax_layers=auto:1", f"out={out}"]) == 0
    record = json.loads((out / "softmax_layers.json").read_text())
    reloaded = load_model(str(out))
    assert len(record["chosen"]) == 1 and recorded_spec(reloaded).softmax_layers == record["chosen"]
    assert set(record["loss_restored"]) == {"0", "1", "2", "3"}


@pytest.mark.parametrize("value, message", [
    ("softmax_layers=best", "softmax_layers must be a list of layer indices or auto:K"),
    ("softmax_layers=[a,1]", "softmax_layers[0] must be an integer >= 0"),
    ("softmax_layers=auto:5", "softmax_layers=auto:5 is out of range: 4 layers are converted, so K must be in 0..4"),
])
def test_bad_auto_requests_are_one_line_errors(value, message, tmp_path, capsys, smollm2_tokenizer):
    out = tmp_path / "never"
    assert main(["convert", *TINY4, "method=gla", value, f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_uptrain_measures_auto_on_the_trained_student_and_a_rerun_only_measures_again(tmp_path, monkeypatch,
                                                                                      smollm2_tokenizer):
    run = tmp_path / "run"
    command = ["uptrain", *TINY4, "method=gla", "softmax_layers=auto:1", "train.eval_baselines=false",
               "train.sample_tokens=0", "train.logger=none", f"out={run}"]
    assert main(command) == 0
    record = json.loads((run / "softmax_layers.json").read_text())
    assert set(record["kl_restored"]) == {"0", "1", "2", "3"} and len(record["chosen"]) == 1
    # the stages trained every layer converted; the run's model is that student with the chosen layer restored
    assert recorded_spec(load_model(str(run / "student"))).softmax_layers == []
    hybrid = load_model(str(run / "model"))
    assert recorded_spec(hybrid).softmax_layers == record["chosen"]
    assert [isinstance(layer.self_attn, RecurrentAttention) for layer in decoder_layers(hybrid)] == \
        [i not in record["chosen"] for i in range(4)]

    def train_again(*args, **kwargs):
        raise AssertionError("a run stopped while measuring must not train again")

    first = (run / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "model")  # as if it had been stopped during the measurement
    monkeypatch.setattr("supra.commands.uptrain.train", train_again)
    assert main(command) == 0
    assert (run / "model" / "model.safetensors").read_bytes() == first
    assert json.loads((run / "softmax_layers.json").read_text())["chosen"] == record["chosen"]


def test_uptrain_refuses_an_auto_k_above_the_converted_layers_before_training(tmp_path, capsys, smollm2_tokenizer):
    run = tmp_path / "run"
    assert main(["uptrain", *TINY4, "method=gla", "softmax_layers=auto:5", "train.eval_baselines=false",
                 "train.logger=none", f"out={run}"]) == 2
    err = capsys.readouterr().err
    assert "softmax_layers=auto:5 is out of range" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()


def test_convert_restores_the_layers_of_a_trained_student_that_lower_its_kl_most(tmp_path, capsys,
                                                                                  smollm2_tokenizer):
    student, hybrid = tmp_path / "student", tmp_path / "hybrid"
    # a gdn student, restored with the recipe's method (lolcats) left as it is: it describes no new conversion
    assert main(["convert", *TINY4, "method=gdn", f"out={student}"]) == 0
    capsys.readouterr()
    assert main(["convert", *TINY4, f"model={student}", "softmax_layers=auto:2", f"out={hybrid}"]) == 0
    summary = capsys.readouterr().out
    assert "gdn" in summary and "lolcats" not in summary  # the model's method, not the recipe's
    record = json.loads((hybrid / "softmax_layers.json").read_text())
    kl = {int(i): v for i, v in record["kl_restored"].items()}
    assert sorted(kl) == [0, 1, 2, 3] and record["chosen"] == sorted(sorted(kl, key=kl.get)[:2])

    loaded, before = load_model(str(hybrid)).eval(), load_model(str(student)).eval()
    kinds = [isinstance(layer.self_attn, RecurrentAttention) for layer in decoder_layers(loaded)]
    assert kinds == [i not in record["chosen"] for i in range(4)]
    assert recorded_spec(loaded).softmax_choice["chosen"] == record["chosen"]
    # the restored layers are the student's own q/k/v/o in softmax mode: what the KL was measured with
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), teacher_layers([decoder_layers(before)[i].self_attn for i in record["chosen"]]):
        expected = before(input_ids=ids).logits
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    # and an explicit list restores without measuring; a skipped or missing layer is a one-line error
    listed = tmp_path / "listed"
    assert main(["convert", *TINY4, f"model={student}", "softmax_layers=[1]", f"out={listed}"]) == 0
    assert recorded_spec(load_model(str(listed))).softmax_layers == [1]
    assert main(["convert", *TINY4, f"model={student}", "softmax_layers=[7]", f"out={tmp_path / 'bad'}"]) == 2
