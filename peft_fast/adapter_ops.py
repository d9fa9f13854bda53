"""Autograd-aware ops for bottleneck adapters and (IA)³, with the backends of :mod:`peft_fast.ops`.

* ``bottleneck_adapter``: ``Y = R + s·drop(up(act(down(LN?(X)))))`` as the custom op
  ``peft_fast::bottleneck_adapter`` (R = X for a serial adapter, the host sublayer's output for
  a parallel one). Saved for backward: X, the pre-activation Z = down(LN?(X)), the LayerNorm's
  mean and 1/std, the seed, and references to the weights; never act(Z), LN(X) or a mask.
* ``ia3_linear``: a linear layer whose output (or, for feed-forward modules, input) is scaled
  by a learned vector, as the custom op ``peft_fast::ia3_linear``, over a dense or NF4 weight.
  Saved: the unscaled output Y0 (output scaling) or X (input scaling), never deq(W).

Both have fake (meta) implementations and registered autograd formulas, so ``torch.compile``
sees single ops. The backend follows :func:`peft_fast.ops.backend_name`: the Triton kernels of
``peft_fast/kernels/adapter.py`` / ``ia3.py`` on CUDA or under the interpreter, plain torch with
the same math on CPU. The torch backend computes the base matmul exactly as ``nn.Linear`` and
``NF4Linear`` do, so an (IA)³ vector of ones leaves outputs bit-identical there.

Under ``torch.autocast`` both compute in the autocast dtype, as the ``nn.Linear`` layers they
stand for would (see :mod:`peft_fast.ops`); the op bodies run with autocast off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peft_fast.config import ADAPTER_NON_LINEARITIES
from peft_fast.nf4 import NF4Weight, dequantize_nf4
from peft_fast.ops import autocast_dtype, autocast_inputs, backend_name, dropout_mask, no_autocast

__all__ = ["bottleneck_adapter", "ia3_linear"]

_SEED_BOUND = 2**31 - 1
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _seed_tensor(seed: int | None) -> torch.Tensor:
    """The dropout seed as a CPU int64 tensor, drawn from torch's generator when None.

    Drawn from the global generator, so gradient checkpointing (which restores the RNG state)
    replays the same seed and mask.
    """
    if seed is None:
        return torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64)
    if not 0 <= int(seed) <= _SEED_BOUND:
        raise ValueError(f"seed must be in [0, 2**31 - 1], got {seed}")
    return torch.tensor([int(seed)], dtype=torch.int64)


def _dropped(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the mask of ``seed`` (a dropped element is exactly 0)."""
    if p == 0.0:
        return t
    keep = dropout_mask(seed, t.shape[0], t.shape[1], p, t.device)
    return torch.where(keep, t / (1.0 - p), 0.0)


# -- bottleneck adapter: torch backend ---------------------------------------------------------

