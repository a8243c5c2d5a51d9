"""Factorized linear layers: a weight W (out x in) kept as low-rank factors or tensor-train cores.

- `LowRankLinear`: y = U (V x) + b, U (out x r), V (r x in): r (in + out) parameters instead of
  in * out. From a truncated SVD of W, or of W L with L L^T the Gram matrix of the layer's inputs
  on calibration text (SVD-LLM, Wang et al. 2024): then the discarded singular values are exactly
  the error of the layer's *outputs* on that text, not of the weights.
- `TensorTrainLinear`: in = n_1 ... n_d, out = m_1 ... m_d and
  W[(i_1..i_d), (j_1..j_d)] = G_1[i_1, j_1] G_2[i_2, j_2] ... G_d[i_d, j_d], cores G_k of shape
  (r_{k-1}, m_k, n_k, r_k) with r_0 = r_d = 1 (TT-matrix, Novikov et al. 2015), from TT-SVD
  (Oseledets 2011). The forward contracts the input with one core at a time; W is never formed.

Each module keeps the Linear's bias, describes itself by `layout()` (recorded in the model's spec,
`LinearizeSpec.factorized`, from which `rebuild_factorized` makes the same empty modules when a
saved or exported model loads) and gives W back with `to_dense()` for checks. The factors
are named by `factor_parameter_prefixes`, so training stages can find them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U diag(s) Vh as two factors sharing sqrt(s): equal scales train better than all-in-one."""
    root = s.sqrt()
    return u * root, root[:, None] * vh


def low_rank_factors(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, V, discarded singular values) with U V the best rank-`rank` approximation of `weight`.

    With `gram` (sum of x x^T over calibration inputs), W L is decomposed, L the Cholesky factor of
    gram (+ eps * mean diagonal: fewer calibration tokens than input channels, or a channel never
    active, leave gram singular), and V = V' L^{-1}: the best rank-r approximation in the output
    error ||(W - U V) X^T||_F. Cholesky and L^{-1} run in float64; the SVD in the weight's
    precision (at least float32)."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    if gram is None:
        u, s, vh = torch.linalg.svd(weight.to(compute), full_matrices=False)
        left, right = split_factors(u[:, :rank], s[:rank], vh[:rank])
        return left, right, s[rank:]
    g = gram.to(weight.device, torch.float64)
    eye, scale = torch.eye(len(g), dtype=g.dtype, device=g.device), g.diagonal().mean().clamp_min(1e-30)
    shift = eps * scale
    while True:  # a Gram summed from float32 batches can be slightly indefinite: grow the shift until definite
        chol, info = torch.linalg.cholesky_ex(g + shift * eye)
        if info == 0:
            break
        shift = max(10 * shift, 1e-12 * scale)
    u, s, vh = torch.linalg.svd((weight.double() @ chol).to(compute), full_matrices=False)
    left, right = split_factors(u[:, :rank], s[:rank], vh[:rank])
    right = torch.linalg.solve_triangular(chol, right.double(), upper=False, left=False)  # right @ L^{-1}
    return left, right.to(compute), s[rank:]


def full_tt_ranks(out_modes: list[int], in_modes: list[int]) -> list[int]:
    """The TT-ranks at which TT-SVD is exact: bond k can carry at most min(rows, columns) of the
    matricisation that splits cores 1..k from k+1..d."""
    sizes = [m * n for m, n in zip(out_modes, in_modes)]
    return [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]


