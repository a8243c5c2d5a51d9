"""What the machine offers the kernels: whether Triton is installed, whether it runs as the interpreter,
and whether a backend setting runs the Triton kernels on a device (see the package docstring).

A leaf module that imports no triton: `dispatch.py` asks it which implementation a call runs, the
Triton modules whether they run under the interpreter.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_installed() -> bool:
    """Looked up once: a package search on every decode step costs more than the step's own math."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton runs as its interpreter (TRITON_INTERPRET=1, set before the first kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_dtypes(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels compute in these tensors' dtypes: any but float64, which Triton's dot has
    no path worth using for; float64 (the tests' reference precision) runs the torch forms."""
    return all(t.dtype != torch.float64 for t in tensors)


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether `backend` on tensors of `device` runs the Triton kernels; ValueError if it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    available = triton_installed()
    if backend == "auto":
        return available and device.type == "cuda"
    if not available:
        raise ValueError("backend='triton' needs the triton package (pip install 'supra[triton]')")
    if device.type != "cuda" and not interpreted():
        raise ValueError(f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 (the Triton "
                         "interpreter, set before first use); use backend='torch' or 'auto' instead")
    return True
