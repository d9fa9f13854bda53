"""``glu`` and ``glu_packed``: the gated MLP's ``act(gate)·up`` (SwiGLU / GeGLU) as custom ops, recomputed in backward.

* ``peft_fast::glu(gate, up, activation)``: Llama / Mistral / Qwen (``"silu"``), Gemma
  (``"gelu_tanh"``, HF's ``gelu_pytorch_tanh``), exact-erf ``"gelu"``.
* ``peft_fast::glu_packed(gate_up, activation)``: Phi-3's fused ``gate_up_proj`` output
  [..., 2I], gate its first half and up its second (``gate, up = gate_up.chunk(2, -1)``); its
  backward is one [..., 2I] gradient written by the kernel.

Saved for backward: the inputs only (gate and up, or gate_up); the activation is recomputed in
the backward kernel, so neither act(gate) nor the product is kept. Outputs are contiguous; the
inputs are read in place when their rows have unit feature stride. The kernels and the torch
reference are in :mod:`peft_fast.kernels.glu`.
"""

from __future__ import annotations

import torch

from peft_fast.ops._common import FLOAT_DTYPES, no_autocast, uses_kernels

__all__ = ["ACTIVATIONS", "glu", "glu_packed"]

# The kernels' activations (peft_fast.kernels.glu.ACTIVATIONS; the kernels module is imported on first use).
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def _glu_kernels():
    from peft_fast.kernels import glu

    return glu


@torch.library.custom_op("peft_fast::glu", mutates_args=())
def _glu_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate)·up, contiguous."""
    kernels = _glu_kernels()
    with no_autocast(gate.device):
        if uses_kernels(gate):
            return kernels.glu_forward(gate, up, activation)
        return kernels.glu_reference_forward(gate, up, activation)


@_glu_op.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("peft_fast::glu_backward", mutates_args=())
def _glu_backward_op(grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
                     needs_d_gate: bool, needs_d_up: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(d_gate, d_up); one that is not needed comes back as an empty tensor."""
    kernels = _glu_kernels()
    backward = kernels.glu_backward if uses_kernels(gate) else kernels.glu_reference_backward
    with no_autocast(gate.device):
        d_gate, d_up = backward(grad_y, gate, up, activation, needs_d_gate, needs_d_up)
    return (gate.new_empty(0) if d_gate is None else d_gate), (up.new_empty(0) if d_up is None else d_up)


@_glu_backward_op.register_fake
def _(grad_y, gate, up, activation, needs_d_gate, needs_d_up):
    return gate.new_empty(gate.shape if needs_d_gate else (0,)), up.new_empty(up.shape if needs_d_up else (0,))


def _glu_setup_context(ctx, inputs, output) -> None:
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _glu_backward(ctx, grad_y):
    gate, up = ctx.saved_tensors
    needs_d_gate, needs_d_up = ctx.needs_input_grad[:2]
    if not (needs_d_gate or needs_d_up):
        return None, None, None
    d_gate, d_up = _glu_backward_op(grad_y, gate, up, ctx.activation, needs_d_gate, needs_d_up)
    return (d_gate if needs_d_gate else None), (d_up if needs_d_up else None), None


_glu_op.register_autograd(_glu_backward, setup_context=_glu_setup_context)


def _halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up): the first and second halves of the last dim, as Phi3MLP's ``chunk(2, dim=-1)``."""
    half = gate_up.shape[-1] // 2
    return gate_up[..., :half], gate_up[..., half:]


@torch.library.custom_op("peft_fast::glu_packed", mutates_args=())
def _glu_packed_op(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate)·up of gate_up = [gate | up], contiguous [..., I]."""
    kernels = _glu_kernels()
    gate, up = _halves(gate_up)
    with no_autocast(gate_up.device):
        if uses_kernels(gate_up):
            return kernels.glu_forward(gate, up, activation)
        return kernels.glu_reference_forward(gate, up, activation)


@_glu_packed_op.register_fake
def _(gate_up, activation):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("peft_fast::glu_packed_backward", mutates_args=())
def _glu_packed_backward_op(grad_y: torch.Tensor, gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """The gradient of gate_up, [..., 2I]: d_gate then d_up, both halves written by one kernel."""
    kernels = _glu_kernels()
    gate, up = _halves(gate_up)
    backward = kernels.glu_backward if uses_kernels(gate_up) else kernels.glu_reference_backward
    with no_autocast(gate_up.device):
        return backward(grad_y, gate, up, activation, packed=True)


@_glu_packed_backward_op.register_fake
def _(grad_y, gate_up, activation):
    return gate_up.new_empty(gate_up.shape)


def _glu_packed_setup_context(ctx, inputs, output) -> None:
    gate_up, activation = inputs
    ctx.save_for_backward(gate_up)
    ctx.activation = activation


def _glu_packed_backward(ctx, grad_y):
    (gate_up,) = ctx.saved_tensors
    return _glu_packed_backward_op(grad_y, gate_up, ctx.activation), None


_glu_packed_op.register_autograd(_glu_packed_backward, setup_context=_glu_packed_setup_context)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() < 1:
        raise TypeError(f"{name} must be a float tensor of shape [..., features], got {getattr(t, 'dtype', t)!r}")


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up``: the gated MLP's product, as HF's ``act_fn(gate_proj(x)) * up_proj(x)``.

    Args:
        gate, up: [..., I] of one shape (fp32, fp16, bf16, fp64), on one device. Rows are read in
            place when their feature stride is 1 (gate and up may be column halves of one buffer).
        activation: ``"silu"`` (``ACT2FN["silu"]``), ``"gelu_tanh"`` (``ACT2FN["gelu_pytorch_tanh"]``)
            or ``"gelu"`` (``ACT2FN["gelu"]``, exact erf).

    Returns a new contiguous [..., I] tensor. Computed in fp32 (fp64 for fp64) with one rounding;
    HF rounds act(gate) and the product to the compute dtype, so bf16 agrees within bf16 rounding
    (on the torch backend: HF's expression itself). gate and up of different dtypes are computed
    in their promoted dtype, the dtype of HF's product. Only gate and up are saved for backward.
    """
    _check_activation(activation)
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on one device, got {gate.device} and {up.device}")
    if gate.dtype != up.dtype:
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    return _glu_op(gate, up, activation)


def glu_packed(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` of Phi-3's packed ``gate_up_proj`` output: gate = gate_up[..., :I], up = gate_up[..., I:].

    Args:
        gate_up: [..., 2I] (fp32, fp16, bf16, fp64); rows read in place when the feature stride is 1.
        activation: as for :func:`glu`.

    Returns a new contiguous [..., I] tensor; gate_up's gradient is one [..., 2I] tensor.
    """
    _check_activation(activation)
    _check_float("gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate then up), got {gate_up.shape[-1]}")
    return _glu_packed_op(gate_up, activation)
