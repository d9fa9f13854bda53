"""Test set-up: Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before
``peft_fast.kernels`` is imported, so it is set here at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Device on which the kernel tests run: the GPU when there is one, else CPU + interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config) -> None:
    """Refuse, with the fix, an interpreter that cannot run a loop over a runtime bound.

    Triton 3.6's interpreter turns a scalar argument into a one-element array and calls int() on
    it in ``range(0, K, ...)``; NumPy 2.4 made that an error, so every kernel test would fail
    with an obscure TypeError. Probe it once with a two-line kernel instead.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_probe(out_ptr, n):
        total = 0
        for i in range(0, n, 1):
            total += i
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as exc:
        import numpy

        raise pytest.UsageError(
            f"the Triton {triton.__version__} interpreter cannot run our kernels with NumPy {numpy.__version__} "
            f"({type(exc).__name__}: {exc}); install numpy<2.4 or a newer Triton"
        ) from None
    assert int(out) == 3


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
