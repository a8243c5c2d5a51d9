"""What the Triton modules share (as fla's `ops/common`): output buffers, the dot and its precision,
the decay modes, the running log decay of a chunk, and the launch layout of the chunked ops.

`triton_chunk.py` (linear attention) and `triton_delta_rule.py` (the gated delta rule, which also runs
linear attention's output and dq/dk kernels on its corrected values) launch over `ChunkLayout`;
`triton_hybrid.py` and `triton_decode.py` use the buffers, the dot and the decay modes.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .backend import interpreted, triton_dtypes

# Tests set this (or SUPRA_POISON_OUTPUTS=1) so every buffer a kernel should fill starts as NaN:
# an element a kernel forgets to write then fails the comparison instead of passing by luck.
POISON_OUTPUTS = os.environ.get("SUPRA_POISON_OUTPUTS", "") == "1"

# tl.dot's input precision for float32 inputs (`dot_precision`); the interpreter computes every dot in float32.
FLOAT32_PREC = "tf32x3"

# Decay modes, a compile-time switch in the kernels (`decay_mode`).
NO_DECAY, HEAD_DECAY, TOKEN_DECAY = 0, 1, 2


def decay_mode(log_decay: torch.Tensor | None) -> int:
    """The kernels' DECAY for a log decay of None, per head (H,), or one per token or sequence."""
    return NO_DECAY if log_decay is None else HEAD_DECAY if log_decay.dim() == 1 else TOKEN_DECAY


def alloc(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: uninitialised normally, NaN-filled when POISON_OUTPUTS is on."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_dtypes(op: str, *tensors: torch.Tensor) -> None:
    """ValueError unless the kernels compute in these dtypes (`backend.triton_dtypes`): the dispatcher's
    `op` runs the torch form for the others."""
    if not triton_dtypes(*tensors):
        raise ValueError(f"the Triton kernels take no float64 inputs; {op}() runs the torch form for them")


def dot_precision(dtype: torch.dtype) -> str:
    """`dot`'s PREC for inputs of `dtype`. float32 inputs: each product as three tf32 ones on the tensor
    cores (tf32x3: about float32's accuracy; one tf32 product would cost about three digits). 'ieee' dots
    ran on the CUDA cores, spilled, and needed more shared memory than an A100 has (scripts/compile_sweep.py).
    Half-precision inputs ignore it."""
    return FLOAT32_PREC if dtype == torch.float32 else "tf32"


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """`dot`'s UPCAST: bfloat16 inputs under the interpreter (see `dot`)."""
    return dtype == torch.bfloat16 and interpreted()


# ----------------------------------------------------------------------------------------------
# Helpers called inside kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def chunk_log_decay(g_ptr, t0, L, h, H, C: tl.constexpr, DECAY: tl.constexpr):
    """Running log decay G (C,) inside the chunk that starts at packed token t0 and holds L tokens.

    Rows past L repeat G[L-1] (their g counts as 0), so G_last can be read at row C-1 as well.
    """
    rc = tl.arange(0, C)
    if DECAY == 1:
        G = tl.minimum(rc + 1, L).to(tl.float32) * tl.load(g_ptr + h).to(tl.float32)
    elif DECAY == 2:
        g = tl.load(g_ptr + (t0 + rc).to(tl.int64) * H + h, mask=rc < L, other=0.0).to(tl.float32)
        G = tl.cumsum(g, 0)
    else:
        G = tl.zeros([C], dtype=tl.float32)
    return G


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation. UPCAST is for the interpreter only: it keeps bfloat16 as raw
    uint16 and would multiply the bit patterns, so operands go to float32 first (exact for bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def last_entry(G, C: tl.constexpr):
    """G[C-1] as a scalar (a masked sum: Triton has no scalar indexing of a block)."""
    return tl.sum(tl.where(tl.arange(0, C) == C - 1, G, 0.0), 0)


# ----------------------------------------------------------------------------------------------
# Launch layout of the chunked ops
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def chunk_tables(bounds: tuple[int, ...], chunk_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per document: its token range and first chunk; per chunk: its first packed token and length."""
    starts, ends = torch.tensor(bounds[:-1]), torch.tensor(bounds[1:])
    counts = (ends - starts + chunk_size - 1) // chunk_size
    chunk_off = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    doc = torch.repeat_interleave(torch.arange(len(counts)), counts)
    chunk_start = starts[doc] + (torch.arange(int(chunk_off[-1])) - chunk_off[doc]) * chunk_size
    chunk_len = torch.minimum(ends[doc] - chunk_start, torch.tensor(chunk_size))
    as_i32 = lambda x: x.to(device=device, dtype=torch.int32)  # noqa: E731
    return {"cu": as_i32(torch.tensor(bounds)), "chunk_off": as_i32(chunk_off),
            "chunk_start": as_i32(chunk_start), "chunk_len": as_i32(chunk_len)}


class ChunkLayout:
    """The launches of a chunked op over packed documents (`triton_chunk.py`, `triton_delta_rule.py`):
    shapes, decay mode, block sizes and chunk tables, shared by its forward and backward."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, chunk_size: int) -> None:
        B, T, H, K = q.shape
        self.B, self.T, self.H, self.K, self.V, self.C = B, T, H, K, v.shape[-1], chunk_size
        if cu_seqlens is None:
            bounds = tuple(range(0, B * T + 1, T)) if T > 0 else (0,) * (B + 1)
        else:
            bounds = tuple(int(x) for x in cu_seqlens.tolist())  # host sync: the grid needs the chunk count
        self.docs = len(bounds) - 1
        self.tables = chunk_tables(bounds, chunk_size, q.device)
        self.chunks = int(self.tables["chunk_start"].numel())
        self.BK = max(16, min(64, triton.next_power_of_2(self.K)))  # tl.dot needs >= 16
        self.BV = max(16, min(64, triton.next_power_of_2(self.V)))
        self.NK, self.NV = triton.cdiv(self.K, self.BK), triton.cdiv(self.V, self.BV)
        self.decay = decay_mode(log_decay)
        self.prec, self.upcast = dot_precision(q.dtype), interpreter_upcast(q.dtype)
        # Chunk states: float32 for float32 inputs, else the input dtype (half the traffic, like fla).
        self.state_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D) -> packed (B*T, H, D), contiguous."""
        return x.reshape(self.B * self.T, self.H, x.shape[-1]).contiguous()

    def meta(self) -> dict:
        return {"H": self.H, "K": self.K, "V": self.V, "C": self.C, "BK": self.BK, "BV": self.BV,
                "DECAY": self.decay, "PREC": self.prec, "UPCAST": self.upcast}

    def dqdk_meta(self) -> dict:
        """`dqdk_kernel`'s launch (triton_chunk and the delta rule). Two stages: six tiles per loop step, so that
        shared memory stays in bounds. Eight warps and steps of 16 value columns: the four float32
        accumulators (two C x C, two C x BK) and a step's tiles then fit 255 registers a thread; four warps
        and steps of 64 spilled 112-2,296 bytes in a bf16 model, kilobytes more in a float32 one (ptxas,
        scripts/compile_sweep.py --ptxas)."""
        return self.meta() | {"BV": 16, "num_warps": 8, "num_stages": 2}
