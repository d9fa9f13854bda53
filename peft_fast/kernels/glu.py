"""Triton kernels: gated linear units ``act(gate)·up`` (SwiGLU, GeGLU), forward and backward, and their torch reference.

The gated MLPs of Hugging Face's Llama / Mistral / Qwen (``act_fn(gate_proj(x)) * up_proj(x)``,
``ACT2FN["silu"]``), Gemma (``gelu_pytorch_tanh``) and Phi-3 (one ``gate_up_proj`` whose output
``[..., 2I]`` is chunked into gate, then up: ``up * act(gate)``), with the activations

* ``"silu"``       ``g·σ(g)``, as ``g / (1 + exp(-g))`` (torch's formula);
* ``"gelu_tanh"``  ``0.5·g·(1 + tanh(u))``, u = √(2/π)·(g + 0.044715·g³), as ``g·σ(2u)`` (the same function);
* ``"gelu"``       ``0.5·g·(1 + erf(g/√2))``.

* ``_glu_fwd_kernel``  one [BLOCK_M, BLOCK_N] tile: ``y = act(gate)·up``.
* ``_glu_bwd_kernel``  the same tile of ``d_gate = dy·up·act'(gate)`` and ``d_up = dy·act(gate)``,
  the activation recomputed from gate (nothing but the inputs is saved for backward).

Rows may have any row stride (gate and up may be the column halves of one [M, 2I] buffer, which is
how the packed form is run: pointers into the halves, row stride 2I); the unit stride along the
features is required (the launchers copy other layouts). Outputs are contiguous; the packed
backward writes d_gate and d_up straight into the halves of one [M, 2I] gradient.

Math in fp32 (fp64 for fp64 inputs), one rounding per output; HF rounds act(gate) and then the
product to the compute dtype, so bf16 results agree within bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _INTERPRET, _SUPPORTED_DTYPES

__all__ = [
    "ACTIVATIONS",
    "glu_backward",
    "glu_forward",
    "glu_reference_backward",
    "glu_reference_forward",
]

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
_ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}
_KERNEL_DTYPES = (*_SUPPORTED_DTYPES, torch.float64)
# Elements per tile: 16 per thread over 4 warps, i.e. two 16-byte vectors of bf16 per tensor per thread.
_TILE_ELEMENTS = 2048
_NUM_WARPS = 4

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # √(2/π)
_GELU_TANH_CUBIC = tl.constexpr(0.044715)
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1/√2
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π)


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr, WITH_GRAD: tl.constexpr):
    """(act(g), act'(g)) in g's (fp32 / fp64) precision; act'(g) is 0 unless WITH_GRAD."""
    grad = 0.0
    if ACTIVATION == 0:  # silu: torch's g / (1 + exp(-g)); act' = σ(g)·(1 + g·(1 - σ(g)))
        denominator = 1.0 + tl.exp(-g)
        act = g / denominator
        if WITH_GRAD:
            sig = 1.0 / denominator
            grad = sig * (1.0 + g * (1.0 - sig))
    elif ACTIVATION == 1:  # gelu_tanh: 0.5·(1 + tanh(u)) = σ(2u)
        u = _SQRT_2_OVER_PI * (g + _GELU_TANH_CUBIC * g * g * g)
        sig = 1.0 / (1.0 + tl.exp(-2.0 * u))
        act = g * sig
        if WITH_GRAD:
            # d/dg g·σ(2u) = σ(2u) + g·2σ(2u)(1 - σ(2u))·u',  u' = √(2/π)·(1 + 3·0.044715·g²)
            du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * g * g)
            grad = sig + 2.0 * g * sig * (1.0 - sig) * du
    else:  # gelu (erf): act' = Φ(g) + g·φ(g)
        cdf = 0.5 * (1.0 + tl.math.erf(g * _SQRT_HALF))
        act = g * cdf
        if WITH_GRAD:
            grad = cdf + g * _INV_SQRT_2PI * tl.exp(-0.5 * g * g)
    return act, grad


