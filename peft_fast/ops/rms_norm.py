"""``peft_fast::rms_norm``: RMSNorm with an optional fused residual add, as Hugging Face's decoder layers compute it.

``y = RMSNorm(x)``, or ``s = residual + x`` (HF's ``hidden_states = residual + hidden_states``)
and ``y = RMSNorm(s)`` in one kernel pass, with the roundings of ``LlamaRMSNorm`` (Mistral,
Qwen2, Qwen3, Phi-3) or ``GemmaRMSNorm`` (Gemma 1 / 2 / 3). Saved for backward: the norm input
(x, or s), rstd and the weight; never y. The gradient of x and of the residual is the same
``d(norm input) + grad(s)``. The kernels and the torch reference are in :mod:`peft_fast.kernels.rms_norm`.

HF's RMSNorm modules are not autocast ops (they run in their inputs' dtypes), so neither is
this one: nothing is cast under ``torch.autocast`` and the body runs with autocast off.
"""

from __future__ import annotations

import torch

from peft_fast.ops._common import FLOAT_DTYPES, no_autocast, uses_kernels

__all__ = ["rms_norm"]

CASTINGS = ("llama", "gemma")


def _rms_norm_kernels():
    from peft_fast.kernels import rms_norm

    return rms_norm


def _norm_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)


@torch.library.custom_op("peft_fast::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    offset: float,
    casting: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd): s = residual + x (empty without a residual), rstd [x's leading shape] for backward."""
    kernels = _rms_norm_kernels()
    with no_autocast(x.device):
        if not uses_kernels(x):
            return kernels.rms_norm_reference_forward(x, weight, residual, eps, offset, casting)
        return kernels.rms_norm_forward(x, weight, residual, eps, offset, casting)


@_rms_norm_op.register_fake
def _(x, weight, residual, eps, offset, casting):
    norm_dtype = _norm_dtype(x, residual)
    y_dtype = torch.promote_types(weight.dtype, norm_dtype) if casting == "llama" else norm_dtype
    math_dtype = torch.float64 if torch.float64 in (norm_dtype, weight.dtype) else torch.float32
    s = x.new_empty(x.shape if residual is not None else (0,), dtype=norm_dtype)
    return x.new_empty(x.shape, dtype=y_dtype), s, x.new_empty(x.shape[:-1], dtype=math_dtype)


@torch.library.custom_op("peft_fast::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_y: torch.Tensor,
    grad_s: torch.Tensor | None,
    norm_input: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    needs_dx: bool,
    needs_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw): dx in the norm input's dtype (grad_s added), dw in weight's; empty where not needed."""
    kernels = _rms_norm_kernels()
    with no_autocast(grad_y.device):
        backward = kernels.rms_norm_backward if uses_kernels(grad_y) else kernels.rms_norm_reference_backward
        dx, dw = backward(grad_y, grad_s, norm_input, weight, rstd, offset, casting, needs_dx, needs_dw)
    return (norm_input.new_empty(0) if dx is None else dx), (weight.new_empty(0) if dw is None else dw)


@_rms_norm_backward_op.register_fake
def _(grad_y, grad_s, norm_input, weight, rstd, offset, casting, needs_dx, needs_dw):
    return norm_input.new_empty(norm_input.shape if needs_dx else (0,)), weight.new_empty(
        weight.shape if needs_dw else (0,)
    )


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, residual, _eps, offset, casting = inputs
    _y, s, rstd = output
    ctx.save_for_backward(x if residual is None else s, weight, rstd)
    ctx.has_residual = residual is not None
    ctx.input_dtypes = (x.dtype, None if residual is None else residual.dtype)
    ctx.offset, ctx.casting = offset, casting


def _rms_norm_backward(ctx, grad_y, grad_s, _grad_rstd):
    norm_input, weight, rstd = ctx.saved_tensors
    needs_x, needs_w, needs_residual = ctx.needs_input_grad[:3]
    needs_dx = needs_x or needs_residual
    if not (needs_dx or needs_w):
        return None, None, None, None, None, None
    # Without a residual s is an empty placeholder whose (zero) gradient means nothing.
    grad_s = grad_s if ctx.has_residual and grad_s is not None else None
    dx, dw = _rms_norm_backward_op(grad_y, grad_s, norm_input, weight, rstd, ctx.offset, ctx.casting, needs_dx,
                                   needs_w)  # fmt: skip
    x_dtype, residual_dtype = ctx.input_dtypes
    # residual + x: both get d(s), each in its own dtype (as autograd's add does).
    grad_x = dx.to(x_dtype) if needs_x else None
    grad_residual = dx.to(residual_dtype) if needs_residual else None
    return grad_x, (dw if needs_w else None), grad_residual, None, None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    offset: float = 0.0,
    casting: str = "llama",
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, as Hugging Face's modules round it; with ``residual``, fused with the add before it.

    Args:
        x: [..., D], fp32 / fp16 / bf16 (fp64 too: computed in fp64, where HF's modules would
            round it through fp32). Rows may be any strided view with unit stride along D.
        weight: [D] in any float dtype; gets a gradient in its own dtype if it requires one.
        eps: added to the mean square (the module's ``variance_epsilon`` / ``eps``).
        offset: added to the weight in fp32: 1.0 with ``casting="gemma"`` is Gemma's ``1 + w``.
        casting: ``"llama"`` — ``weight * (x·rstd).to(x.dtype)`` in ``promote(weight, x)`` (an
            fp32 weight over bf16 x gives fp32), as ``LlamaRMSNorm``, Mistral, Qwen2/3, Phi-3; or
            ``"gemma"`` — all fp32, one cast to x's dtype, as ``GemmaRMSNorm`` (Gemma 2 / 3).
        residual: optional, x's shape: returns ``(y, s)`` with ``s = residual + x`` in their
            promoted dtype (HF's ``residual + hidden_states``) and ``y = RMSNorm(s)``.

    Returns ``y`` (x's shape), or ``(y, s)`` with a residual. Not an autocast op: under
    ``torch.autocast`` it computes in its inputs' dtypes, as HF's modules do.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise TypeError("x must be a float tensor of shape [..., D]")
    if x.shape[-1] == 0:
        raise ValueError("x must have D > 0 features")
    if not isinstance(weight, torch.Tensor) or weight.shape != (x.shape[-1],) or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be a float tensor [{x.shape[-1]}], got {getattr(weight, 'shape', weight)}")
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    if residual is not None and (
        not isinstance(residual, torch.Tensor) or residual.shape != x.shape or residual.dtype not in FLOAT_DTYPES
    ):
        raise ValueError(f"residual must be a float tensor of x's shape {tuple(x.shape)}")
    devices = {str(t.device) for t in (x, weight, residual) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all operands must be on one device, got {sorted(devices)}")
    y, s, _ = _rms_norm_op(x, weight, residual, float(eps), float(offset), casting)
    return y if residual is None else (y, s)
