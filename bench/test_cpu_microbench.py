"""pytest-benchmark cases for the CPU paths (not part of the default test run).

pytest bench/ --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from peft_fast.benchmark import peft_fast_lora_layer, peft_lora_layer
from peft_fast.nf4 import dequantize_nf4, quantize_nf4

K, N, M = 1024, 1024, 256


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")


def test_dequantize_nf4(benchmark):
    nf4 = quantize_nf4(torch.randn(N, K), 64, True)
    benchmark(dequantize_nf4, nf4, torch.float32)


def test_dequantize_bitsandbytes(benchmark):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnb_f.quantize_4bit(torch.randn(N, K), blocksize=64, quant_type="nf4", compress_statistics=True)
    benchmark(bnb_f.dequantize_4bit, packed, state)


@pytest.mark.parametrize("impl", ["peft_fast", "peft+bnb"])
@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
def test_qlora_linear(benchmark, impl, phase):
    dense = torch.nn.Linear(K, N, bias=False)
    layer = (peft_fast_lora_layer if impl == "peft_fast" else peft_lora_layer)(dense, True).train()
    x = torch.randn(M, K, requires_grad=True)
    grad = torch.randn(M, N)
    benchmark(lambda: layer(x) if phase == "fwd" else layer(x).backward(grad))
