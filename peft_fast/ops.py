"""Autograd-aware ops over the kernels, and the choice of backend.

Backends: Triton on CUDA tensors; the Triton interpreter on CPU when ``PEFT_FAST_BACKEND=triton``
(tests); plain torch on CPU otherwise (same math).
"""

from __future__ import annotations

import os

import torch

from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = ["backend_name", "base_linear"]


def backend_name(device: torch.device | str | None = None) -> str:
    """The backend used for tensors on ``device``: ``cuda``, ``triton-interpreter`` or ``torch-cpu``."""
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    if device.type == "cuda":
        return "cuda"
    if os.environ.get("PEFT_FAST_BACKEND") == "triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton-interpreter"
    return "torch-cpu"


class _NF4BaseLinear(torch.autograd.Function):
    """``x · deq(W)ᵀ + b`` that dequantizes again in backward instead of saving deq(W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, nf4: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.nf4 = nf4
        return torch.nn.functional.linear(x, dequantize_nf4(nf4, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_y @ dequantize_nf4(ctx.nf4, grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def base_linear(x: torch.Tensor, nf4: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · deq(W)ᵀ + b`` for an NF4 weight; never keeps deq(W) for backward."""
    return _NF4BaseLinear.apply(x, nf4, bias)
