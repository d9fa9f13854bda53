"""The LoRA linear op's operand checks: a TypeError / ValueError naming the first problem, never a kernel fault."""

from __future__ import annotations

import torch

from peft_fast.kernels.common import _INTERPRET, _SUPPORTED_DTYPES
from peft_fast.kernels.dropout import check_dropout_args
from peft_fast.nf4 import NF4Weight

__all__ = ["check_lora_inputs", "check_same_dtype"]


def check_same_dtype(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of x ({dtype}), got {t.dtype}")


def check_lora_inputs(x, base, lora_a, lora_b, bias, dropout_p, seed) -> None:
    """Raise ValueError/TypeError naming the first problem with the operands of the op."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if isinstance(base, NF4Weight):
        base_shape, base_tensors = tuple(base.shape), [base.packed, base.absmax]
        if base.double_quant:
            base_tensors += [base.nested_absmax, base.nested_offset]
    elif isinstance(base, torch.Tensor):
        base_shape, base_tensors = tuple(base.shape), [base]
        check_same_dtype(base, "base weight", x.dtype)
    else:
        raise TypeError(f"base must be a torch.Tensor or an NF4Weight, got {type(base).__name__}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        check_same_dtype(t, name, x.dtype)
    if len(base_shape) != 2:
        raise ValueError(f"base weight must be 2-D [N, K], got shape {base_shape}")
    n, k = base_shape
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} features but the base weight {base_shape} expects K={k}")
    rank = lora_a.shape[0]
    if rank == 0:
        raise ValueError("lora_a has rank 0")
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} must be [r, K] with K={k}")
    if lora_b.shape[1] != rank:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} must have r={rank} columns, the rank of lora_a")
    if lora_b.shape[0] != n:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} must have N={n} rows, the out-features of the base")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"bias must be 1-D with N={n} entries, got shape {tuple(bias.shape)}")
        check_same_dtype(bias, "bias", x.dtype)
    tensors = [x, *base_tensors, lora_a, lora_b] + ([] if bias is None else [bias])
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(str(d) for d in devices)}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {x.device}")
    check_dropout_args(dropout_p, seed)
