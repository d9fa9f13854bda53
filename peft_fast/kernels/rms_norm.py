"""Triton kernels: RMSNorm with an optional fused residual add, forward and backward, and their torch reference.

``y = RMSNorm(x)``, or with a residual ``s = residual + x`` and ``y = RMSNorm(s)`` in one pass
(one read of x and residual, one write of y and s), with the roundings of Hugging Face's modules:

* ``casting="llama"`` (``LlamaRMSNorm``; Mistral, Qwen2, Qwen3, Phi-3): ``n = (h·rstd).to(T)``
  with ``h = x.float()``, then ``y = (w + offset)·n`` rounded once to ``promote(w, T)``;
* ``casting="gemma"`` (``GemmaRMSNorm``, Gemma 2 / 3): ``y = (h·rstd·(offset + w.float())).to(T)``,
  all in fp32 (``offset=1.0`` is Gemma's ``1 + w``).

``rstd = 1/sqrt(mean(h²) + eps)`` per row and T is the norm input's dtype (x's, or
``promote(residual, x)``, the dtype of HF's ``residual + hidden_states``). Statistics are fp32,
or fp64 when any operand is fp64 (HF rounds an fp64 input through fp32; here fp64 stays fp64).

* ``_rms_norm_fwd_kernel``  one [BLOCK_M, BLOCK_D] tile of rows per program: y, s and rstd.
* ``_rms_norm_bwd_kernel``  ``dx = rstd·(g - x̂·mean(g·x̂))`` with g the gradient of the
  normalized x̂ (+ the gradient of s with a residual); each of a few programs per SM loops over
  a fixed range of rows and writes its fp32 partial sum of dw, which torch reduces in a fixed
  order, so dw is the same bits on every run (on one GPU model: the ranges follow its SM count).

Saved for backward (by the op): the norm input (x or s), rstd [M] and the weight; never y.
Rows may be strided (unit stride along D, any row stride), and are read in place.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _INTERPRET, _SUPPORTED_DTYPES
from peft_fast.kernels.nf4_dequant import _CAST_BF16_BY_BITS, bf16_bits_rtne

__all__ = [
    "CASTINGS",
    "rms_norm_backward",
    "rms_norm_forward",
    "rms_norm_output_dtype",
    "rms_norm_reference_backward",
    "rms_norm_reference_forward",
]

CASTINGS = ("llama", "gemma")
_KERNEL_DTYPES = (*_SUPPORTED_DTYPES, torch.float64)

# A row up to this many features is one register tile (x, dy and the dw sums stay on chip).
# Compiled for sm_90 the backward is spill-free up to D = 8192, spills a handful of values at
# 16384 (at most one spill op in its row loop) and heavily at 32768 (rows in chunks would fix it).
_MAX_BLOCK_D = 65536
# Rows of a small D are stacked into one tile of about this many elements (e.g. Qwen3's q/k norm
# over head_dim = 128: 32 rows per program), so a program moves enough bytes to hide latency.
_TILE_ELEMENTS = 4096
# fp32 elements per thread a tile is spread over: num_warps grows with the tile (4096 -> 8 warps).
_ELEMENTS_PER_THREAD = 16
# Backward warps per SM (2 programs of 8 warps at D = 4096): enough loads in flight to stream
# HBM, few enough partial dw rows to sum (at M = 2048, D = 4096 they add ~15% to the bytes).
_BWD_WARPS_PER_SM = 16


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """``v.to(dtype)``, rounded to nearest even on every backend.

    On GPUs a plain cast. The interpreter truncates fp32 -> bf16 and converts bf16 <-> fp64 as
    raw integers, so there bf16 goes through fp32 and is rounded by its bits (an fp64 -> bf16
    cast rounds twice there, never on a GPU).
    """
    if _CAST_BF16_BY_BITS:
        if dtype == tl.bfloat16:
            return bf16_bits_rtne(v.to(tl.float32)).to(tl.bfloat16, bitcast=True)
        elif v.dtype == tl.bfloat16:
            return v.to(tl.float32).to(dtype)
        else:
            return v.to(dtype)
    else:
        return v.to(dtype)


@triton.jit
def _round(v, dtype: tl.constexpr, acc: tl.constexpr):
    """``v`` rounded to ``dtype`` and back to the math dtype ``acc``: where HF stores an intermediate."""
    return _cast(_cast(v, dtype), acc)


@triton.jit
def _rsqrt(v, FP64: tl.constexpr):
    """1/sqrt(v): the hardware rsqrt for fp32 (as torch.rsqrt on CUDA), IEEE sqrt and division for fp64."""
    if FP64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.math.rsqrt(v)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, residual_ptr, weight_ptr, y_ptr, s_ptr, rstd_ptr,
    M, D, x_row_stride, residual_row_stride, eps, offset,
    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr, FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """y (and s = residual + x) for rows [pid·BLOCK_M, +BLOCK_M), and each row's rstd.

    x and residual are read with their row strides; y, s and rstd are contiguous [M, D] / [M].
    """
    acc = tl.float64 if FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    row_offs = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row_offs * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row_offs * residual_row_stride + cols[None, :], mask=mask, other=0.0)
        # HF's `residual + hidden_states`: one rounding of the exact sum to the promoted dtype (s's).
        x = _cast(_cast(residual, acc) + _cast(x, acc), s_ptr.dtype.element_ty)
        tl.store(s_ptr + row_offs * D + cols[None, :], x, mask=mask)
    h = _cast(x, acc)
    rstd = _rsqrt(tl.sum(h * h, axis=1) / D + eps, FP64)
    x_hat = h * rstd[:, None]
    w = _cast(tl.load(weight_ptr + cols, mask=col_mask, other=0.0), acc)[None, :] + offset
    if GEMMA:
        y = x_hat * w
    else:
        # LlamaRMSNorm rounds the normalized row to the input dtype before the weight multiplies it.
        y = _round(x_hat, x.dtype, acc) * w
    tl.store(y_ptr + row_offs * D + cols[None, :], _cast(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    grad_y_ptr, grad_s_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, dw_part_ptr,
    M, D, grad_y_row_stride, grad_s_row_stride, x_row_stride, rows_per_program, offset,
    HAS_GRAD_S: tl.constexpr, GEMMA: tl.constexpr, FP64: tl.constexpr, STORE_DX: tl.constexpr,
    NEEDS_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dx for rows [pid·rows_per_program, +rows_per_program) and their partial sum of dw (row pid of dw_part).

    ``x_ptr`` is the norm input (x, or s with a residual); ``grad_s_ptr`` the gradient of the s
    output, added to dx. dx is written contiguous [M, D] in the norm input's dtype.
    """
    acc = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    first_row = pid * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, M)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=acc)
    for row0 in range(first_row, end_row, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end_row
        mask = row_mask[:, None] & col_mask[None, :]
        row_offs = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + row_offs * x_row_stride + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(grad_y_ptr + row_offs * grad_y_row_stride + cols[None, :], mask=mask, other=0.0)
        # Masked rows load rstd 0, so x̂ and every term they add are exactly 0 (never NaN).
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]
        # w is re-read per row block (an L1 hit) rather than held: at D = 16384 holding it spills.
        w = _cast(tl.load(weight_ptr + cols, mask=col_mask, other=0.0), acc)[None, :] + offset
        x_hat = _cast(x, acc) * rstd
        dy_acc = _cast(dy, acc)
        if GEMMA:
            grad_hat = dy_acc * w
            if NEEDS_DW:
                dw_acc += dy_acc * x_hat
        else:
            # Autograd through `w * n`: both products round to y's dtype (dy's), and n's gradient
            # then to n's (the input's) before it flows on in fp32.
            grad_hat = _round(_round(dy_acc * w, dy.dtype, acc), x.dtype, acc)
            if NEEDS_DW:
                dw_acc += _round(dy_acc * _round(x_hat, x.dtype, acc), dy.dtype, acc)
        if STORE_DX:
            mean_dot = tl.sum(grad_hat * x_hat, axis=1)[:, None] / D
            dx = (grad_hat - x_hat * mean_dot) * rstd
            if HAS_GRAD_S:
                grad_s = tl.load(grad_s_ptr + row_offs * grad_s_row_stride + cols[None, :], mask=mask, other=0.0)
                # Autograd adds the two gradients of s in s's dtype: dx is rounded first, as there.
                dx = _round(dx, grad_x_ptr.dtype.element_ty, acc) + _cast(grad_s, acc)
            tl.store(grad_x_ptr + row_offs * D + cols[None, :], _cast(dx, grad_x_ptr.dtype.element_ty), mask=mask)
    if NEEDS_DW:
        tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# -- launchers --------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 when any operand is fp64 (gradcheck, exact comparisons), else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def rms_norm_output_dtype(norm_dtype: torch.dtype, weight_dtype: torch.dtype, casting: str) -> torch.dtype:
    """y's dtype: ``promote(weight, input)`` for llama casting (``weight * n``), the input's for gemma."""
    return torch.promote_types(weight_dtype, norm_dtype) if casting == "llama" else norm_dtype


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [M, D] rows with unit stride along D: a view where one row stride exists, else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _row_stride(rows: torch.Tensor) -> int:
    # A single row's stride is never read: 0 spares the JIT a variant per such stride (1 is a constexpr).
    return rows.stride(0) if rows.shape[0] > 1 else 0


