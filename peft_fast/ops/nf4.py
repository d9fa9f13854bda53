"""``peft_fast::nf4_matmul``: ``x · deq(W)ᵀ`` over a frozen NF4 weight, and ``base_linear`` (a layer with no adapter).

The backward multiplies by deq(W) again (``transposed``): only the NF4 weight is saved, never
deq(W) or x (W is frozen, so x is not needed).
"""

from __future__ import annotations

import torch

from peft_fast.nf4 import NF4Weight
from peft_fast.ops._common import autocast_dtype, autocast_inputs, base_to_args, check_input, dense_weight, no_autocast

__all__ = ["base_linear"]


@torch.library.custom_op("peft_fast::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    out_features: int,
    in_features: int,
    transposed: bool,
) -> torch.Tensor:
    """``x · deq(W)ᵀ`` (or ``x · deq(W)`` when ``transposed``) with W dequantized on the fly."""
    nf4 = NF4Weight(packed, absmax, (out_features, in_features), torch.float32, blocksize, nested_absmax, nested_offset)
    with no_autocast(x.device):
        weight = dense_weight(nf4, x.dtype)
        return x @ weight if transposed else x @ weight.t()


@_nf4_matmul_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features, transposed):
    return x.new_empty((*x.shape[:-1], in_features if transposed else out_features))


def _nf4_matmul_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[1:5])  # the NF4 weight only: never deq(W), never x
    ctx.shape_args = inputs[5:9]


def _nf4_matmul_backward(ctx, grad):
    blocksize, out_features, in_features, transposed = ctx.shape_args
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _nf4_matmul_op(grad.contiguous(), *ctx.saved_tensors, blocksize, out_features, in_features,
                                not transposed)  # fmt: skip
    return grad_x, None, None, None, None, None, None, None, None


_nf4_matmul_op.register_autograd(_nf4_matmul_backward, setup_context=_nf4_matmul_setup)


def base_linear(x: torch.Tensor, base: torch.Tensor | NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · deq(W)ᵀ + b`` without an adapter; for an NF4 weight never keeps deq(W) for backward.

    Under ``torch.autocast`` an NF4 layer computes in the autocast dtype, as ``nn.Linear`` does.
    """
    out_features, in_features = base.shape
    check_input(x, in_features)
    if not isinstance(base, NF4Weight):
        return torch.nn.functional.linear(x, base, bias)  # autocast casts this one itself
    x, bias = autocast_inputs(autocast_dtype(x), x, bias)
    y = _nf4_matmul_op(x, *base_to_args(base)[:5], out_features, in_features, False)
    return y if bias is None else y + bias
