"""Autograd-aware ops over the kernels, and the choice of backend.

``lora_linear`` computes ``Y = X·deq(W)ᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ`` as one
``torch.library.custom_op`` (``peft_fast::lora_linear``) with a fake (meta) implementation and a
registered autograd formula, so ``torch.compile`` sees a single op.

Backends, chosen per call from the input's device:

- ``cuda``: the Triton kernels of ``peft_fast/kernels/lora_linear.py``;
- ``triton-interpreter``: the same kernels on CPU tensors when ``PEFT_FAST_BACKEND=triton``
  (or ``TRITON_INTERPRET=1``), which is how the tests run them without a GPU;
- ``torch-cpu``: plain torch with the same math and the same dropout semantics (the mask is
  regenerated from the seed in backward), dequantizing W afresh in each pass.

Saved for backward in every backend: X, H = drop(X)·Aᵀ and the seed, plus references to the
weights themselves; never deq(W), the dropout mask or a dropped copy of X.

Under ``torch.autocast`` the public functions behave as ``nn.Linear`` does: their floating inputs
(x, the dense base, A, B, the bias; never the NF4 scales) are cast to the autocast dtype, so the op
computes and returns that dtype, and each parameter's gradient comes back through the cast in its
own dtype. The op bodies themselves run with autocast off, so their outputs always have the dtypes
their fake implementations promise (a matmul inside them is never silently recast).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os

import torch

from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = [
    "autocast_dtype",
    "autocast_inputs",
    "backend_name",
    "base_linear",
    "check_input",
    "dropout_mask",
    "lora_linear",
    "merge_lora",
    "no_autocast",
]

_SEED_BOUND = 2**31 - 1

# The dtypes autocast recasts (it leaves float64, and every non-float tensor, alone).
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_name(device: torch.device | str | None = None) -> str:
    """The backend used for tensors on ``device``: ``cuda``, ``triton-interpreter`` or ``torch-cpu``.

    Read at every call, so tests can switch with ``PEFT_FAST_BACKEND`` (``triton`` or ``torch``).
    """
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    requested = os.environ.get("PEFT_FAST_BACKEND", "")
    if device.type == "cuda" and requested != "torch":
        return "cuda"
    if device.type == "cpu" and requested == "triton":
        return "triton-interpreter"
    return "torch-cpu"


def _kernels():
    from peft_fast.kernels import lora_linear as kernels

    return kernels


# -- torch.autocast -----------------------------------------------------------------------


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes a linear layer of ``x`` in, or None where it casts nothing.

    None when autocast is off for ``x``'s device type or ``x`` is not fp32 / fp16 / bf16 (autocast
    leaves fp64 alone). Works under ``torch.compile``, which guards on the autocast state.
    """
    device_type = x.device.type
    if x.dtype not in _AUTOCAST_DTYPES or not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(dtype: torch.dtype | None, *tensors):
    """``tensors`` with every fp32 / fp16 / bf16 tensor cast to ``dtype`` (all unchanged when None).

    The cast is differentiable: a parameter's gradient flows back through it in its own dtype.
    """
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_DTYPES else t for t in tensors)


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``: op bodies compute in their inputs' dtypes."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# -- the base weight travels through the custom op as plain tensors -----------------------


def _base_to_args(base: torch.Tensor | NF4Weight) -> tuple:
    """(weight, absmax, nested_absmax, nested_offset, blocksize); blocksize 0 means dense."""
    if isinstance(base, NF4Weight):
        return base.packed, base.absmax, base.nested_absmax, base.nested_offset, base.blocksize
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor or an NF4Weight, got {type(base).__name__}")
    return base, None, None, None, 0


def _args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize: int, out_features: int, in_features: int):
    if blocksize == 0:
        return weight
    # dtype only names the default dequantization dtype; every caller passes one explicitly.
    return NF4Weight(
        weight, absmax, (out_features, in_features), torch.float32, blocksize, nested_absmax, nested_offset
    )