def _tile(m: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for rows of d features: a whole row per tile, small rows stacked."""
    block_d = triton.next_power_of_2(d)
    if block_d > _MAX_BLOCK_D:
        raise ValueError(f"rms_norm kernels take up to {_MAX_BLOCK_D} features per row, got {d}")
    block_m = max(1, min(_TILE_ELEMENTS // block_d, triton.next_power_of_2(m)))
    num_warps = min(max(block_m * block_d // (32 * _ELEMENTS_PER_THREAD), 1), 32)
    return block_m, block_d, num_warps


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; 4 elsewhere, so the interpreter's programs loop over rows too."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _check(x: torch.Tensor, weight: torch.Tensor, casting: str) -> int:
    """D; raises ValueError / TypeError naming the first problem with the operands."""
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., D] with D > 0, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must be [{d}], got shape {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {x.device}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    return d


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    offset: float,
    casting: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd) of RMSNorm over the last dim of ``x`` (of ``s = residual + x`` with a residual).

    Args:
        x: [..., D] (fp64, fp32, fp16, bf16), rows read in place with any row stride.
        weight: [D], any of those dtypes; ``offset`` is added to it in fp32 (1.0: Gemma's ``1 + w``).
        residual: None, or x's shape; s is then ``residual + x`` in their promoted dtype.
        casting: ``"llama"`` or ``"gemma"`` (see the module docstring).

    y has x's shape and :func:`rms_norm_output_dtype`; s is empty without a residual; rstd has
    x's leading shape, fp32 (fp64 when an operand is fp64).
    """
    d = _check(x, weight, casting)
    if residual is not None and (residual.shape != x.shape or residual.dtype not in _KERNEL_DTYPES):
        raise ValueError(f"residual must be a float tensor of x's shape {tuple(x.shape)}")
    norm_dtype = x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)
    math_dtype = _math_dtype(norm_dtype, weight.dtype)
    x_rows = _as_rows(x)
    residual_rows = None if residual is None else _as_rows(residual)
    m = x_rows.shape[0]
    y = _empty((m, d), rms_norm_output_dtype(norm_dtype, weight.dtype, casting), x.device)
    s = _empty((m, d) if residual is not None else (0,), norm_dtype, x.device)
    rstd = _empty((m,), math_dtype, x.device)
    if m > 0:
        block_m, block_d, num_warps = _tile(m, d)
        # Grid: one program per BLOCK_M rows; each row is one tile, so x is read exactly once.
        _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x_rows, x_rows if residual_rows is None else residual_rows, weight.contiguous(), y, s, rstd,
            m, d, _row_stride(x_rows), 0 if residual_rows is None else _row_stride(residual_rows),
            float(eps), float(offset),
            HAS_RESIDUAL=residual is not None, GEMMA=casting == "gemma", FP64=math_dtype == torch.float64,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    lead = x.shape[:-1]
    return y.reshape(x.shape), (s if residual is None else s.reshape(x.shape)), rstd.reshape(lead)


