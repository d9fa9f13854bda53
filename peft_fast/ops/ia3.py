"""``peft_fast::ia3_linear``: a linear layer whose output (or input) is scaled by a learned vector, as one custom op.

``(x·deq(W)ᵀ + b) ⊙ l`` (output scaling) or ``(x ⊙ l)·deq(W)ᵀ + b`` (PEFT's feed-forward case),
over a dense or NF4 weight. Saved: the unscaled output Y0 (output scaling) or X (input scaling),
never deq(W). The torch backend computes the base matmul exactly as ``nn.Linear`` and
``NF4Linear`` do, so an (IA)³ vector of ones leaves outputs bit-identical there. The kernels and
the torch reference are in :mod:`peft_fast.kernels.ia3`.
"""

from __future__ import annotations

import torch

from peft_fast.nf4 import NF4Weight
from peft_fast.ops._common import (
    FLOAT_DTYPES,
    accumulate_dtype,
    args_to_base,
    autocast_dtype,
    autocast_inputs,
    base_to_args,
    no_autocast,
    uses_kernels,
)

__all__ = ["ia3_linear"]


def _ia3_kernels():
    from peft_fast.kernels import ia3

    return ia3


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("peft_fast::ia3_linear", mutates_args=())
def _ia3_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    out_features: int,
    in_features: int,
    ia3_scale: torch.Tensor,
    bias: torch.Tensor | None,
    scale_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, y0): y0 is the unscaled output, kept for the backward of output scaling (else empty)."""
    base = args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features)
    kernels = _ia3_kernels()
    with no_autocast(x.device):
        if not uses_kernels(x):
            return kernels.ia3_linear_reference_forward(x, base, ia3_scale, bias, scale_input)
        y, y0 = kernels.ia3_linear_forward(_flat(x), base, ia3_scale, bias, scale_input)
    lead = x.shape[:-1]
    return y.reshape(*lead, out_features), (x.new_empty(0) if scale_input else y0.reshape(*lead, out_features))


@_ia3_linear_op.register_fake
def _(x, weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features, ia3_scale, bias,
      scale_input):  # fmt: skip
    y = x.new_empty((*x.shape[:-1], out_features))
    return y, x.new_empty(0) if scale_input else x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("peft_fast::ia3_linear_backward", mutates_args=())
def _ia3_linear_backward_op(
    grad_y: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    out_features: int,
    in_features: int,
    ia3_scale: torch.Tensor,
    scale_input: bool,
    needs_dx: bool,
    needs_dl: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dl); a gradient that is not needed comes back as an empty tensor."""
    base = args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features)
    kernels = _ia3_kernels()
    with no_autocast(grad_y.device):
        if not uses_kernels(grad_y):
            dx, dl = kernels.ia3_linear_reference_backward(grad_y, saved, base, ia3_scale, scale_input, needs_dx,
                                                           needs_dl)  # fmt: skip
        else:
            dx, dl = kernels.ia3_linear_backward(_flat(grad_y), _flat(saved), base, ia3_scale, scale_input,
                                                        needs_dx, needs_dl)  # fmt: skip
            dx = None if dx is None else dx.reshape(*grad_y.shape[:-1], in_features)
    return (grad_y.new_empty(0) if dx is None else dx), (ia3_scale.new_empty(0) if dl is None else dl)


@_ia3_linear_backward_op.register_fake
def _(grad_y, saved, weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features, ia3_scale,
      scale_input, needs_dx, needs_dl):  # fmt: skip
    dx = grad_y.new_empty((*grad_y.shape[:-1], in_features) if needs_dx else (0,))
    return dx, ia3_scale.new_empty(ia3_scale.shape if needs_dl else (0,))