def dropout_mask(seed: int, rows: int, cols: int, p: float, device: torch.device | str) -> torch.Tensor:
    """The keep-mask (bool [rows, cols]) that ``lora_linear`` uses for ``seed`` on ``device``.

    The Triton backends draw Philox numbers (``tl.rand(seed, row·cols + col)``); the torch
    backend draws from a ``torch.Generator`` seeded with ``seed``, ~100x cheaper on a CPU than
    emulating Philox. Either way the mask is a pure function of the seed, so backward regenerates
    exactly the forward's mask and nothing is stored.
    """
    if backend_name(device) != "torch-cpu":
        return _kernels().dropout_mask(seed, rows, cols, p, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(rows, cols, generator=generator, device=device) >= p


# -- torch backend ------------------------------------------------------------------------


def _dense(base: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(base, dtype) if isinstance(base, NF4Weight) else base.to(dtype)


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p == 0.0:
        return x
    keep = dropout_mask(seed, x.shape[0], x.shape[1], p, x.device)
    # A dropped element is exactly 0, even if it held NaN or Inf: the kernels do the same.
    return torch.where(keep, x / (1.0 - p), 0.0)


def _torch_forward(x, base, lora_a, lora_b, bias, scale, dropout_p, seed):
    h = _dropped(x, dropout_p, seed) @ lora_a.t()
    y = torch.nn.functional.linear(x, _dense(base, x.dtype), bias)
    y = y + scale * (h @ lora_b.t())
    return y, h


def _torch_backward(grad_y, x, h, base, lora_a, lora_b, scale, dropout_p, seed, needs_dx, needs_da, needs_db):
    grad_h = scale * (grad_y @ lora_b)
    grad_b = scale * (grad_y.t() @ h) if needs_db else None
    grad_a = grad_h.t() @ _dropped(x, dropout_p, seed) if needs_da else None
    grad_x = None
    if needs_dx:
        grad_x = grad_y @ _dense(base, grad_y.dtype) + _dropped(grad_h @ lora_a, dropout_p, seed)
    return grad_x, grad_a, grad_b


# -- the custom op ------------------------------------------------------------------------


def _forward_impl(x, base, lora_a, lora_b, bias, scale, dropout_p, seed):
    if backend_name(x.device) == "torch-cpu":
        return _torch_forward(x, base, lora_a, lora_b, bias, scale, dropout_p, seed)
    return _kernels().lora_linear_forward(x, base, lora_a, lora_b, bias, scale, dropout_p, seed)


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
    base = _args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, lora_b.shape[0], x.shape[1])
    with no_autocast(x.device):
        return _forward_impl(x, base, lora_a, lora_b, bias, scale, dropout_p, int(seed))


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
    base = _args_to_base(weight, absmax, nested_absmax, nested_offset, blocksize, lora_b.shape[0], x.shape[1])
    args = (grad_y, x, h, base, lora_a, lora_b, scale, dropout_p, int(seed), needs_dx, needs_da, needs_db)
    with no_autocast(x.device):  # backward may run inside an autocast region (a loop calling it there)
        if backend_name(x.device) == "torch-cpu":
            grads = _torch_backward(*args)
        else:
            grads = _kernels().lora_linear_backward(*args)
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


def _seed_tensor(seed: int | None) -> torch.Tensor:
    """The dropout seed as a CPU int64 tensor: drawn in-graph under torch.compile, no recompiles."""
    if seed is None:
        return torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {seed!r}")  # int(1.5) would quietly give seed 1
    if not 0 <= int(seed) <= _SEED_BOUND:
        raise ValueError(f"seed must be in [0, 2**31 - 1], got {seed}")
    return torch.tensor([int(seed)], dtype=torch.int64)


_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_input(x, in_features: int) -> None:
    """The checks every layer's forward makes on its input: a float tensor [..., in_features]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [..., {in_features}], got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must be a tensor of shape [..., in_features], got a 0-d tensor")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be a float tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features but the base weight expects {in_features}")


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
            same mask, see :func:`dropout_mask`.
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
    seed_tensor = _seed_tensor(seed if seed is not None or dropout_p > 0.0 else 0)
    lead = x.shape[:-1]
    # Non-contiguous inputs are handled, not rejected: the kernels want row-major operands.
    # The row count is explicit: reshape(-1, 0) is ambiguous for a layer with no input features.
    x2d = x.reshape(math.prod(lead), x.shape[-1]).contiguous()
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    if isinstance(base, torch.Tensor):
        base = base.contiguous()
    y, _ = _lora_linear_op(x2d, *_base_to_args(base), lora_a, lora_b, bias, scale, dropout_p, seed_tensor)
    return y.reshape(*lead, y.shape[-1])


# -- base only (adapters disabled) and merging ---------------------------------------------


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
        weight = _dequantize(nf4, x.dtype)
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


def _dequantize(nf4: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    if backend_name(nf4.device) == "torch-cpu" or dtype == torch.float64:
        return dequantize_nf4(nf4, dtype)
    from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton

    return dequantize_nf4_triton(nf4, dtype)


def base_linear(x: torch.Tensor, base: torch.Tensor | NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · deq(W)ᵀ + b`` without an adapter; for an NF4 weight never keeps deq(W) for backward.

    Under ``torch.autocast`` an NF4 layer computes in the autocast dtype, as ``nn.Linear`` does.
    """
    out_features, in_features = base.shape
    check_input(x, in_features)
    if not isinstance(base, NF4Weight):
        return torch.nn.functional.linear(x, base, bias)  # autocast casts this one itself
    x, bias = autocast_inputs(autocast_dtype(x), x, bias)
    y = _nf4_matmul_op(x, *_base_to_args(base)[:5], out_features, in_features, False)
    return y if bias is None else y + bias


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
