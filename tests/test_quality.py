"""Cached attention transfer and logit distillation: the cache changes the cost, not the gradients;
resume inside a cached epoch is exact; distillation lowers the KL to the teacher and trains only its set."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf
from test_layers import tiny_model
from test_uptrain import FAST, losses, uptrain_process

from supra.cli import main
from supra.commands.settings import convert_model
from supra.config import load_config
from supra.models import load_model
from supra.train.cached import build_cache, cached_micro_loss, epoch_order
from supra.train.stages import LoraSpec, add_lora, distill_loss, micro_batch_loss, set_trainable


def packed_batch(rows: int = 2, length: int = 40) -> dict[str, torch.Tensor]:
    """Rows with a document boundary inside (position ids restart), as the packer makes them."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (rows, length), generator=generator)
    positions = torch.cat([torch.arange(5, 5 + 23), torch.arange(length - 23)]).expand(rows, -1).clone()
    labels = ids.masked_fill(positions == 0, -100)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def new_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_transfer_gives_the_on_the_fly_gradients():
    torch.manual_seed(0)
    model = tiny_model(kv_heads=2, layers=3, method="lolcats").train()  # float64, random maps
    stage = OmegaConf.create({"name": "attention_transfer"})
    set_trainable(model, stage)
    batch = packed_batch()
    expected_loss = micro_batch_loss(model, batch, stage, 0.5, layerwise=True)
    expected = new_grads(model)
    model.zero_grad(set_to_none=True)
    cache = build_cache(model, [batch], torch.float64, torch.device("cpu"))
    loss = cached_micro_loss(model, cache[0], 0.5, torch.device("cpu"))
    got = new_grads(model)
    assert expected.keys() == got.keys() and len(got) == 3 * 3  # per layer: q map, k map, window gate
    assert loss == expected_loss.item()  # one transfer loss (transfer.reported_transfer_loss) for both
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert all(not p.requires_grad or p.grad is not None for p in model.parameters())


def test_epoch_order_is_a_fixed_permutation_after_the_first_epoch():
    assert epoch_order(6, 0, 0, 0) == list(range(6))
    assert sorted(epoch_order(6, 0, 0, 1)) == list(range(6))
    assert epoch_order(6, 0, 2, 1) == epoch_order(6, 0, 2, 1)


CACHED = ["data.shuffle_buffer=0", "train.checkpoint_every=2", "train.stages=["
          "{name: attention_transfer, tokens: 1024, cache_tokens: 512, epochs: 3, lr: 1e-2, min_lr: 1e-3,"
          " warmup_steps: 1},"
          "{name: distill, train: new, ce_weight: 0.5, tokens: 512, lr: 1e-3, min_lr: 1e-4, warmup_steps: 1}]"]


def test_kill_9_inside_a_cached_epoch_then_rerun_continues_exactly(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(["uptrain", *FAST, f"out={reference}", *CACHED]) == 0
    # 2 chunks x 3 epochs x 2 steps, then 2 distill steps
    assert [(s, n) for s, n, _ in losses(reference)] == [(i, "attention_transfer") for i in range(1, 13)] + [
        (13, "distill"), (14, "distill")]
    process = uptrain_process(killed, *CACHED)
    deadline = time.time() + 300
    # step 8 is inside the second chunk (its second epoch): the rerun rebuilds that chunk's cache
    while not (killed / "checkpoints" / "step-00000008").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert main(["uptrain", *FAST, f"out={killed}", *CACHED]) == 0
    assert losses(killed) == losses(reference)


@pytest.mark.parametrize("trains", ["lora", "new"])
def test_distill_lowers_the_kl_and_trains_only_its_set(trains):
    # A random model's next-token distributions are near uniform, so distillation is tested on SmolLM2.
    # rows longer than the (sliding) window, no sinks and an undecayed state: most of the attention goes
    # through the feature maps
    cfg = load_config(["recipe=smollm2-135m", "window=16", "window_kind=sliding", "sinks=0", "state_decay=none"])
    model = convert_model(load_model("smollm2-135m"), cfg)
    stage = OmegaConf.create({"name": "distill", "train": trains, "lora_r": 4, "lora_alpha": 8,
                              "lora_dropout": 0.0, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    torch.manual_seed(0)  # LoRA's A matrices
    lora = LoraSpec.of_stages([stage])  # train=new: no adapters
    model = (add_lora(model, lora) if lora else model).train()
    set_trainable(model, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (1, 48), generator=generator)
    batch = {"input_ids": ids, "position_ids": torch.arange(48)[None], "labels": ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    kls = []
    for _ in range(8):
        loss = distill_loss(model, batch, ce_weight=0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        kls.append(loss.item())
    assert kls[0] > 0.01 and kls[-1] < 0.9 * kls[0], kls
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    if trains == "lora":
        assert all("lora_" in n for n in changed), sorted(changed)[:3]
    else:
        assert all(".feature_map_" in n or n.endswith("window_factor") for n in changed), sorted(changed)[:3]
