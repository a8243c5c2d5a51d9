import os

import torch

# Triton kernels run on CPU through the interpreter; the variable must be set before triton
# decorates any kernel, so it is set here, before any test module imports supra.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
