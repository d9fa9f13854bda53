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
"""

from __future__ import annotations

import torch

from peft_fast.nf4 import NF4Weight
from peft_fast.ops._common import args_to_base, base_to_args, no_autocast, uses_kernels
from peft_fast.ops.lora_linear import lora_linear
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
            by :func:`dora_weight_norm` otherwise.

    Returns the output in x's dtype. Gradients reach x, A, B, m and the bias; never the norm.
    """
    if magnitude.shape != (base.shape[0],):
        raise ValueError(f"the DoRA magnitude must be [{base.shape[0]}], got {tuple(magnitude.shape)}")
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