_TORCH_ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "swish": F.silu}


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and elementwise math: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(z) in the accumulation dtype (relu' is 0 at 0, as torch's)."""
    z = z.to(_accumulate_dtype(z.dtype))
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def _layer_norm(x, ln_weight, ln_bias, ln_eps):
    """(LN(x) in x's dtype, mean [M], rstd [M]); without LayerNorm (x, empty, empty).

    Computed here rather than by torch's layer norm, whose CPU statistics for bf16 inputs are
    themselves rounded to bf16; the kernels keep them in fp32 and so does this.
    """
    acc = _accumulate_dtype(x.dtype)
    if ln_weight is None:
        return x, x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)  # distinct: op outputs may not alias
    xs = x.to(acc)
    mean = xs.mean(-1)
    rstd = torch.rsqrt((xs - mean[:, None]).square().mean(-1) + ln_eps)
    h = (xs - mean[:, None]) * rstd[:, None] * ln_weight.to(acc) + ln_bias.to(acc)
    return h.to(x.dtype), mean, rstd


def _layer_norm_backward(dh, x, mean, rstd, ln_weight):
    """(dx, dγ, dβ) of :func:`_layer_norm`: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dh·γ."""
    acc = mean.dtype
    x_hat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    dh = dh.to(acc)
    g = dh * ln_weight.to(acc)
    dx = (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd[:, None]
    return dx.to(x.dtype), (dh * x_hat).sum(0).to(x.dtype), dh.sum(0).to(x.dtype)


def _torch_adapter_forward(x, residual, ln_weight, ln_bias, ln_eps, down_w, down_b, up_w, up_b, scale, activation,
                           dropout_p, seed):  # fmt: skip
    h, mean, rstd = _layer_norm(x, ln_weight, ln_bias, ln_eps)
    z = F.linear(h, down_w, down_b)
    u = F.linear(_TORCH_ACTIVATIONS[activation](z), up_w, up_b)
    # A zero up-projection gives u = 0 exactly, so y equals the residual bit for bit.
    y = (x if residual is None else residual) + scale * _dropped(u, dropout_p, seed)
    return y, z, mean, rstd


def _torch_adapter_backward(grad_y, x, z, mean, rstd, ln_weight, ln_bias, ln_eps, down_w, up_w, scale, activation,
                            dropout_p, seed, residual_is_x, needs_dx, needs_dln, needs_ddown, needs_dup):  # fmt: skip
    dtype, acc = x.dtype, _accumulate_dtype(x.dtype)
    g = (scale * _dropped(grad_y, dropout_p, seed)).to(dtype)
    d_up_w = d_up_b = d_down_w = d_down_b = dx = d_ln_w = d_ln_b = None
    if needs_dup:
        d_up_w = g.t() @ _TORCH_ACTIVATIONS[activation](z)
        d_up_b = g.sum(0, dtype=acc).to(dtype)
    if not (needs_dx or needs_dln or needs_ddown):
        return dx, d_ln_w, d_ln_b, d_down_w, d_down_b, d_up_w, d_up_b
    dz = ((g @ up_w).to(acc) * _activation_grad(z, activation)).to(dtype)
    if needs_ddown:
        d_down_w = dz.t() @ _layer_norm(x, ln_weight, ln_bias, ln_eps)[0]
        d_down_b = dz.sum(0, dtype=acc).to(dtype)
    if needs_dx or needs_dln:
        dh = dz @ down_w
        if ln_weight is None:
            dx = dh
        else:
            dx, d_ln_w, d_ln_b = _layer_norm_backward(dh, x, mean, rstd, ln_weight)
        if needs_dx and residual_is_x:
            dx = dx + grad_y
    return dx, d_ln_w, d_ln_b, d_down_w, d_down_b, d_up_w, d_up_b


# -- bottleneck adapter: the custom op ---------------------------------------------------------


def _adapter_kernels():
    from peft_fast.kernels import adapter

    return adapter


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
    args = (x, residual, ln_weight, ln_bias, ln_eps, down_weight, down_bias, up_weight, up_bias, scale, activation,
            dropout_p, int(seed))  # fmt: skip
    with no_autocast(x.device):
        if backend_name(x.device) == "torch-cpu":
            return _torch_adapter_forward(*args)
        return _adapter_kernels().bottleneck_adapter_forward(*args)


@_bottleneck_adapter_op.register_fake
def _(x, residual, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale, activation, ln_eps,
      dropout_p, seed):  # fmt: skip
    stats = x.shape[0] if ln_weight is not None else 0
    acc = _accumulate_dtype(x.dtype)
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
    with no_autocast(x.device):
        if backend_name(x.device) == "torch-cpu":
            grads = _torch_adapter_backward(grad_y, x, z, mean, rstd, ln_weight, ln_bias, ln_eps, down_weight,
                                            up_weight, scale, activation, dropout_p, int(seed), *flags)  # fmt: skip
        else:
            grads = _adapter_kernels().bottleneck_adapter_backward(
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
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT_DTYPES:
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
    seed_tensor = _seed_tensor(seed if seed is not None or dropout_p > 0.0 else 0)
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).contiguous()
    r2d = None if residual is None else residual.reshape(-1, shape[-1]).contiguous()
    tensors = (ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias)
    ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias = (
        None if t is None else t.contiguous() for t in tensors
    )
    y, _, _, _ = _bottleneck_adapter_op(x2d, r2d, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias,
                                        float(scale), activation, float(ln_eps), dropout_p, seed_tensor)  # fmt: skip
    return y.reshape(shape)


# -- (IA)³ linear --------------------------------------------------------------------------------


def _ia3_kernels():
    from peft_fast.kernels import ia3

    return ia3


def _as_base(weight, absmax, nested_absmax, nested_offset, blocksize: int, out_features: int, in_features: int):
    """The frozen weight from the op's plain-tensor arguments; blocksize 0 means dense."""
    if blocksize == 0:
        return weight
    return NF4Weight(weight, absmax, (out_features, in_features), torch.float32, blocksize, nested_absmax,
                     nested_offset)  # fmt: skip


def _base_tensors(base: torch.Tensor | NF4Weight) -> tuple:
    """(weight, absmax, nested_absmax, nested_offset, blocksize) for the op; blocksize 0: dense."""
    if isinstance(base, NF4Weight):
        return base.packed, base.absmax, base.nested_absmax, base.nested_offset, base.blocksize
    return base, None, None, None, 0


def _dense(base: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(base, dtype) if isinstance(base, NF4Weight) else base.to(dtype)


def _base_matmul(x: torch.Tensor, base: torch.Tensor | NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b computed exactly as nn.Linear (dense) or NF4Linear (NF4) compute it."""
    if not isinstance(base, NF4Weight):
        return F.linear(x, base, bias)
    y = x @ dequantize_nf4(base, x.dtype).t()
    return y if bias is None else y + bias


def _torch_ia3_forward(x, base, ia3_scale, bias, scale_input: bool):
    # ia3_scale arrives in _accumulate_dtype(x.dtype): products are formed in it, then rounded.
    acc = ia3_scale.dtype
    if scale_input:
        return _base_matmul((x.to(acc) * ia3_scale).to(x.dtype), base, bias), x.new_empty(0)
    y0 = _base_matmul(x, base, bias)
    return (y0.to(acc) * ia3_scale).to(x.dtype), y0


def _torch_ia3_backward(grad_y, saved, base, ia3_scale, scale_input: bool, needs_dx: bool, needs_dl: bool):
    acc = ia3_scale.dtype
    weight = _dense(base, grad_y.dtype)
    if scale_input:
        grad_in = grad_y @ weight
        dx = (grad_in.to(acc) * ia3_scale).to(grad_y.dtype) if needs_dx else None
        dl = (saved.to(acc) * grad_in.to(acc)).reshape(-1, weight.shape[1]).sum(0) if needs_dl else None
        return dx, dl
    dx = (grad_y.to(acc) * ia3_scale).to(grad_y.dtype) @ weight if needs_dx else None
    dl = (grad_y.to(acc) * saved.to(acc)).reshape(-1, weight.shape[0]).sum(0) if needs_dl else None
    return dx, dl


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
    base = _as_base(weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features)
    with no_autocast(x.device):
        if backend_name(x.device) == "torch-cpu":
            return _torch_ia3_forward(x, base, ia3_scale, bias, scale_input)
        y, y0 = _ia3_kernels().ia3_linear_forward(_flat(x), base, ia3_scale, bias, scale_input)
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
    base = _as_base(weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features)
    with no_autocast(grad_y.device):
        if backend_name(grad_y.device) == "torch-cpu":
            dx, dl = _torch_ia3_backward(grad_y, saved, base, ia3_scale, scale_input, needs_dx, needs_dl)
        else:
            dx, dl = _ia3_kernels().ia3_linear_backward(_flat(grad_y), _flat(saved), base, ia3_scale, scale_input,
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
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT_DTYPES:
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
    ia3_scale = ia3_scale.reshape(length).to(_accumulate_dtype(x.dtype))
    weight, absmax, nested_absmax, nested_offset, blocksize = _base_tensors(base)
    y, _ = _ia3_linear_op(x, weight, absmax, nested_absmax, nested_offset, blocksize, out_features, in_features,
                          ia3_scale, bias, bool(scale_input))  # fmt: skip
    return y