def tt_svd(weight: torch.Tensor, out_modes: list[int], in_modes: list[int],
           ranks: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(cores, discarded singular values of every step) of W (out x in) in TT-matrix format.

    Left to right: each step's SVD keeps `ranks[k]` left singular vectors as core k (orthonormal)
    and passes diag(s) Vh on. Those errors are orthogonal to one another, so the squared error of
    the result is exactly the sum of squares of all discarded values."""
    d = len(out_modes)
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    # (m_1..m_d, n_1..n_d) -> (m_1, n_1, m_2, n_2, ...): core k owns the index pair (i_k, j_k)
    rest = w.reshape(*out_modes, *in_modes).permute([x for k in range(d) for x in (k, d + k)]).reshape(-1)
    cores, dropped, r_prev = [], [], 1
    for k in range(d - 1):
        u, s, vh = torch.linalg.svd(rest.reshape(r_prev * out_modes[k] * in_modes[k], -1), full_matrices=False)
        r = ranks[k]
        cores.append(u[:, :r].reshape(r_prev, out_modes[k], in_modes[k], r))
        dropped.append(s[r:])
        rest, r_prev = s[:r, None] * vh[:r], r
    cores.append(rest.reshape(r_prev, out_modes[-1], in_modes[-1], 1))
    return cores, torch.cat(dropped)


def tt_parameters(out_modes: list[int], in_modes: list[int], ranks: list[int]) -> int:
    bonds = [1, *ranks, 1]
    return sum(bonds[k] * m * n * bonds[k + 1] for k, (m, n) in enumerate(zip(out_modes, in_modes)))


def balanced_modes(n: int, d: int) -> list[int]:
    """The d factors of n (ascending), the largest as small as possible, then the next largest...:
    576, 3 -> [8, 8, 9]; 1536, 3 -> [8, 12, 16]."""
    def best(n: int, d: int, low: int) -> list[int] | None:
        if d == 1:
            return [n] if n >= low else None
        found = None
        for f in range(low, math.isqrt(n) + 1):
            tail = best(n // f, d - 1, f) if n % f == 0 else None
            if tail is not None and (found is None or [f, *tail][::-1] < found[::-1]):
                found = [f, *tail]
        return found

    return best(n, d, 1) or [1] * (d - 1) + [n]


class LowRankLinear(nn.Module):
    """y = U (V x) + b: a Linear whose weight is U V."""

    factor_parameter_prefixes = ("u", "v")

    def __init__(self, in_features: int, out_features: int, rank: int, bias: nn.Parameter | None = None,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.u = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.u @ self.v

    def layout(self) -> dict[str, Any]:
        return {"kind": "low_rank", "rank": self.rank}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class TensorTrainLinear(nn.Module):
    """A Linear whose weight is a TT-matrix; applied core by core."""

    factor_parameter_prefixes = ("cores",)

    def __init__(self, in_modes: list[int], out_modes: list[int], ranks: list[int],
                 bias: nn.Parameter | None = None, device: Any = None, dtype: Any = None):
        super().__init__()
        self.in_modes, self.out_modes, self.ranks = list(in_modes), list(out_modes), list(ranks)
        self.in_features, self.out_features = math.prod(in_modes), math.prod(out_modes)
        bonds = [1, *ranks, 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(bonds[k], m, n, bonds[k + 1], device=device, dtype=dtype))
            for k, (m, n) in enumerate(zip(out_modes, in_modes)))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # t is (tokens, outputs done, bond, inputs left); each step eats input mode n_k and makes
        # output mode m_k. Modes are row-major (i_1, j_1 slowest), as in W.reshape(*out, *in).
        t = x.reshape(-1, 1, 1, self.in_features)
        for core, n in zip(self.cores, self.in_modes):
            rows, done, bond, left = t.shape
            t = torch.einsum("bmrnz,rpns->bmpsz", t.reshape(rows, done, bond, n, left // n), core)
            t = t.reshape(rows, done * core.shape[1], core.shape[3], left // n)
        y = t.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def to_dense(self) -> torch.Tensor:
        d = len(self.cores)
        full = self.cores[0]
        for core in list(self.cores)[1:]:  # (1, m.., n.., r) grows one mode pair at a time
            full = torch.einsum("a...r,rpns->a...pns", full, core)
        # (1, m_1, n_1, ..., m_d, n_d, 1) -> (m_1..m_d, n_1..n_d)
        full = full.reshape([x for m, n in zip(self.out_modes, self.in_modes) for x in (m, n)])
        return full.permute([*range(0, 2 * d, 2), *range(1, 2 * d, 2)]).reshape(self.out_features, self.in_features)

    def layout(self) -> dict[str, Any]:
        return {"kind": "tensor_train", "in_modes": self.in_modes, "out_modes": self.out_modes, "ranks": self.ranks}

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}"


FACTORIZED = (LowRankLinear, TensorTrainLinear)


def empty_factorized(linear: nn.Linear, layout: dict[str, Any]) -> nn.Module:
    """The factorized module of `layout` in place of `linear` (its bias kept), factors uninitialised."""
    where = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    if layout["kind"] == "low_rank":
        return LowRankLinear(linear.in_features, linear.out_features, layout["rank"], linear.bias, **where)
    if layout["kind"] == "tensor_train":
        if (math.prod(layout["in_modes"]), math.prod(layout["out_modes"])) != (linear.in_features, linear.out_features):
            raise ValueError(f"TT modes {layout['out_modes']} x {layout['in_modes']} do not fit a "
                             f"{linear.out_features} x {linear.in_features} weight")
        return TensorTrainLinear(layout["in_modes"], layout["out_modes"], layout["ranks"], linear.bias, **where)
    raise ValueError(f"unknown factorized layout {layout['kind']!r}")


def rebuild_factorized(model: nn.Module, record: dict[str, dict[str, Any]]) -> None:
    """Swap every Linear named in `record` (module name -> layout) for its empty factorized module,
    so a checkpoint's factors load into it; modules already factorized are left alone."""
    for name, layout in record.items():
        module = model.get_submodule(name)
        if isinstance(module, FACTORIZED):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, empty_factorized(module, layout))


def factor_parameter_names(model: nn.Module) -> list[str]:
    """Names of the factors of every factorized layer (what healing trains besides LoRA)."""
    names = []
    for module_name, module in model.named_modules():
        for prefix in getattr(module, "factor_parameter_prefixes", ()):
            names.extend(f"{module_name}.{prefix}.{n}" if n else f"{module_name}.{prefix}"
                         for n, _ in _named(getattr(module, prefix)))
    return names


def _named(child: nn.Module | nn.Parameter) -> list[tuple[str, nn.Parameter]]:
    return [("", child)] if isinstance(child, nn.Parameter) else list(child.named_parameters())
