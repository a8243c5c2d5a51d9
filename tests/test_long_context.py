"""The long-context benchmark's switches and its script: the window alone is exactly the sliding-window
softmax and switches back; a changed option rebuilds the layers with their trained weights or is
refused whole; scripts/bench_long_context.py writes its JSON on a tiny model (fields, not timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_layers import tiny_model

from supra.cli import main as supra_main
from supra.layers.attention import repeat_heads, rotate
from supra.layers.linearize import recorded_spec
from supra.layers.switches import respecify, window_alone

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def sliding_window_softmax(layer: torch.nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                           window: int) -> torch.Tensor:
    """The layer's own q/k/v/o with exact softmax over the last `window` tokens, written out."""
    B, T, _ = x.shape
    q = rotate(layer.q_proj(x).view(B, T, layer.num_heads, -1), *rope)
    k = repeat_heads(rotate(layer.k_proj(x).view(B, T, layer.num_kv_heads, -1), *rope), layer.groups)
    v = repeat_heads(layer.v_proj(x).view(B, T, layer.num_kv_heads, -1), layer.groups)
    i = torch.arange(T)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=band)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("method", ["lolcats", "gla", "gdn"])
def test_window_alone_is_the_sliding_window_softmax_and_switches_back(method):
    torch.manual_seed(0)
    model = tiny_model(kv_heads=2, method=method)  # float64, sliding window of 8
    layer = model.get_decoder().layers[1].self_attn
    x = torch.randn(2, 21, 64, dtype=torch.float64)
    rope = model.get_decoder().rotary_emb(x, torch.arange(21)[None])
    with torch.no_grad():
        given, _ = layer(x, rope)
        with window_alone(model) as switched:
            alone, _ = layer(x, rope)
        again, _ = layer(x, rope)
        expected = sliding_window_softmax(layer, x, rope, 8)
    assert switched == 2
    torch.testing.assert_close(alone, expected, rtol=1e-9, atol=1e-11)
    assert (given - alone).abs().max() > 1e-3  # 21 tokens: the state holds the oldest 13
    torch.testing.assert_close(again, given, rtol=0, atol=0)


def test_window_alone_switches_nothing_without_a_window():
    with window_alone(tiny_model(method="supra")) as switched:
        assert switched == 0


def test_respecify_keeps_the_trained_weights_and_refuses_whole():
    torch.manual_seed(0)
    model = tiny_model(method="lolcats", window_kind="terrace", sinks=2)
    expected = tiny_model(method="lolcats", window_kind="terrace", sinks=2, window=4)
    expected.load_state_dict(model.state_dict())
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert respecify(model, {"window": 4}).window == 4
        got = model(ids).logits
        torch.testing.assert_close(got, expected(ids).logits, rtol=1e-10, atol=1e-10)
        for bad, says in (({"feature_dim": 4}, "changes the weights"), ({"method": "gla"}, "convert the model"),
                          ({"windw": 4}, "unknown option"), ({"window": 0}, "window must be")):
            with pytest.raises(ValueError, match=says):
                respecify(model, bad)
        assert recorded_spec(model).window == 4 and model.config.supra["window"] == 4
        torch.testing.assert_close(model(ids).logits, got, rtol=0, atol=0)


