import os

import pytest
import torch

# Triton kernels run on CPU through the interpreter; the variable must be set before triton
# decorates any kernel, so it is set here, before any test module imports supra.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The dequantised SmolLM2 (made once per machine, in $SUPRA_CACHE; later sessions reuse it)."""
    from supra.models import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from supra.models import load_model

    return load_model("smollm2-135m").eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from supra.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(autouse=True)
def seeded(request):
    """Random inputs differ from test to test but not from run to run, so a tolerance failure on an
    unlucky draw reproduces instead of flaking CI; `SUPRA_TEST_SEED=N` draws another set."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("SUPRA_TEST_SEED", "0")))


@pytest.fixture
def triton_kernels(monkeypatch):
    """For the Triton kernel tests: outputs start as NaN (a position a kernel forgets to write shows),
    and on a CUDA machine the tensors are made there, so the same tests run the compiled kernels."""
    from supra.kernels import triton_common

    monkeypatch.setattr(triton_common, "POISON_OUTPUTS", True)
    if torch.cuda.is_available():
        torch.set_default_device("cuda")
    yield
    if torch.cuda.is_available():
        torch.set_default_device(None)