@triton.jit
def _glu_fwd_kernel(
    gate_ptr, up_ptr, y_ptr, M, N, gate_row_stride, up_row_stride,
    ACTIVATION: tl.constexpr, FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y[rows, cols] = act(gate)·up for the tile (program_id(0), program_id(1)); y is contiguous [M, N]."""
    acc = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(acc)
    u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(acc)
    act, _ = _activation(g, ACTIVATION, False)
    tl.store(y_ptr + rows * N + cols, (act * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(
    grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, M, N,
    grad_row_stride, gate_row_stride, up_row_stride, d_gate_row_stride, d_up_row_stride,
    ACTIVATION: tl.constexpr, FP64: tl.constexpr, NEEDS_D_GATE: tl.constexpr, NEEDS_D_UP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """d_gate = dy·up·act'(gate) and d_up = dy·act(gate) for one tile, act recomputed from gate."""
    acc = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    dy = tl.load(grad_ptr + rows * grad_row_stride + cols, mask=mask, other=0.0).to(acc)
    g = tl.load(gate_ptr + rows * gate_row_stride + cols, mask=mask, other=0.0).to(acc)
    act, act_grad = _activation(g, ACTIVATION, NEEDS_D_GATE)
    if NEEDS_D_GATE:
        u = tl.load(up_ptr + rows * up_row_stride + cols, mask=mask, other=0.0).to(acc)
        d_gate = dy * u * act_grad
        tl.store(d_gate_ptr + rows * d_gate_row_stride + cols, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
    if NEEDS_D_UP:
        tl.store(d_up_ptr + rows * d_up_row_stride + cols, (dy * act).to(d_up_ptr.dtype.element_ty), mask=mask)


# -- launchers --------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [M, N] rows with unit stride along N: a view where one row stride exists, else a copy."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def _row_stride(rows: torch.Tensor) -> int:
    # A single row's stride is never used; 0 keeps it from becoming a specialised constant.
    return rows.stride(0) if rows.shape[0] > 1 else 0


def _tile(m: int, n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): whole rows of up to _TILE_ELEMENTS features per tile, short rows stacked."""
    block_n = min(triton.next_power_of_2(max(n, 1)), _TILE_ELEMENTS)
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(max(m, 1))))
    return block_m, block_n


def _check(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    if activation not in _ACTIVATION_IDS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name} must be a float64, float32, float16 or bfloat16 tensor")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() < 1:
        raise ValueError(
            f"gate and up must have one shape [..., I] and dtype, got {tuple(gate.shape)} {gate.dtype} and "
            f"{tuple(up.shape)} {up.dtype}"
        )
    if gate.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {gate.device}")
    if gate.device != up.device:
        raise ValueError(f"gate and up must be on one device, got {gate.device} and {up.device}")


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate)·up``, a new contiguous tensor of gate's shape and dtype.

    Args:
        gate, up: [..., I], one dtype (fp64, fp32, fp16, bf16); rows with any row stride and unit
            feature stride are read in place (e.g. the two halves of one projection output).
        activation: ``"silu"``, ``"gelu_tanh"`` or ``"gelu"``.
    """
    _check(gate, up, activation)
    gate_rows, up_rows = _as_rows(gate), _as_rows(up)
    m, n = gate_rows.shape
    y = _empty((m, n), gate.dtype, gate.device)
    if m and n:
        block_m, block_n = _tile(m, n)
        # Grid: row tiles on axis 0 (up to 2^31), feature tiles on axis 1 (I / 2048 of them).
        _glu_fwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            gate_rows, up_rows, y, m, n, _row_stride(gate_rows), _row_stride(up_rows),
            ACTIVATION=_ACTIVATION_IDS[activation], FP64=gate.dtype == torch.float64,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return y.reshape(gate.shape)


def glu_backward(
    grad_y: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    needs_d_gate: bool = True,
    needs_d_up: bool = True,
    packed: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | torch.Tensor:
    """(d_gate, d_up) of ``act(gate)·up`` for the incoming gradient ``grad_y`` (None where not needed).

    With ``packed`` the result is one [..., 2I] gradient of Phi-3's ``gate_up`` (gate and up are then
    its halves), both halves written by the kernel. Gradients are contiguous, in gate's dtype.
    """
    _check(gate, up, activation)
    if grad_y.shape != gate.shape:
        raise ValueError(f"grad_y must have gate's shape {tuple(gate.shape)}, got {tuple(grad_y.shape)}")
    gate_rows, up_rows, grad_rows = _as_rows(gate), _as_rows(up), _as_rows(grad_y)
    m, n = gate_rows.shape
    if packed:
        needs_d_gate = needs_d_up = True
        d_gate_up = _empty((m, 2 * n), gate.dtype, gate.device)
        d_gate, d_up = d_gate_up[:, :n], d_gate_up[:, n:]
    else:
        d_gate = _empty((m, n) if needs_d_gate else (0, n), gate.dtype, gate.device)
        d_up = _empty((m, n) if needs_d_up else (0, n), gate.dtype, gate.device)
    if m and n and (needs_d_gate or needs_d_up):
        block_m, block_n = _tile(m, n)
        _glu_bwd_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            grad_rows, gate_rows, up_rows, d_gate if needs_d_gate else grad_rows, d_up if needs_d_up else grad_rows,
            m, n, _row_stride(grad_rows), _row_stride(gate_rows), _row_stride(up_rows),
            _row_stride(d_gate) if needs_d_gate else 0, _row_stride(d_up) if needs_d_up else 0,
            ACTIVATION=_ACTIVATION_IDS[activation], FP64=gate.dtype == torch.float64,
            NEEDS_D_GATE=needs_d_gate, NEEDS_D_UP=needs_d_up, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS,
        )  # fmt: skip
    if packed:
        return d_gate_up.reshape(*gate.shape[:-1], 2 * n)
    return (d_gate.reshape(gate.shape) if needs_d_gate else None), (d_up.reshape(gate.shape) if needs_d_up else None)


# -- the torch reference (the op's torch backend) ------------------------------------------------


def _torch_activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """HF's activation modules' own calls: ``ACT2FN["silu" | "gelu_pytorch_tanh" | "gelu"]``."""
    if activation == "silu":
        return torch.nn.functional.silu(gate)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh")
    if activation == "gelu":
        return torch.nn.functional.gelu(gate)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def glu_reference_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The torch reference of :func:`glu_forward`: ``act(gate) * up`` as HF computes it (bit for bit), contiguous."""
    return (_torch_activation(gate, activation) * up).contiguous()


def glu_reference_backward(
    grad_y: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    needs_d_gate: bool = True,
    needs_d_up: bool = True,
    packed: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | torch.Tensor:
    """The torch reference of :func:`glu_backward`: autograd's formulas through HF's expression, bit for bit."""
    d_gate = d_up = None
    if needs_d_gate or packed:
        grad_act = grad_y * up
        if activation == "silu":
            d_gate = torch.ops.aten.silu_backward(grad_act, gate)
        else:
            d_gate = torch.ops.aten.gelu_backward(
                grad_act, gate, approximate="tanh" if activation == "gelu_tanh" else "none"
            )
    if needs_d_up or packed:
        d_up = grad_y * _torch_activation(gate, activation)
    if packed:
        return torch.cat([d_gate, d_up], dim=-1)
    return (None if d_gate is None else d_gate.contiguous()), (None if d_up is None else d_up.contiguous())
