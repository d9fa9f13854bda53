"""``peft_fast::lora_linear``: ``Y = X·deq(W)ᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ`` as one custom op, forward and backward.

The op has a fake (meta) implementation and a registered autograd formula, so ``torch.compile``
sees a single op. Saved for backward in every backend: X, H = drop(X)·Aᵀ and the seed, plus
references to the weights themselves; never deq(W), the dropout mask or a dropped copy of X.
The kernels and the torch reference are in :mod:`peft_fast.kernels.lora_linear`.
"""

from __future__ import annotations

import math
import numbers

import torch

from peft_fast.nf4 import NF4Weight, dequantize_nf4
from peft_fast.ops._common import (
    args_to_base,
    autocast_dtype,
    autocast_inputs,
    base_to_args,
    check_input,
    keep_mask,
    no_autocast,
    seed_tensor,
    uses_kernels,
)

__all__ = ["lora_linear", "merge_lora"]


def _kernels():
    from peft_fast.kernels import lora_linear as kernels

    return kernels


@torch.library.custom_op("peft_fast::lora_linear", mutates_args=())
def _lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    base = args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, lora_b.shape[0], x.shape[1])
    kernels = _kernels()
    with no_autocast(x.device):
        if uses_kernels(x):
            return kernels.lora_linear_forward(x, base, lora_a, lora_b, bias, scale, dropout_p, int(seed))
        keep = keep_mask(x, dropout_p, int(seed))
        return kernels.lora_linear_reference_forward(x, base, lora_a, lora_b, bias, scale, keep, dropout_p)


