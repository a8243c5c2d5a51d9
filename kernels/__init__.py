"""Linear-attention ops: readable references, the torch chunked form (CPU path), and Triton kernels.

`linear_attention` (training, prefill) and `linear_attention_step` (decode) are what model code
calls; each picks the implementation for the device, as every op does, in `dispatch.py`. Backends:
"auto" uses Triton on CUDA tensors when triton is installed and the torch forms otherwise; "torch"
and "triton" force one; float64 inputs (the tests' references) run the torch forms whatever the
backend. Forcing Triton on CPU tensors works only through the interpreter (TRITON_INTERPRET=1 set
before the first use), which is what the tests do. The Triton modules are imported on first use, so
a CPU install without triton still imports this package; what they share is `triton_common.py`.
The LoLCATs hybrid (`window_hybrid_attention`) follows the same rule for a stateless call (training,
prefill: the fused kernels of `triton_hybrid.py`); a call with a decoder state runs its blocked torch
form on every device, and its decode step (`window_hybrid_step`) is a few small torch products over a
ring buffer of W tokens. The gated delta rule (`delta_rule.py`, `delta_rule` here) follows the rule
too: `triton_delta_rule.py` where Triton runs, its chunked WY form in torch elsewhere; its decode step
is torch on every device.
"""

# The checkout's root holds this folder as `kernels/`, and Python puts the current directory first on
# sys.path (`python -c`, `python -m pytest`, a notebook started there), so `import kernels` would find
# it before Hugging Face's `kernels` package, which transformers >= 5.25 imports on every model import.
# Imported under that top-level name, this file defines nothing and hands the name over: to the next
# `kernels` on the path, or, with none, to an empty module with no file (what a folder without
# __init__.py imports as, and what transformers takes for "not installed"). supra imports this
# package as `supra.kernels` only.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout])
    # The import statement returns whatever sys.modules holds once this file has run.
    sys.modules["kernels"] = types.ModuleType("kernels") if _spec is None else importlib.util.module_from_spec(_spec)
    if _spec is not None:
        _spec.loader.exec_module(sys.modules["kernels"])
else:
    from .backend import BACKENDS, use_triton
    from .chunked import chunk_linear_attention
    from .delta_rule import chunk_delta_rule, delta_rule_step, recurrent_delta_rule
    from .dispatch import (
        delta_rule,
        linear_attention,
        linear_attention_step,
        window_hybrid_attention,
        window_hybrid_step,
    )
    from .hybrid import HybridState, parallel_window_hybrid_attention, stack_states, state_row
    from .reference import parallel_linear_attention, recurrent_linear_attention, recurrent_step

    __all__ = [
        "BACKENDS", "HybridState", "chunk_delta_rule", "chunk_linear_attention", "delta_rule",
        "delta_rule_step", "linear_attention", "linear_attention_step", "recurrent_delta_rule",
        "parallel_linear_attention", "parallel_window_hybrid_attention", "recurrent_linear_attention",
        "recurrent_step", "stack_states", "state_row", "use_triton", "window_hybrid_attention",
        "window_hybrid_step",
    ]
