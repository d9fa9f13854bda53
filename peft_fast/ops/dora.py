"""DoRA: ``peft_fast::dora_weight_norm`` (``‖W + s·B·A‖`` per output row) and ``dora_linear``, PEFT's DoRA forward.

DoRA (weight-decomposed LoRA) scales each output row of the adapted linear by
``m / ‖W + s·B·A‖`` (m, the trained magnitude vector [N]; the norm over the input features).
As in PEFT (and section 4.3 of the paper) the norm is a constant for autograd: it gets no
gradient, so the op has none. Its kernel (:mod:`peft_fast.kernels.dora`) reads W once and never
builds W + s·B·A in memory; the torch backend runs the reference beside it.

``dora_linear`` is PEFT's ``DoraLinearLayer.forward`` added to the base output:

    y = base(x) + (m/‖·‖ - 1)·(x_d·Wᵀ) + (m/‖·‖)·s·(x_d·Aᵀ)·Bᵀ,   x_d = dropout(x)

Without dropout (eval, or p = 0) PEFT reuses base(x) minus the bias for x_d·Wᵀ, so the whole
layer is ``(m/‖·‖)·(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``: one fused ``peft_fast::lora_linear`` scaled per
column. With dropout PEFT computes base(x) on the undropped x and the DoRA term on x_d, so two
base GEMMs are needed, as in PEFT.

Without dropout and without a cached norm, an NF4 layer runs ``peft_fast::dora_linear``: one op
whose forward is :func:`peft_fast.kernels.dora.dora_linear_forward` (above decode sizes the norm
comes out of the same pass over the NF4 codes that dequantizes W for the GEMM, never a separate
read of W) and whose backward recomputes from the NF4 codes as QLoRA's does: deq(W) is never
kept for the backward, only X, H = X·Aᵀ and Y0 = X·Wᵀ + s·H·Bᵀ (dm needs Y0, as ``dora_scale``'s).
Folding m/‖·‖ into the GEMM operands instead (X·(f⊙W)ᵀ + s·H·(f⊙B)ᵀ) would save the pass over Y
but not Y0, which the magnitude's gradient needs and which that GEMM never forms (Y0 = (Y − b)/f
divides by f, wrong where m ≈ 0); it was not built.
"""

from __future__ import annotations

import math

import torch

from peft_fast.nf4 import NF4Weight
from peft_fast.ops._common import (
    accumulate_dtype,
    args_to_base,
    autocast_dtype,
    autocast_inputs,
    base_to_args,
    no_autocast,
    seed_tensor,
    uses_kernels,
)
from peft_fast.ops.lora_linear import _check_lora_inputs, _lora_linear_backward_op, lora_linear
from peft_fast.ops.nf4 import base_linear

__all__ = ["dora_linear", "dora_scale", "dora_weight_norm"]


@torch.library.custom_op("peft_fast::dora_weight_norm", mutates_args=())
def _dora_weight_norm_op(
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    base = args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, lora_b.shape[0], lora_a.shape[1])
    from peft_fast.kernels import dora as kernels

    with no_autocast(lora_a.device):
        if uses_kernels(lora_a.device) and lora_a.dtype != torch.float64:
            return kernels.dora_weight_norm_triton(base, lora_a, lora_b, scale)
        return kernels.dora_weight_norm_reference(base, lora_a, lora_b, scale)


@_dora_weight_norm_op.register_fake
def _(weight, absmax, nested_absmax, nested_offset, blocksize, lora_a, lora_b, scale):
    return lora_a.new_empty((lora_b.shape[0],))


