"""``peft_fast::bottleneck_adapter``: ``Y = R + s·drop(up(act(down(LN?(X)))))`` as one custom op, forward and backward.

R = X for a serial adapter, the host sublayer's output for a parallel one. Saved for backward: X,
the pre-activation Z = down(LN?(X)), the LayerNorm's mean and 1/std, the seed, and references to
the weights; never act(Z), LN(X) or a mask. The kernels and the torch reference are in
:mod:`peft_fast.kernels.adapter`.
"""

from __future__ import annotations

import torch

from peft_fast.config import ADAPTER_NON_LINEARITIES
from peft_fast.ops._common import (
    FLOAT_DTYPES,
    accumulate_dtype,
    autocast_dtype,
    autocast_inputs,
    dropout_mask,
    no_autocast,
    seed_tensor,
    uses_kernels,
)

__all__ = ["bottleneck_adapter"]


def _adapter_kernels():
    from peft_fast.kernels import adapter

    return adapter


def _output_keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
    return None if p == 0.0 else dropout_mask(seed, x.shape[0], x.shape[1], p, x.device)


# -- bottleneck adapter: the custom op ---------------------------------------------------------


@torch.library.custom_op("peft_fast::bottleneck_adapter", mutates_args=())
def _bottleneck_adapter_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: float,
    activation: str,
    ln_eps: float,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, mean, rstd); z, mean and rstd exist for the backward only."""
    kernels = _adapter_kernels()
    args = (x, residual, ln_weight, ln_bias, ln_eps, down_weight, down_bias, up_weight, up_bias, scale, activation)
    with no_autocast(x.device):
        if uses_kernels(x):
            return kernels.bottleneck_adapter_forward(*args, dropout_p, int(seed))
        return kernels.bottleneck_adapter_reference_forward(*args, _output_keep(x, dropout_p, int(seed)), dropout_p)


@_bottleneck_adapter_op.register_fake
def _(x, residual, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale, activation, ln_eps,
      dropout_p, seed):  # fmt: skip
    stats = x.shape[0] if ln_weight is not None else 0
    acc = accumulate_dtype(x.dtype)
    return (
        x.new_empty(x.shape), x.new_empty((x.shape[0], down_weight.shape[0])),
        x.new_empty((stats,), dtype=acc), x.new_empty((stats,), dtype=acc),
    )  # fmt: skip


@torch.library.custom_op("peft_fast::bottleneck_adapter_backward", mutates_args=())
def _bottleneck_adapter_backward_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    up_weight: torch.Tensor,
    scale: float,
    activation: str,
    ln_eps: float,
    dropout_p: float,
    seed: torch.Tensor,
    residual_is_x: bool,
    needs_dx: bool,
    needs_dln: bool,
    needs_ddown: bool,
    needs_dup: bool,
) -> list[torch.Tensor]:
    """[dx, dln_weight, dln_bias, ddown_weight, ddown_bias, dup_weight, dup_bias]; empty where not needed."""
    flags = (residual_is_x, needs_dx, needs_dln, needs_ddown, needs_dup)
    kernels = _adapter_kernels()
    with no_autocast(x.device):
        if not uses_kernels(x):
            keep = _output_keep(grad_y, dropout_p, int(seed))
            grads = kernels.bottleneck_adapter_reference_backward(grad_y, x, z, mean, rstd, ln_weight, ln_bias, ln_eps,
                                                                  down_weight, up_weight, scale, activation, keep,
                                                                  dropout_p, *flags)  # fmt: skip
        else:
            grads = kernels.bottleneck_adapter_backward(
                grad_y, x, z, mean, rstd, ln_weight, ln_bias, down_weight, up_weight, scale, activation, dropout_p,
                int(seed), *flags,
            )  # fmt: skip
    needs_dln = needs_dln and ln_weight is not None
    wanted = (needs_dx, needs_dln, needs_dln, needs_ddown, needs_ddown, needs_dup, needs_dup)
    return [g if needed and g is not None else x.new_empty(0) for g, needed in zip(grads, wanted, strict=True)]


@_bottleneck_adapter_backward_op.register_fake
def _(grad_y, x, z, mean, rstd, ln_weight, ln_bias, down_weight, up_weight, scale, activation, ln_eps, dropout_p,
      seed, residual_is_x, needs_dx, needs_dln, needs_ddown, needs_dup):  # fmt: skip
    d = x.shape[1]
    b = down_weight.shape[0]
    needs_dln = needs_dln and ln_weight is not None
    wanted = (((x.shape[0], d), needs_dx), ((d,), needs_dln), ((d,), needs_dln), ((b, d), needs_ddown),
              ((b,), needs_ddown), ((d, b), needs_dup), ((d,), needs_dup))  # fmt: skip
    return [x.new_empty(shape if needed else (0,)) for shape, needed in wanted]


def _adapter_setup_context(ctx, inputs, output) -> None:
    x, residual, ln_weight, ln_bias, down_weight, _, up_weight, _, scale, activation, ln_eps, dropout_p, seed = inputs
    _, z, mean, rstd = output
    ctx.save_for_backward(x, z, mean, rstd, ln_weight, ln_bias, down_weight, up_weight, seed)
    ctx.scale, ctx.activation, ctx.ln_eps, ctx.dropout_p = scale, activation, ln_eps, dropout_p
    ctx.residual_is_x = residual is None


def _adapter_backward(ctx, grad_y, _grad_z, _grad_mean, _grad_rstd):
    # z, mean and rstd are outputs only so that backward can reuse them; the public wrapper never
    # exposes them, so their gradients are ignored.
    x, z, mean, rstd, ln_weight, ln_bias, down_weight, up_weight, seed = ctx.saved_tensors
    wanted = ctx.needs_input_grad
    needs = (wanted[0], wanted[2] or wanted[3], wanted[4] or wanted[5], wanted[6] or wanted[7])
    grads: list[torch.Tensor | None] = [None] * 7
    if any(needs):
        grads = _bottleneck_adapter_backward_op(
            grad_y.contiguous(), x, z, mean, rstd, ln_weight, ln_bias, down_weight, up_weight, ctx.scale,
            ctx.activation, ctx.ln_eps, ctx.dropout_p, seed, ctx.residual_is_x, *needs,
        )  # fmt: skip
    dx, d_ln_w, d_ln_b, d_down_w, d_down_b, d_up_w, d_up_b = (g if g is not None and g.numel() else None for g in grads)
    d_residual = grad_y if wanted[1] else None  # R enters Y with weight 1
    return (
        dx if wanted[0] else None, d_residual, d_ln_w if wanted[2] else None, d_ln_b if wanted[3] else None,
        d_down_w if wanted[4] else None, d_down_b if wanted[5] else None,
        d_up_w if wanted[6] else None, d_up_b if wanted[7] else None, None, None, None, None, None,
    )  # fmt: skip


_bottleneck_adapter_op.register_autograd(_adapter_backward, setup_context=_adapter_setup_context)


def _check_adapter_inputs(x, down_weight, down_bias, up_weight, up_bias, residual, ln_weight, ln_bias, activation):
    """Clear errors for what the op cannot take; layout problems are fixed by the caller."""
    if activation not in ADAPTER_NON_LINEARITIES:
        raise ValueError(f"unknown activation {activation!r}; valid choices: {', '.join(ADAPTER_NON_LINEARITIES)}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise TypeError("x must be a float tensor of shape [..., hidden_size]")
    d = x.shape[-1]
    if not isinstance(down_weight, torch.Tensor) or down_weight.dim() != 2 or down_weight.shape[1] != d:
        raise ValueError(f"down_weight must be [bottleneck, {d}], got {tuple(getattr(down_weight, 'shape', ()))}")
    b = down_weight.shape[0]
    if not 1 <= b <= d:
        raise ValueError(f"the bottleneck size ({b}) must be between 1 and the hidden size ({d})")
    expected = [("down_bias", down_bias, (b,)), ("up_weight", up_weight, (d, b)), ("up_bias", up_bias, (d,))]
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("give both ln_weight and ln_bias, or neither")
    if ln_weight is not None:
        expected += [("ln_weight", ln_weight, (d,)), ("ln_bias", ln_bias, (d,))]
    if residual is not None:
        expected.append(("residual", residual, tuple(x.shape)))
    for name, tensor, shape in [("down_weight", down_weight, (b, d)), *expected]:
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(tensor, 'shape', ()))}")
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} is {tensor.dtype} but x is {x.dtype}; cast them to one dtype")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def bottleneck_adapter(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    ln_eps: float = 1e-5,
    scale: float = 1.0,
    activation: str = "relu",
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """``residual + scale·dropout(act(LN?(x)·Wdᵀ + bd)·Wuᵀ + bu)`` for x of any leading shape [..., D].

    Args:
        x: the adapter's input [..., D]; residual: what its output is added to (default: x, a
            serial adapter; a parallel adapter passes the host sublayer's output).
        down_weight [B, D], down_bias [B], up_weight [D, B], up_bias [D]: the projections, x's dtype.
        ln_weight, ln_bias, ln_eps: an optional LayerNorm on x.
        activation: "relu", "gelu" (exact, erf form) or "swish" (x·σ(x)).
        dropout_p: dropout on the adapter's output, applied only when ``training``; ``seed``
            fixes its mask (drawn from torch's generator when None).

    Under ``torch.autocast`` x, the weights (LayerNorm's too) and any fp32 / fp16 / bf16 dtype mix
    are cast to the autocast dtype and the adapter computes in it, as ``nn.Linear`` layers would;
    the residual keeps its own precision: a residual (x, for a serial adapter) wider than the
    autocast dtype is added to the adapter's output outside the op, in the promoted dtype, as
    ``residual + adapter(x)`` gives under autocast. Gradients come back in each tensor's dtype.
    """
    cast = autocast_dtype(x) if isinstance(x, torch.Tensor) else None
    if cast is not None:
        wide = x if residual is None else residual
        if isinstance(wide, torch.Tensor) and wide.dtype != cast and torch.promote_types(wide.dtype, cast) != cast:
            # Rounding the residual stream to the autocast dtype would lose what autocast keeps:
            # the op adds its update to zeros, and the wide residual is added here.
            if tuple(wide.shape) != tuple(x.shape):
                raise ValueError(f"residual must have shape {tuple(x.shape)}, got {tuple(wide.shape)}")
            if wide.device != x.device:
                raise ValueError(f"residual is on {wide.device} but x is on {x.device}")
            zeros = torch.zeros(x.shape, dtype=cast, device=x.device)
            update = bottleneck_adapter(
                x.to(cast), down_weight, down_bias, up_weight, up_bias, residual=zeros, ln_weight=ln_weight,
                ln_bias=ln_bias, ln_eps=ln_eps, scale=scale, activation=activation, dropout_p=dropout_p,
                training=training, seed=seed,
            )  # fmt: skip
            return wide + update
        x, residual, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias = autocast_inputs(
            cast, x, residual, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias
        )
    _check_adapter_inputs(x, down_weight, down_bias, up_weight, up_bias, residual, ln_weight, ln_bias, activation)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    dropout_p = float(dropout_p) if training else 0.0
    seed_arg = seed_tensor(seed if seed is not None or dropout_p > 0.0 else 0)
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).contiguous()
    r2d = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
    tensors = (ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias)
    ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias = (
        None if t is None else t.contiguous() for t in tensors
    )
    y, _, _, _ = _bottleneck_adapter_op(x2d, r2d, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias,
                                        float(scale), activation, float(ln_eps), dropout_p, seed_arg)  # fmt: skip
    return y.reshape(shape)
