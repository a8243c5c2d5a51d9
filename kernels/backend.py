"""Which implementation a call runs: the Triton kernels or the torch forms (see the package docstring).

Its own module so that `hybrid.py`, which the package imports, can ask too.
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
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 (the Triton "
                         "interpreter, set before first use); use backend='torch' or 'auto' instead")
    return True