def test_bench_long_context_writes_its_json_on_a_tiny_model(tmp_path, monkeypatch):
    converted = tmp_path / "converted"
    assert supra_main(["convert", "recipe=tiny", f"out={converted}"]) == 0  # lolcats, window 16
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_long_context

    arguments = ["--original", "random", "--recipe", "tiny", "--corpora", "stdlib", "--lengths", "32", "64",
                 "--heldout-tokens", "128", "--passkey-lengths", "90", "--passkey-depths", "0", "1",
                 "--passkey-keys", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    bench_long_context.main([*arguments, "--models", str(converted), "--set", "window=8", "--set", "cache_budget=8"])
    record = json.loads((tmp_path / "out" / "long_context.json").read_text())
    assert record["benchmark"] == "long_context" and record["git_sha"] and record["command"] and record["date"]
    assert "load average" in record["machine"]
    original, student = record["rows"]
    assert (original["label"], original["method"], original["window_alone"]) == ("random", "softmax", None)
    assert student["method"] == "lolcats" and student["spec"]["window"] == 8
    assert student["changes"] == {"window": 8, "cache_budget": 8}
    for row in record["rows"]:
        assert set(row["ppl"]["stdlib"]) == {"32", "64"}
        assert [b["end"] for b in row["ppl"]["stdlib"]["64"]["by_position"]] == [64]
        assert row["ratio"]["stdlib"]["32"] > 0
        assert len(row["passkey"]["accuracy"]) == 1 and len(row["passkey"]["accuracy"][0]) == 2
        assert len(row["state_bytes"]["64"]["per_layer"]) == 2
    assert {"load", "ppl", "window_alone", "passkey", "state_bytes", "total"} == set(original["cpu_min"])
    assert set(student["cpu_min"]) == set(original["cpu_min"]) | {"window_without_cache"}
    # with a cache: its exact part (window, sinks, cache) alone, and the window and sinks alone
    for field in ("window_alone_ratio", "window_without_cache_ratio"):
        assert set(student[field]["stdlib"]) == {"32", "64"}
    assert original["window_without_cache"] is None
    # a fixed-size state, a growing KV cache
    assert student["state_bytes"]["32"]["total"] == student["state_bytes"]["64"]["total"]
    assert original["state_bytes"]["64"]["total"] == 2 * original["state_bytes"]["32"]["total"]
    assert any("window alone" in line for line in record["table"])
    assert any("window and sinks alone, no cache" in line for line in record["table"])
    assert (tmp_path / "out" / "long_context.png").stat().st_size > 0
    # the original's measurements are kept and reused by the next run with the same settings
    bench_long_context.main(arguments)
    again = json.loads((tmp_path / "out" / "long_context.json").read_text())
    assert len(again["rows"]) == 1 and again["rows"][0]["reused"] and again["rows"][0]["ppl"] == original["ppl"]


def test_bench_state_share_writes_its_json_on_a_tiny_model(tmp_path, monkeypatch):
    converted = tmp_path / "converted"
    assert supra_main(["convert", "recipe=tiny", "window_kind=terrace", "sinks=2", "window=8",
                       f"out={converted}"]) == 0
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_state_share

    record = bench_state_share.main(["--model", str(converted), "--recipe", "tiny", "--set", "cache_budget=8",
                                     "--seq-len", "48", "--windows", "1", "--out", str(tmp_path / "out")])
    assert record["benchmark"] == "state_share" and record["spec"]["cache_budget"] == 8
    assert [row["layer"] for row in record["rows"]] == [0, 1]
    for row in record["rows"]:
        assert [b["end"] for b in row["teacher_beyond"]] == [48]
        for key in ("teacher_beyond", "student_linear"):
            assert 0 < row[key][0]["mean"] < 1
        assert -1 <= row["direction_cosine"][0]["mean"] <= 1
    assert (tmp_path / "out" / "state_share.png").stat().st_size > 0


def test_the_hybrid_weights_split_every_key_between_the_exact_part_and_the_state():
    from supra.kernels.sparse_cache import parallel_cached_hybrid_weights

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 8, dtype=torch.float64) for _ in range(3))
    fq, fk = (F.softplus(torch.randn(2, 37, 3, 6, dtype=torch.float64)) for _ in range(2))
    exact, linear = parallel_cached_hybrid_weights(q, k, v, fq, fk, torch.full((3,), 0.3, dtype=torch.float64),
                                                   window=4, sinks=2, cache_budget=4,
                                                   log_decay=torch.full((3,), -0.05, dtype=torch.float64),
                                                   cache_chunk=2, cache_recall=2)
    causal = torch.ones(37, 37, dtype=torch.bool).tril()
    assert not ((exact > 0) & (linear > 0)).any()
    assert ((exact > 0) | (linear > 0))[..., causal].all() and not (exact + linear)[..., ~causal].any()