@_lora_linear_op.register_fake
def _(x, weight, absmax, nested_absmax, nested_offset, blocksize, lora_a, lora_b, bias, scale, dropout_p, seed):
    return x.new_empty((x.shape[0], lora_b.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("peft_fast::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dA, dB); a gradient that is not needed comes back as an empty tensor."""
    base = args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, lora_b.shape[0], x.shape[1])
    kernels = _kernels()
    needs = (needs_dx, needs_da, needs_db)
    with no_autocast(x.device):  # backward may run inside an autocast region (a loop calling it there)
        if uses_kernels(x):
            args = (grad_y, x, h, base, lora_a, lora_b, scale, dropout_p, int(seed))
            grads = kernels.lora_linear_backward(*args, *needs)
        else:
            keep = keep_mask(x, dropout_p, int(seed))
            grads = kernels.lora_linear_reference_backward(grad_y, x, h, base, lora_a, lora_b, scale, keep, dropout_p,
                                                           *needs)  # fmt: skip
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_lora_linear_backward_op.register_fake
def _(grad_y, x, h, weight, absmax, nested_absmax, nested_offset, blocksize, lora_a, lora_b, scale, dropout_p, seed,
      needs_dx, needs_da, needs_db):  # fmt: skip
    wanted = ((x.shape, needs_dx), (lora_a.shape, needs_da), (lora_b.shape, needs_db))
    return tuple(x.new_empty(shape if needed else (0,)) for shape, needed in wanted)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, absmax, nested_absmax, nested_offset, blocksize, lora_a, lora_b, bias, scale, dropout_p, seed = inputs
    _, h = output
    ctx.save_for_backward(x, h, weight, absmax, nested_absmax, nested_offset, lora_a, lora_b, seed)
    ctx.blocksize, ctx.scale, ctx.dropout_p = blocksize, scale, dropout_p
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, grad_h):
    # H is an output only so that backward can reuse it; the public wrapper never exposes it,
    # so it has no gradient of its own (grad_h is ignored).
    x, h, weight, absmax, nested_absmax, nested_offset, lora_a, lora_b, seed = ctx.saved_tensors
    needs_dx, needs_da, needs_db = (ctx.needs_input_grad[i] for i in (0, 6, 7))
    grad_x = grad_a = grad_b = None
    if needs_dx or needs_da or needs_db:
        grad_x, grad_a, grad_b = _lora_linear_backward_op(
            grad_y.contiguous(), x, h, weight, absmax, nested_absmax, nested_offset, ctx.blocksize,
            lora_a, lora_b, ctx.scale, ctx.dropout_p, seed, needs_dx, needs_da, needs_db,
        )  # fmt: skip
    grad_bias = grad_y.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[8] else None
    return (
        grad_x if needs_dx else None, None, None, None, None, None,
        grad_a if needs_da else None, grad_b if needs_db else None, grad_bias, None, None, None,
    )  # fmt: skip


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _check_lora_inputs(x, base, lora_a, lora_b, bias) -> None:
    """Clear errors for what the kernels cannot take; layout problems are fixed by the caller."""
    if len(base.shape) != 2:
        raise ValueError(f"the base weight must be 2-D [out_features, in_features], got shape {tuple(base.shape)}")
    out_features, in_features = base.shape
    check_input(x, in_features)
    for name, tensor in (("lora_A", lora_a), ("lora_B", lora_b), ("bias", bias)):
        if (tensor is not None or name != "bias") and not isinstance(tensor, torch.Tensor):
            # lora_A / lora_B are required (None too is refused here, not by an AttributeError below).
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_A must be [r, {in_features}], got {tuple(lora_a.shape)}")
    if lora_a.shape[0] == 0:
        raise ValueError(f"lora_A has rank 0 (shape {tuple(lora_a.shape)}); the rank r must be at least 1")
    if lora_b.dim() != 2 or lora_b.shape != (out_features, lora_a.shape[0]):
        raise ValueError(
            f"lora_B must be [{out_features}, r={lora_a.shape[0]}] to match lora_A and the base, "
            f"got {tuple(lora_b.shape)}"
        )
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    dense = base if isinstance(base, torch.Tensor) else None
    for name, tensor in (("lora_A", lora_a), ("lora_B", lora_b), ("bias", bias), ("base weight", dense)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise TypeError(f"{name} is {tensor.dtype} but x is {x.dtype}; cast them to one dtype")
    base_device = base.device
    for name, tensor in (("lora_A", lora_a), ("lora_B", lora_b), ("bias", bias)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if base_device != x.device:
        raise ValueError(f"the base weight is on {base_device} but x is on {x.device}")


def lora_linear(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """``Y = X·deq(W)ᵀ + b + scale·(dropout(X)·Aᵀ)·Bᵀ`` for inputs of any leading shape [..., K].

    Args:
        x: activations [..., K] (fp32, fp16 or bf16).
        base: the frozen weight W [N, K]: a dense tensor or an :class:`NF4Weight`.
        lora_a, lora_b: the adapter, A [r, K] and B [N, r], in x's dtype. Under ``torch.autocast``
            x, a dense W, A, B and the bias may be of any of fp32 / fp16 / bf16: all are cast to
            the autocast dtype, which Y is in (as ``nn.Linear``); gradients come back in each
            tensor's own dtype.
        bias: optional [N]; gets a gradient if it requires one. W never does.
        scale: s = lora_alpha / r (or lora_alpha / √r with rsLoRA).
        dropout_p: dropout on the LoRA path's input; applied only when ``training``.
        seed: dropout seed (drawn from torch's generator when None); the same seed gives the
            same mask, see :func:`peft_fast.ops.dropout_mask`.
    """
    if not isinstance(base, (torch.Tensor, NF4Weight)):
        raise TypeError(f"base must be a torch.Tensor or an NF4Weight, got {type(base).__name__}")
    if isinstance(x, torch.Tensor):
        cast = autocast_dtype(x)
        x, lora_a, lora_b, bias = autocast_inputs(cast, x, lora_a, lora_b, bias)
        if isinstance(base, torch.Tensor):
            (base,) = autocast_inputs(cast, base)
    _check_lora_inputs(x, base, lora_a, lora_b, bias)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):  # a NaN / Inf scale makes every output NaN / Inf
        raise ValueError(f"scale must be a finite number, got {scale}")
    dropout_p = float(dropout_p) if training else 0.0
    seed_arg = seed_tensor(seed if seed is not None or dropout_p > 0.0 else 0)
    lead = x.shape[:-1]
    # Non-contiguous inputs are handled, not rejected: the kernels want row-major operands.
    # The row count is explicit: reshape(-1, 0) is ambiguous for a layer with no input features.
    x2d = x.reshape(math.prod(lead), x.shape[-1]).contiguous()
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    if isinstance(base, torch.Tensor):
        base = base.contiguous()
    y, _ = _lora_linear_op(x2d, *base_to_args(base), lora_a, lora_b, bias, scale, dropout_p, seed_arg)
    return y.reshape(*lead, y.shape[-1])


def merge_lora(
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dtype: torch.dtype | None = None,
    requantize: bool = False,
) -> torch.Tensor | NF4Weight:
    """``W + s·B·A``: a dense weight in ``dtype`` (default: the base's dtype), computed in fp32.

    With ``requantize=True`` and an NF4 base, the merged weight is quantized back to NF4 with the
    base's blocksize and double-quant setting (lossy: the merge moves values off the NF4 grid).
    """
    if isinstance(base, NF4Weight):
        dense, out_dtype = dequantize_nf4(base, torch.float32), dtype or base.dtype
    else:
        dense, out_dtype = base.float(), dtype or base.dtype
    if lora_b.shape[1] != lora_a.shape[0] or lora_b.shape[0] != dense.shape[0] or lora_a.shape[1] != dense.shape[1]:
        raise ValueError(
            f"cannot merge A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} into a weight {tuple(dense.shape)}"
        )
    merged = (dense + scale * (lora_b.float() @ lora_a.float())).to(out_dtype)
    if requantize:
        if not isinstance(base, NF4Weight):
            raise ValueError("requantize=True needs an NF4 base")
        from peft_fast.nf4 import quantize_nf4

        return quantize_nf4(merged, base.blocksize, base.double_quant)
    return merged
