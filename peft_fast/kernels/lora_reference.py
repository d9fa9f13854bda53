"""The torch reference of the LoRA linear (:mod:`peft_fast.kernels.lora_linear`), also the op's torch backend.

Each product rounds to x's dtype as ``nn.Linear`` + PEFT's LoRA layer do; the kernels accumulate
in fp32 and round once, so the two agree within the dtype's tolerance, not bit for bit.
"""

from __future__ import annotations

import torch

from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = ["lora_linear_reference_backward", "lora_linear_reference_forward"]


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    # A dropped element is exactly 0, even if it held NaN or Inf: the kernels do the same.
    return x if keep is None else torch.where(keep, x / (1.0 - p), 0.0)


def _dense(base: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(base, dtype) if isinstance(base, NF4Weight) else base.to(dtype)


def lora_linear_reference_forward(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    keep: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`lora_linear_forward` (and the op's torch backend): (y, h).

    ``keep`` is the dropout keep-mask [M, K] (None without dropout): the kernels' Philox mask
    (:func:`dropout_mask`) to compare with them, or the torch backend's own. Each product rounds
    to x's dtype as ``nn.Linear`` + PEFT's LoRA layer do; the kernels accumulate in fp32 and round
    once, so the two agree within the dtype's tolerance, not bit for bit.
    """
    h = _dropped(x, keep, dropout_p) @ lora_a.t()
    y = torch.nn.functional.linear(x, _dense(base, x.dtype), bias)
    y = y + scale * (h @ lora_b.t())
    return y, h


def lora_linear_reference_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    keep: torch.Tensor | None,
    dropout_p: float,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The torch reference of :func:`lora_linear_backward`: (dx, da, db), None where not needed."""
    grad_h = scale * (grad_y @ lora_b)
    grad_b = scale * (grad_y.t() @ h) if needs_db else None
    grad_a = grad_h.t() @ _dropped(x, keep, dropout_p) if needs_da else None
    grad_x = None
    if needs_dx:
        grad_x = grad_y @ _dense(base, grad_y.dtype) + _dropped(grad_h @ lora_a, keep, dropout_p)
    return grad_x, grad_a, grad_b