def rms_norm_backward(
    grad_y: torch.Tensor,
    grad_s: torch.Tensor | None,
    norm_input: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    needs_dx: bool,
    needs_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw), None where not needed.

    ``norm_input`` is what was normalized (x, or s with a residual) and ``rstd`` the forward's;
    ``grad_s`` (the s output's gradient, or None) is added to dx, which comes back in the norm
    input's dtype and shape: the gradient of x and of the residual alike. dw is summed in fp32
    (fp64 for fp64 operands) per program over fixed rows, reduced in a fixed order, and returned
    in weight's dtype.
    """
    d = _check(norm_input, weight, casting)
    if grad_y.shape != norm_input.shape or (grad_s is not None and grad_s.shape != norm_input.shape):
        raise ValueError(f"grad_y / grad_s must have the norm input's shape {tuple(norm_input.shape)}")
    math_dtype = _math_dtype(norm_input.dtype, weight.dtype)
    x_rows, dy_rows = _as_rows(norm_input), _as_rows(grad_y)
    gs_rows = None if grad_s is None else _as_rows(grad_s)
    m = x_rows.shape[0]
    if rstd.numel() != m:
        raise ValueError(f"rstd must have one entry per row ({m}), got {rstd.numel()}")
    if not (needs_dx or needs_dw):
        return None, None
    dx = _empty((m, d) if needs_dx else (0,), norm_input.dtype, norm_input.device)
    if m == 0:
        return (dx.reshape(norm_input.shape) if needs_dx else None), (torch.zeros_like(weight) if needs_dw else None)
    block_m, block_d, num_warps = _tile(m, d)
    row_blocks = triton.cdiv(m, block_m)
    # Grid: a few programs per SM, each over one contiguous range of whole row blocks, so each
    # keeps one dw partial sum in registers across its rows (and the partials to reduce are few).
    programs = min(row_blocks, _sm_count(norm_input.device) * max(1, _BWD_WARPS_PER_SM // num_warps))
    rows_per_program = triton.cdiv(row_blocks, programs) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dw_part = _empty((programs, d) if needs_dw else (0,), math_dtype, norm_input.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy_rows, dy_rows if gs_rows is None else gs_rows, x_rows, weight.contiguous(), rstd.reshape(m),
        dx if needs_dx else dy_rows, dw_part if needs_dw else rstd,
        m, d, _row_stride(dy_rows), 0 if gs_rows is None else _row_stride(gs_rows), _row_stride(x_rows),
        rows_per_program, float(offset),
        HAS_GRAD_S=grad_s is not None, GEMMA=casting == "gemma", FP64=math_dtype == torch.float64,
        STORE_DX=needs_dx, NEEDS_DW=needs_dw, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype) if needs_dw else None
    return (dx.reshape(norm_input.shape) if needs_dx else None), dw


# -- the torch reference (the op's torch backend) ------------------------------------------------


def rms_norm_reference_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    offset: float,
    casting: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`rms_norm_forward`: (y, s, rstd), op for op as HF's modules compute it.

    With offset 0 (llama) / 1 (gemma) and fp32 / fp16 / bf16 operands, y is bit-identical to
    ``LlamaRMSNorm`` / ``GemmaRMSNorm`` on the same device (fp64 is computed in fp64 here).
    """
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    norm_input = x if residual is None else residual + x
    acc = _math_dtype(norm_input.dtype, weight.dtype)
    h = norm_input.to(acc)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = h * rstd
    if casting == "gemma":
        y = (x_hat * (offset + weight.to(acc))).to(norm_input.dtype)
    else:
        out_dtype = rms_norm_output_dtype(norm_input.dtype, weight.dtype, casting)
        y = ((weight.to(acc) + offset) * x_hat.to(norm_input.dtype).to(acc)).to(out_dtype)
    s = norm_input if residual is not None else x.new_empty(0)
    return y, s, rstd.squeeze(-1)


def rms_norm_reference_backward(
    grad_y: torch.Tensor,
    grad_s: torch.Tensor | None,
    norm_input: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    needs_dx: bool,
    needs_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The torch reference of :func:`rms_norm_backward`: (dx, dw), the kernel's roundings in torch."""
    acc = _math_dtype(norm_input.dtype, weight.dtype)
    rstd = rstd.to(acc).unsqueeze(-1)
    x_hat = norm_input.to(acc) * rstd
    w = weight.to(acc) + offset
    if casting == "gemma":
        grad_hat = grad_y.to(acc) * w
        dw_rows = grad_y.to(acc) * x_hat
    else:
        grad_hat = (grad_y.to(acc) * w).to(grad_y.dtype).to(norm_input.dtype).to(acc)
        dw_rows = (grad_y.to(acc) * x_hat.to(norm_input.dtype).to(acc)).to(grad_y.dtype).to(acc)
    dx = dw = None
    if needs_dx:
        dx = ((grad_hat - x_hat * (grad_hat * x_hat).mean(-1, keepdim=True)) * rstd).to(norm_input.dtype)
        dx = dx if grad_s is None else dx + grad_s
    if needs_dw:
        dw = dw_rows.reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
    return dx, dw
