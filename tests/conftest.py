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


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
