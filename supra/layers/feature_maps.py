"""Feature maps phi and decay rates for the recurrent attention layers (SUPRA, arXiv 2405.06640;
LoLCATs, arXiv 2410.10254)."""

from __future__ import annotations

import math

import torch
from torch import nn


class HeadwiseLinear(nn.Module):
    """One (in x out) matrix per head: x (B, T, H, in) -> (B, T, H, out)."""

    def __init__(self, heads: int, dim_in: int, dim_out: int, bias: bool, identity_init: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, dim_in, dim_out, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(heads, dim_out, device=device, dtype=dtype)) if bias else None
        if identity_init:
            with torch.no_grad():
                self.weight.copy_(torch.eye(dim_in, dim_out, device=device, dtype=dtype).expand_as(self.weight))
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bthd,hdf->bthf", x, self.weight)
        return y if self.bias is None else y + self.bias


class HedgehogFeatureMap(nn.Module):
    """LoLCATs: phi(x) = [softmax(x W), softmax(-x W)] over features; W per head, identity-initialised."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int, **factory):
        super().__init__()
        self.proj = HeadwiseLinear(heads, head_dim, feature_dim // 2, bias=False, identity_init=True, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(x)  # softmax in at least float32: bf16 exp of logits loses the small features
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


class ReluFeatureMap(nn.Module):
    """T2R: phi(x) = ReLU(W x + b) per head."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int, identity_init: bool, **factory):
        super().__init__()
        self.proj = HeadwiseLinear(heads, head_dim, feature_dim, bias=True, identity_init=identity_init, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x))


def dense_relu_map(dim: int, identity_init: bool, **factory) -> nn.Linear:
    """SUPRA: one dense Linear over all heads (d -> d, with bias), ReLU applied by the caller."""
    layer = nn.Linear(dim, dim, bias=True, **factory)
    if identity_init:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(dim, **factory))
            layer.bias.zero_()
    return layer


def log_decay_rates(kind: str, heads: int) -> list[float]:
    """Per-head log gamma. 'supra': Lightning Attention's slopes, gamma_h = exp(-2^(-8 (h+1) / H)),
    which for H = 32 runs 0.431 .. 0.9961 as in SUPRA (and extends smoothly to any H);
    'retnet': gamma_h = 1 - 2^(-5-h); 'none': no decay."""
    if kind == "supra":
        return [-(2.0 ** (-8.0 * (h + 1) / heads)) for h in range(heads)]
    if kind == "retnet":
        return [math.log1p(-(2.0 ** (-5 - h))) for h in range(heads)]
    if kind == "none":
        return [0.0] * heads
    raise ValueError(f"unknown decay {kind!r}; valid: supra, retnet, none")