def dora_weight_norm(
    base: torch.Tensor | NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``‖W + s·B·A‖₂`` over each row of W [N, K], in lora_a's dtype, with no gradient.

    A dense ``base`` must be in lora_a's dtype; an NF4 base is dequantized to it (PEFT's
    ``dequantize_module_weight(...).to(x.dtype)``). The roundings are PEFT's in that dtype.
    """
    if not isinstance(base, (torch.Tensor, NF4Weight)):
        raise TypeError(f"base must be a torch.Tensor or an NF4Weight, got {type(base).__name__}")
    if isinstance(base, torch.Tensor):
        base = base.detach().contiguous()
    lora_a, lora_b = lora_a.detach().contiguous(), lora_b.detach().contiguous()
    return _dora_weight_norm_op(*base_to_args(base), lora_a, lora_b, float(scale))


@torch.library.custom_op("peft_fast::dora_scale", mutates_args=())
def _dora_scale_op(
    y: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    from peft_fast.kernels import dora as kernels

    with no_autocast(y.device):
        if uses_kernels(y):
            return kernels.dora_scale_triton(y, magnitude, norm, bias)
        return kernels.dora_scale_reference(y, magnitude, norm, bias)


@_dora_scale_op.register_fake
def _(y, magnitude, norm, bias):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _dora_scale_setup_context(ctx, inputs, output) -> None:
    y, magnitude, norm, bias = inputs
    ctx.save_for_backward(y, magnitude, norm)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dora_scale_backward(ctx, grad_out):
    y, magnitude, norm = ctx.saved_tensors
    needs_y, needs_m, _needs_norm, needs_bias = ctx.needs_input_grad
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    # d/dy: the same column scale of the gradient (one kernel pass); d/dm: Σ_rows dOut·y / ‖·‖ (the
    # norm is a constant for autograd, as in PEFT); d/db: Σ_rows dOut.
    grad_y = grad_m = None
    if needs_m and uses_kernels(y):  # dY_in and Σ_rows dOut·Y in one pass over both
        from peft_fast.kernels import dora as kernels

        grad_y, column_sums = kernels.dora_scale_backward_triton(grad_out, y, magnitude, norm)
        grad_m = (column_sums / norm.float()).to(magnitude.dtype)
        grad_y = grad_y if needs_y else None
    else:
        grad_y = _dora_scale_op(grad_out.contiguous(), magnitude, norm, None) if needs_y else None
        grad_m = ((grad_out.to(acc) * y.to(acc)).sum(0) / norm.to(acc)).to(magnitude.dtype) if needs_m else None
    grad_bias = grad_out.to(acc).sum(0).to(ctx.bias_dtype) if needs_bias else None
    return grad_y, grad_m, None, grad_bias


_dora_scale_op.register_autograd(_dora_scale_backward, setup_context=_dora_scale_setup_context)


def dora_scale(
    y: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y · (m / ‖W + s·B·A‖) + b`` per output column of y [..., N], fp32 inside, in y's dtype, one pass.

    Gradients reach y, the magnitude m and the bias; never the norm (PEFT detaches it).
    """
    lead = y.shape[:-1]
    out = _dora_scale_op(y.reshape(-1, y.shape[-1]), magnitude, norm.detach(), bias)
    return out.reshape(*lead, y.shape[-1])


@torch.library.custom_op("peft_fast::dora_linear", mutates_args=())
def _dora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, ‖W + s·B·A‖, Y0, H): DoRA without dropout; only ``out`` is differentiable."""
    base = args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, lora_b.shape[0], x.shape[1])
    from peft_fast.kernels import dora as kernels

    with no_autocast(x.device):
        if uses_kernels(x):
            return kernels.dora_linear_forward(x, base, lora_a, lora_b, magnitude, bias, scale)
        return kernels.dora_linear_reference_forward(x, base, lora_a, lora_b, magnitude, bias, scale)


@_dora_linear_op.register_fake
def _(x, weight, absmax, nested_absmax, nested_offset, blocksize, lora_a, lora_b, magnitude, bias, scale):
    m, n = x.shape[0], lora_b.shape[0]
    return x.new_empty((m, n)), lora_a.new_empty((n,)), x.new_empty((m, n)), x.new_empty((m, lora_a.shape[0]))


def _dora_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, absmax, nested_absmax, nested_offset, blocksize, lora_a, lora_b, magnitude, bias, scale = inputs
    _, norm, y0, h = output
    # The NF4 codes, never deq(W): the backward dequantizes again, as QLoRA's does.
    ctx.save_for_backward(x, h, y0, norm, weight, absmax, nested_absmax, nested_offset, lora_a, lora_b, magnitude)
    ctx.blocksize, ctx.scale = blocksize, scale
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dora_linear_backward(ctx, grad_out, _grad_norm, _grad_y0, _grad_h):
    # The norm, Y0 and H are outputs only so that the backward can reuse them (the public wrapper
    # returns ``out`` alone): their gradients are ignored; the norm is a constant, as in PEFT.
    x, h, y0, norm, weight, absmax, nested_absmax, nested_offset, lora_a, lora_b, magnitude = ctx.saved_tensors
    needs_dx, needs_da, needs_db, needs_m, needs_bias = (ctx.needs_input_grad[i] for i in (0, 6, 7, 8, 9))
    grad_out = grad_out.contiguous()
    grad_y = grad_m = None
    needs_lora = needs_dx or needs_da or needs_db
    if needs_m and uses_kernels(y0):  # dY0 = dOut·(m/‖·‖) and Σ_rows dOut·Y0 in one pass over both
        from peft_fast.kernels import dora as kernels

        grad_y, column_sums = kernels.dora_scale_backward_triton(grad_out, y0, magnitude, norm)
        grad_m = (column_sums / norm.float()).to(magnitude.dtype)
    else:
        if needs_lora:
            grad_y = _dora_scale_op(grad_out, magnitude, norm, None)
        if needs_m:
            acc = accumulate_dtype(y0.dtype)
            grad_m = ((grad_out.to(acc) * y0.to(acc)).sum(0) / norm.to(acc)).to(magnitude.dtype)
    grad_x = grad_a = grad_b = None
    if needs_lora:
        grad_x, grad_a, grad_b = _lora_linear_backward_op(
            grad_y, x, h, weight, absmax, nested_absmax, nested_offset, ctx.blocksize, lora_a, lora_b,
            ctx.scale, 0.0, seed_tensor(0), needs_dx, needs_da, needs_db,
        )  # fmt: skip
    grad_bias = grad_out.sum(0, dtype=accumulate_dtype(grad_out.dtype)).to(ctx.bias_dtype) if needs_bias else None
    return (
        grad_x if needs_dx else None, None, None, None, None, None,
        grad_a if needs_da else None, grad_b if needs_db else None, grad_m, grad_bias, None,
    )  # fmt: skip


_dora_linear_op.register_autograd(_dora_linear_backward, setup_context=_dora_linear_setup_context)


def _dora_linear_nf4(x, base: NF4Weight, lora_a, lora_b, magnitude, bias, scale: float) -> torch.Tensor:
    """``peft_fast::dora_linear`` on inputs of any leading shape (autocast as :func:`lora_linear`'s)."""
    cast = autocast_dtype(x)
    x, lora_a, lora_b, bias = autocast_inputs(cast, x, lora_a, lora_b, bias)
    _check_lora_inputs(x, base, lora_a, lora_b, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), x.shape[-1]).contiguous()
    out, _, _, _ = _dora_linear_op(
        x2d, *base_to_args(base), lora_a.contiguous(), lora_b.contiguous(), magnitude, bias, float(scale)
    )
    return out.reshape(*lead, out.shape[-1])


