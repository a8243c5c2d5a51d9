"""Attention transfer (LoLCATs stage 1), one mode: every converted layer computes the softmax
attention it replaced on its own inputs and passes that on (teacher forcing); scoring, it also
computes its own output and its `layers.attention.transfer_mse` to the softmax output.

A micro-batch's transfer loss is TRANSFER_LOSS_SCALE x the layers' MSEs summed: the whole-model
(stages.transfer_micro_loss), cached (cached.py) and block-wise (blockwise.py) loops all backpropagate
and report it through `scaled_transfer_loss` and `reported_transfer_loss`, and `transfer_mode` is
the one place a layer's mode is set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from ..layers.attention import RecurrentAttention, TransferMode

TRANSFER_LOSS_SCALE = 1000.0  # LoLCATs multiplies the attention MSE by 1000


@contextmanager
def transfer_mode(layers: list[RecurrentAttention],
                  score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Iterator[None]:
    """The converted `layers` in attention transfer for the block (`TransferMode`): the teacher only,
    or with `score` given each layer's MSE and the softmax output to pass on."""
    mode = TransferMode(score)
    for layer in layers:
        layer.transfer = mode
    try:
        yield
    finally:
        for layer in layers:
            layer.transfer = None


def teacher_layers(layers: list[RecurrentAttention]) -> AbstractContextManager[None]:
    """The converted `layers` compute the softmax attention they replaced, and nothing else."""
    return transfer_mode(layers)


@contextmanager
def transfer_losses(layers: list[RecurrentAttention], loss_scale: float, layerwise: bool) -> Iterator[list]:
    """Score `layers`; yields the list their (detached) MSEs land in. Layerwise, each layer's loss is
    backpropagated at once, so one layer's graph is alive at a time; otherwise it is attached to the
    layer's output (`AttachLoss`) for the one backward FSDP expects."""
    losses: list[torch.Tensor] = []

    def collect(loss: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        losses.append(loss.detach())
        scaled = scaled_transfer_loss(loss, loss_scale)
        if layerwise:
            scaled.backward()
            return output
        return AttachLoss.apply(output, scaled)

    with transfer_mode(layers, collect):
        yield losses


class AttachLoss(torch.autograd.Function):
    """Identity on `output` whose backward also gives `loss` a gradient of one. Under FSDP the
    gradient must flow through each layer's output for its hooks to reduce the layer's gradients;
    attaching the layer's loss to its output routes the transfer loss that way."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.loss_meta
        return grad_output, torch.ones(shape, dtype=dtype, device=device)


def scaled_transfer_loss(mse: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """What a layer's MSE contributes to the gradient: its term of the transfer loss, times the
    micro-batch's share `loss_scale`."""
    return mse * TRANSFER_LOSS_SCALE * loss_scale


def reported_transfer_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """The transfer loss of one micro-batch as logged: the layers' MSEs summed, x TRANSFER_LOSS_SCALE."""
    return torch.stack(losses).sum() * TRANSFER_LOSS_SCALE