def _ia3_setup_context(ctx, inputs, output) -> None:
    x, weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features = inputs[:8]
    ia3_scale, bias, scale_input = inputs[8:]
    # Input scaling needs X for dl; output scaling needs Y0 (and dX needs only l and W).
    saved = x if scale_input else output[1]
    ctx.save_for_backward(saved, weight, absmax, nested_absmax, nested_offset, ia3_scale)
    ctx.shape_args = (blocksize, out_features, in_features)
    ctx.scale_input = scale_input
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ia3_backward(ctx, grad_y, _grad_y0):
    saved, weight, absmax, nested_absmax, nested_offset, ia3_scale = ctx.saved_tensors
    needs_dx, needs_dl, needs_dbias = (ctx.needs_input_grad[i] for i in (0, 8, 9))
    grad_x = grad_l = grad_bias = None
    if needs_dx or needs_dl:
        grad_x, grad_l = _ia3_linear_backward_op(grad_y.contiguous(), saved, weight, absmax, nested_absmax,
                                                 nested_offset, *ctx.shape_args, ia3_scale, ctx.scale_input,
                                                 needs_dx, needs_dl)  # fmt: skip
    if needs_dbias:
        grad_b = grad_y if ctx.scale_input else grad_y.to(ia3_scale.dtype) * ia3_scale
        grad_bias = _flat(grad_b).sum(0, dtype=ia3_scale.dtype).to(ctx.bias_dtype)
    return (grad_x if needs_dx else None, None, None, None, None, None, None, None,
            grad_l if needs_dl else None, grad_bias, None)  # fmt: skip


_ia3_linear_op.register_autograd(_ia3_backward, setup_context=_ia3_setup_context)


def ia3_linear(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    ia3_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_input: bool = False,
) -> torch.Tensor:
    """``(x·deq(W)ᵀ + b) ⊙ l``, or ``(x ⊙ l)·deq(W)ᵀ + b`` with ``scale_input`` (PEFT's feed-forward case).

    Args:
        x: activations [..., K] (fp32, fp16, bf16 or, on the torch backend, fp64).
        base: the frozen W [N, K], a dense tensor of x's dtype or an :class:`NF4Weight`.
        ia3_scale: l, a vector of N entries (K with ``scale_input``) in any float dtype; it is
            applied in fp32 (fp64 for fp64 x), and its gradient comes back in its own dtype.
        bias: optional [N] in x's dtype; gets a gradient if it requires one. W never does.

    Under ``torch.autocast`` x, a dense W and the bias are cast to the autocast dtype (the NF4
    scales never are), so the GEMM runs and y comes out in it, as PEFT's (IA)³ over ``nn.Linear``;
    l is still applied in fp32 and its gradient comes back in its own dtype.
    """
    if not isinstance(base, (torch.Tensor, NF4Weight)):
        raise TypeError(f"base must be a torch.Tensor or an NF4Weight, got {type(base).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise TypeError("x must be a float tensor of shape [..., in_features]")
    cast = autocast_dtype(x)
    x, bias = autocast_inputs(cast, x, bias)
    if isinstance(base, torch.Tensor):
        (base,) = autocast_inputs(cast, base)
    out_features, in_features = base.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but the base weight expects {in_features}")
    length = in_features if scale_input else out_features
    if not isinstance(ia3_scale, torch.Tensor) or ia3_scale.numel() != length or not ia3_scale.is_floating_point():
        what = "in_features (input scaling)" if scale_input else "out_features (output scaling)"
        raise ValueError(f"ia3_scale must be a float vector of {what} = {length} entries")
    if isinstance(base, torch.Tensor) and base.dtype != x.dtype:
        raise TypeError(f"the base weight is {base.dtype} but x is {x.dtype}; cast them to one dtype")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{out_features}] in x's dtype {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    devices = {str(t.device) for t in (x, base, ia3_scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(devices)}")
    ia3_scale = ia3_scale.reshape(length).to(accumulate_dtype(x.dtype))
    weight, absmax, nested_absmax, nested_offset, blocksize = base_to_args(base)
    y, _ = _ia3_linear_op(x, weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features,
                          ia3_scale, bias, bool(scale_input))  # fmt: skip
    return y