def dora_linear(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    dropped: torch.Tensor | None = None,
    weight_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """PEFT's DoRA linear: ``base(x) + (m/‖W + s·B·A‖ - 1)·(x_d·Wᵀ) + (m/‖·‖)·s·(x_d·Aᵀ)·Bᵀ``.

    Args:
        x: activations [..., K]; ``base`` (W [N, K], dense or NF4), ``lora_a`` [r, K], ``lora_b``
            [N, r] and ``bias`` [N] in x's dtype, as for :func:`peft_fast.ops.lora_linear`.
        magnitude: m [N], any float dtype (PEFT keeps it in the adapter's dtype, fp32 over a
            half-precision base); the per-column scale m/‖·‖ is formed and applied in fp32.
        dropped: dropout(x) for the DoRA term (training with dropout), or None when there is none
            (then base(x) itself is reused, as PEFT does, and the layer is one fused GEMM).
        weight_norm: the norm, if the caller holds it already (an inference cache); computed
            by :func:`dora_weight_norm` otherwise, or, over NF4 without dropout, inside the
            pass that dequantizes W for the GEMM (``peft_fast::dora_linear``).

    Returns the output in x's dtype. Gradients reach x, A, B, m and the bias; never the norm.
    """
    if magnitude.shape != (base.shape[0],):
        raise ValueError(f"the DoRA magnitude must be [{base.shape[0]}], got {tuple(magnitude.shape)}")
    if dropped is None and weight_norm is None and isinstance(base, NF4Weight):
        return _dora_linear_nf4(x, base, lora_a, lora_b, magnitude, bias, scale)
    norm = dora_weight_norm(base, lora_a, lora_b, scale) if weight_norm is None else weight_norm.detach()
    if dropped is None:  # one fused LoRA forward, then m/‖·‖ and the bias in one pass over it
        y = lora_linear(x, base, lora_a, lora_b, None, scale=scale)
        return dora_scale(y, magnitude, norm, bias).to(x.dtype)
    factor = magnitude.float() / norm.float()  # PEFT's mag_norm_scale, [N]
    y = base_linear(x, base, bias)
    both = lora_linear(dropped, base, lora_a, lora_b, None, scale=scale)  # x_d·Wᵀ + s·(x_d·Aᵀ)·Bᵀ
    lora = scale * ((dropped @ lora_a.t()) @ lora_b.t())
    # (f - 1)·(x_d·Wᵀ) + f·L = (f - 1)·(x_d·Wᵀ + L) + L, so the fused op gives both terms at once.
    return (y.float() + (factor - 1) * both.float() + lora.float()).to(x.dtype)
