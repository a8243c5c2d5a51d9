"""Process group, FSDP2, activation checkpointing and compile, applied from outside the model code.

One process without a launcher is the plain case. Under torchrun/srun (RANK and WORLD_SIZE set) the
process group is NCCL on GPUs and gloo on CPUs, and every decoder layer is sharded with FSDP2
(`fully_shard`): parameters in `param_dtype` for compute, gradients reduced in float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..layers.linearize import decoder_layers
from ..models import torch_dtype


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_name: str) -> World:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        device = torch.device("cuda", local_rank if world_size > 1 else torch.device(device_name).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return World(rank, world_size, local_rank, device)


def shutdown_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, world: World, param_dtype: str, activation_checkpointing: bool,
                compile_layers: bool) -> nn.Module:
    """Activation checkpointing, compile, then FSDP2 per decoder layer (torchtitan's order)."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers:
        for layer in decoder_layers(model):
            layer.compile()
    if world.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Mixed precision only on GPUs: CPU (gloo) runs keep float32 so tests compare exactly.
        dtype = torch_dtype(param_dtype) if world.device.type == "cuda" else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def all_reduce_max(value: float, world: World) -> float:
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def all_reduce_mean(value: torch.Tensor, world: World) -> float:
    if not world.distributed:
        return value.item()
    tensor = value.detach().to(world.device, torch.float64).reshape(1)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.item() / world.world_size
