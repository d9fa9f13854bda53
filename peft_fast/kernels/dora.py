"""Triton: DoRA's weight norm ``‖W + s·B·A‖`` per output row, in one pass over the (NF4 or dense) weight.

DoRA (Liu et al., 2024) rescales each output row of the adapted weight by ``m / ‖W + s·B·A‖₂``
where the norm is taken over the row (the input features). PEFT recomputes it every forward by
building W + s·B·A densely ([N, K] in HBM, twice: B·A and the sum) and reducing it; here one
program owns BLOCK_N rows and streams W tile by tile along K (dense, or NF4 dequantized in
registers by the LoRA kernels' tile loaders), computes the matching [BLOCK_N, BLOCK_K] tile of B·A
with ``tl.dot`` from B's rows and A's columns, and accumulates the squared sum of the rows. W is
read once, B·A never leaves registers, the output is N floats.

Roundings follow PEFT's ``get_weight_norm`` in the compute dtype: deq(W) is rounded to it, B·A
is rounded to it (PEFT's matmul output), s·(B·A) is rounded, and so is the sum; only the squared
sum is fp32 (torch's norm accumulates in fp32 too). In fp32 every rounding is a no-op.

:func:`dora_weight_norm_reference` is the same math in torch (the torch backend runs it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from peft_fast.kernels import plans
from peft_fast.kernels.choice import Candidate, Choice
from peft_fast.kernels.common import _DOT_PRECISION, _SUPPORTED_DTYPES, _block_r, _dot, fitted_block, interpreted
from peft_fast.kernels.lora_reference import lora_linear_reference_forward
from peft_fast.kernels.nf4_dequant import _CAST_BF16_BY_BITS
from peft_fast.kernels.nf4_gemm import base_kind
from peft_fast.kernels.nf4_tiles import (
    _base_args,
    _compile_options,
    _load_weight_tile,
    load_nf4_rows,
    rows_scaled,
)
from peft_fast.kernels.plans import DORA_DEQUANT_NORM, DORA_SEPARATE
from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = [
    "FORWARD_CHOICE",
    "dequant_norm_splits",
    "dora_dequant_norm_reference",
    "dora_dequant_norm_triton",
    "dora_forward_candidates",
    "dora_linear_forward",
    "dora_linear_reference_forward",
    "dora_norm_from_partials",
    "dora_scale_backward_triton",
    "dora_scale_partials_triton",
    "dora_scale_reference",
    "dora_scale_triton",
    "dora_weight_norm_reference",
    "dora_weight_norm_triton",
]

# One program per BLOCK_N rows: N / 32 programs (128 at N = 4096, about one per H200 SM), each
# streaming its rows once; BLOCK_K = 64 is no wider than any NF4 block of 64 or more, so the
# row-scaled loader (one scale per tile row) applies to every aligned NF4 weight.
_BLOCK_N, _BLOCK_K, _NORM_WARPS = 32, 64, 4
# The compute dtype as an int constexpr (the static report stores constexprs as plain values).
_FP32, _FP16, _BF16 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _rounded(v, KIND: tl.constexpr):
    """fp32 ``v`` rounded to the compute dtype (KIND: 0 fp32, 1 fp16, 2 bf16; nearest even) and back to fp32.

    On GPUs two plain casts. The Triton interpreter truncates fp32 -> bf16, so there the bf16
    rounding is done on the bits (the result is then exact in bf16).
    """
    v = v.to(tl.float32)
    if KIND == _BF16:
        if _CAST_BF16_BY_BITS:
            bits = v.to(tl.int32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return rounded.to(tl.float32, bitcast=True)
        else:
            return v.to(tl.bfloat16).to(tl.float32)
    elif KIND == _FP16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _dora_norm_kernel(
    w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    a_ptr, b_ptr, out_ptr, N, K, R, scale,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCKS_IN_ROWS: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out[n] = ‖t(t(W[n, :]) + t(s·t((B·A)[n, :])))‖₂ for the program's BLOCK_N rows, t: rounding to KIND."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if ROWS:  # K % BLOCKSIZE == 0, BLOCK_K <= BLOCKSIZE: one scale per tile row
            w = load_nf4_rows(w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0,
                              N, K, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K)  # fmt: skip
        else:
            w = _load_weight_tile(w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
                                  offs_n[:, None], offs_k[None, :], k0, N, K,
                                  IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCKS_IN_ROWS, BLOCK_K)  # fmt: skip
        w = _rounded(w, KIND)
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
            a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :],
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            ba = _dot(b, a, ba, DOT_PRECISION)
        lora = _rounded(scale * _rounded(ba, KIND), KIND)
        v = _rounded(w + lora, KIND)
        # Rows >= N (junk from the row loader) and columns >= K must not count.
        v = tl.where(n_mask[:, None] & k_mask[None, :], v, 0.0)
        acc += tl.sum(v * v, axis=1)
    tl.store(
        out_ptr + offs_n, _rounded(tl.sqrt(acc), KIND).to(out_ptr.dtype.element_ty), mask=n_mask
    )  # exact: rounded already


def _check(base: torch.Tensor | NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    n, k = base.shape
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_b.dim() != 2 or tuple(lora_b.shape) != (n, lora_a.shape[0]):
        raise ValueError(
            f"DoRA weight norm: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not fit "
            f"a base weight of shape {tuple(base.shape)} (A must be [r, {k}], B [{n}, r])"
        )
    if lora_a.dtype != lora_b.dtype or lora_a.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"DoRA weight norm: lora_A / lora_B must share one of {_SUPPORTED_DTYPES}, "
                        f"got {lora_a.dtype} / {lora_b.dtype}")  # fmt: skip
    if isinstance(base, torch.Tensor) and base.dtype != lora_a.dtype:
        raise TypeError(f"DoRA weight norm: the base weight is {base.dtype} but lora_A is {lora_a.dtype}")


def dora_weight_norm_triton(
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖W + s·B·A‖ over each row of W [N, K], in lora_a's dtype, by :func:`_dora_norm_kernel`.

    ``base`` is dense (in lora_a's dtype) or NF4 (dequantized to lora_a's dtype in the kernel).
    ``out`` (optional, [N] contiguous in lora_a's dtype) receives the result: tests pass a
    poisoned buffer to see that every element is written.
    """
    _check(base, lora_a, lora_b)
    n, k = base.shape
    rank = lora_a.shape[0]
    dtype = lora_a.dtype
    if out is None:
        out = torch.empty(n, dtype=dtype, device=lora_a.device)
    elif out.shape != (n,) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}] {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    if n == 0:
        return out
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    base = base.contiguous() if isinstance(base, torch.Tensor) else base
    pointers, meta = _base_args(base, lora_a)
    block_n, block_k = _BLOCK_N, _BLOCK_K
    if interpreted([lora_a]):  # the interpreter runs the GPU tiles, shrunk only as far as the shape needs
        block_n, block_k = fitted_block(block_n, n), fitted_block(block_k, k)
    rows = rows_scaled(base, block_k)
    grid = (triton.cdiv(n, block_n),)
    _dora_norm_kernel[grid](
        *pointers, lora_a, lora_b, out, n, k, rank, float(scale),
        **meta, ROWS=rows, KIND=_KIND[dtype], DOT_PRECISION=_DOT_PRECISION[dtype],
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(rank), num_warps=_NORM_WARPS, **_compile_options(base),
    )  # fmt: skip
    return out


def dora_weight_norm_reference(
    base: torch.Tensor | NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """The torch reference of :func:`dora_weight_norm_triton`: the same roundings, W + s·B·A built densely.

    float64 inputs are accepted (references and gradcheck), computed in float64 throughout.
    """
    if lora_a.dtype != torch.float64:
        _check(base, lora_a, lora_b)
    dtype = lora_a.dtype
    weight = dequantize_nf4(base, dtype) if isinstance(base, NF4Weight) else base.to(dtype)
    lora = (scale * (lora_b @ lora_a)).to(dtype)  # the matmul rounds to dtype, then the product does
    summed = weight + lora
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(summed.to(acc), dim=1).to(dtype)


@triton.jit
def _dora_scale_kernel(
    y_ptr, magnitude_ptr, norm_ptr, bias_ptr, out_ptr, norm_out_ptr, M, N, stride_y, stride_out, SPLITS,
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out = y · (m / ‖·‖) + b per column, the factor and the sum in fp32, rounded once to out's dtype.

    PARTIALS: ``norm_ptr`` holds SPLITS rows of fp32 partial sums of squares [SPLITS, N] (from
    :func:`_dora_dequant_norm_kernel`); each program finishes its columns' norms (a fixed order,
    so every program gets the same bits) and the first row of programs stores them to ``norm_out_ptr``.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    if PARTIALS:
        squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for split in range(0, SPLITS):
            squares += tl.load(norm_ptr + split * N + offs_n, mask=n_mask, other=0.0)
        norm = _rounded(tl.sqrt(squares), KIND)  # the norm in the compute dtype, as the standalone kernel's
        if pid_m == 0:
            tl.store(norm_out_ptr + offs_n, norm.to(norm_out_ptr.dtype.element_ty), mask=n_mask)
        norm = tl.where(n_mask, norm, 1.0)
    else:
        norm = tl.load(norm_ptr + offs_n, mask=n_mask, other=1.0).to(tl.float32)
    factor = tl.load(magnitude_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) / norm
    rows = offs_m.to(tl.int64)[:, None]
    y = tl.load(y_ptr + rows * stride_y + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = y * factor[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # Rounded to the output dtype first (the interpreter truncates a plain cast to bf16), so the store is exact.
    out = _rounded(out, KIND)
    tl.store(out_ptr + rows * stride_out + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def dora_scale_triton(
    y: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """DoRA's ``y · (m / ‖W + s·B·A‖) + b`` per output column in one pass over y [M, N] (rows contiguous).

    The column factor m / ‖·‖ and the bias add are fp32, the result is rounded once to y's dtype,
    as :func:`dora_scale_reference` (three library passes with fp32 intermediates before).
    """
    m, n = y.shape
    if y.dtype not in _KIND:
        raise TypeError(f"DoRA scale: y must be float32, float16 or bfloat16, got {y.dtype}")
    if magnitude.shape != (n,) or norm.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"DoRA scale: magnitude, norm and bias must be [{n}] for y of shape {tuple(y.shape)}")
    if y.stride(1) != 1:
        y = y.contiguous()
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    if m == 0 or n == 0:
        return out
    block_m, block_n = 32, 128
    if interpreted([y]):
        block_m, block_n = fitted_block(block_m, m), fitted_block(block_n, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dora_scale_kernel[grid](
        y, magnitude.contiguous(), norm.contiguous(), bias if bias is not None else norm, out, norm, m, n,
        y.stride(0), out.stride(0), 1, HAS_BIAS=bias is not None, PARTIALS=False, KIND=_KIND[y.dtype],
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out


def dora_scale_reference(
    y: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The torch reference of :func:`dora_scale_triton` (float64 stays float64)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = y.to(acc) * (magnitude.to(acc) / norm.to(acc))
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(y.dtype)


@triton.jit
def _dora_scale_backward_kernel(
    grad_ptr, y_ptr, magnitude_ptr, norm_ptr, grad_y_ptr, partial_ptr, M, N, stride_g, stride_y, stride_gy,
    KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dY_in = dOut · (m / ‖·‖) per column (rounded once), and this row block's Σ dOut·Y per column (fp32)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    factor = tl.load(magnitude_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) / tl.load(
        norm_ptr + offs_n, mask=n_mask, other=1.0
    ).to(tl.float32)
    rows = offs_m.to(tl.int64)[:, None]
    grad = tl.load(grad_ptr + rows * stride_g + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows * stride_y + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    grad_y = _rounded(grad * factor[None, :], KIND)
    tl.store(grad_y_ptr + rows * stride_gy + offs_n[None, :], grad_y.to(grad_y_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(grad * y, axis=0), mask=n_mask)


def dora_scale_backward_triton(
    grad_out: torch.Tensor, y: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY_in in y's dtype, Σ_rows dOut·Y per column in fp32) for ``out = y · (m / ‖·‖) + b``, one pass over dOut and y.

    Each row block writes its column sums; one library sum adds the blocks (a fixed order, so the
    same inputs give the same bits). dm = that sum / ‖·‖ (the caller divides).
    """
    m, n = y.shape
    if grad_out.shape != y.shape or y.dtype not in _KIND:
        raise ValueError(f"DoRA scale backward: dOut {tuple(grad_out.shape)} must match y {tuple(y.shape)} "
                         f"(float32 / float16 / bfloat16, got {y.dtype})")  # fmt: skip
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    y = y if y.stride(1) == 1 else y.contiguous()
    grad_y = torch.empty((m, n), dtype=y.dtype, device=y.device)
    block_m, block_n = 32, 128
    if interpreted([y]):
        block_m, block_n = fitted_block(block_m, m), fitted_block(block_n, n)
    blocks = triton.cdiv(m, block_m)
    partial = torch.empty((blocks, n), dtype=torch.float32, device=y.device)
    if m == 0 or n == 0:
        return grad_y, torch.zeros(n, dtype=torch.float32, device=y.device)
    _dora_scale_backward_kernel[(blocks, triton.cdiv(n, block_n))](
        grad_out, y, magnitude.contiguous(), norm.contiguous(), grad_y, partial, m, n, grad_out.stride(0),
        y.stride(0), grad_y.stride(0), KIND=_KIND[y.dtype], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return grad_y, partial.sum(0)


# -- the norm inside the dequantization pass --------------------------------------------------------

# Tiles of the dequant + norm pass: [BLOCK_N rows, BLOCK_K columns], BLOCK_K no wider than an NF4
# block of 64 (the row-scaled loader), DEQUANT_NORM_TRIPS tiles along K per program. At N = K = 4096:
# 64 x 16 = 1024 programs of 4 x 64 x 64 weights (the dequant kernel's 8192 weights per program
# x 2), 16 fp32 partial rows (256 KB) for the scale pass to finish.
_DQ_BLOCK_N, _DQ_BLOCK_K, _DQ_TRIPS, _DQ_WARPS = 64, 64, 4, 4


@triton.jit
def _dora_dequant_norm_kernel(
    w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    a_ptr, b_ptr, out_ptr, partial_ptr, N, K, R, scale, K_SLICE,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKS_IN_ROWS: tl.constexpr,
    ROWS: tl.constexpr, KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out[n, k] = t(deq(W)[n, k]) and partial[pid_k, n] = Σ_k t(t(deq W) + t(s·t(B·A)))² over the program's K slice.

    t: rounding to KIND, as :func:`_dora_norm_kernel`; ``out`` is bit for bit the dequantize
    kernel's. Each (row block, K slice) program writes its own partial row, so the sums are a
    fixed order (no atomics) and nothing needs zeroing.

    B's [BLOCK_N, r] tile is loaded again at every K step, not once per program: holding it in
    registers across the loop (tried, for r <= 64) made Triton convert it to the dot-operand
    layout through shared memory at every step; the static report put this kernel at 15.6 µs
    instead of 9.9 (K-loop 918 instructions instead of 60) and :func:`_dora_norm_kernel` at 14.7
    instead of 4.7 (N = K = 4096, bf16, r = 16). The reloads hit L1/L2; the pass is HBM-bound.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_k * K_SLICE
    k_end = tl.minimum(k_start + K_SLICE, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        if ROWS:  # K % BLOCKSIZE == 0, BLOCK_K <= BLOCKSIZE: one scale per tile row
            w = load_nf4_rows(w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0,
                              N, K, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K)  # fmt: skip
        else:
            w = _load_weight_tile(w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
                                  offs_n[:, None], offs_k[None, :], k0, N, K,
                                  True, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCKS_IN_ROWS, BLOCK_K)  # fmt: skip
        w = _rounded(w, KIND)
        mask = n_mask[:, None] & k_mask[None, :]
        tile = offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(out_ptr + tile, w.to(out_ptr.dtype.element_ty), mask=mask)  # exact: rounded already
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
            a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :],
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            ba = _dot(b, a, ba, DOT_PRECISION)
        v = _rounded(w + _rounded(scale * _rounded(ba, KIND), KIND), KIND)
        v = tl.where(mask, v, 0.0)  # rows >= N (the row loader's junk) and columns >= K do not count
        acc += tl.sum(v * v, axis=1)
    tl.store(partial_ptr + pid_k.to(tl.int64) * N + offs_n, acc, mask=n_mask)


def _dequant_norm_policy(n: int, k: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, K elements per program) of the dequant + norm pass; the GPU's tiles everywhere,
    shrunk under the interpreter only as far as a small weight needs."""
    block_n, block_k = _DQ_BLOCK_N, _DQ_BLOCK_K
    if interpret:
        block_n, block_k = fitted_block(block_n, n), fitted_block(block_k, k)
    return block_n, block_k, block_k * _DQ_TRIPS


def dequant_norm_splits(n: int, k: int, device: torch.device | str) -> int:
    """How many K slices (rows of partial sums) the dequant + norm pass uses for an [n, k] weight on ``device``."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1" or torch.device(device).type != "cuda"
    return max(1, triton.cdiv(k, _dequant_norm_policy(n, k, interpret)[2]))


def dora_dequant_norm_triton(
    base: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    partials: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """deq(W) [N, K] in lora_a's dtype and the fp32 partial sums [S, N] of ‖deq(W) + s·B·A‖², one pass over the codes.

    ``deq(W)`` equals :func:`peft_fast.kernels.nf4_dequant.dequantize_nf4_triton`'s bit for bit;
    the norm is :func:`dora_norm_from_partials` of the partials (or the column-scale pass's finish,
    :func:`dora_scale_partials_triton`), with the roundings of :func:`dora_weight_norm_reference`.
    ``out`` (optional, contiguous [N, K] in lora_a's dtype) receives deq(W) and ``partials``
    (optional, contiguous fp32 [S, N], S = :func:`dequant_norm_splits`) the sums: tests poison both.
    """
    if not isinstance(base, NF4Weight):
        raise TypeError(f"the dequant + norm pass needs an NF4Weight base, got {type(base).__name__}")
    _check(base, lora_a, lora_b)
    n, k = base.shape
    dtype = lora_a.dtype
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=lora_a.device)
    elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    block_n, block_k, k_slice = _dequant_norm_policy(n, k, interpreted([lora_a]))
    splits = max(1, triton.cdiv(k, k_slice))
    if partials is None:
        partials = torch.empty((splits, n), dtype=torch.float32, device=lora_a.device)
    elif partials.shape != (splits, n) or partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError(f"partials must be a contiguous [{splits}, {n}] float32 tensor, got "
                         f"{tuple(partials.shape)} {partials.dtype}")  # fmt: skip
    if n == 0:
        return out, partials
    if k == 0:
        return out, partials.zero_()
    pointers, meta = _base_args(base, lora_a)
    meta.pop("IS_NF4")
    _dora_dequant_norm_kernel[(triton.cdiv(n, block_n), splits)](
        *pointers, lora_a, lora_b, out, partials, n, k, lora_a.shape[0], float(scale), k_slice,
        **meta, ROWS=rows_scaled(base, block_k), KIND=_KIND[dtype], DOT_PRECISION=_DOT_PRECISION[dtype],
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(lora_a.shape[0]), num_warps=_DQ_WARPS,
        **_compile_options(base),
    )  # fmt: skip
    return out, partials


def dora_norm_from_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The norm [N] in ``dtype`` from :func:`dora_dequant_norm_triton`'s partials, in torch (fixed split order)."""
    squares = torch.zeros(partials.shape[1], dtype=torch.float32, device=partials.device)
    for row in partials:
        squares += row
    return squares.sqrt().to(dtype)


def dora_dequant_norm_reference(
    base: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of the dequant + norm pass: (deq(W) in lora_a's dtype, the finished norm [N])."""
    return dequantize_nf4(base, lora_a.dtype), dora_weight_norm_reference(base, lora_a, lora_b, scale)


def dora_scale_partials_triton(
    y: torch.Tensor, magnitude: torch.Tensor, partials: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y · (m / ‖·‖) + b, ‖·‖ in y's dtype), the norm finished from the dequant + norm pass's partials.

    One pass over y as :func:`dora_scale_triton`; every program sums its columns' partials in the
    same order (the norm has the same bits in all of them), the first row of programs stores it.
    """
    m, n = y.shape
    if y.dtype not in _KIND:
        raise TypeError(f"DoRA scale: y must be float32, float16 or bfloat16, got {y.dtype}")
    if magnitude.shape != (n,) or partials.dim() != 2 or partials.shape[1] != n or partials.dtype != torch.float32:
        raise ValueError(f"DoRA scale: magnitude [{n}] and fp32 partials [S, {n}] needed for y {tuple(y.shape)}, "
                         f"got {tuple(magnitude.shape)} and {tuple(partials.shape)} {partials.dtype}")  # fmt: skip
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"DoRA scale: bias must be [{n}], got {tuple(bias.shape)}")
    if y.stride(1) != 1:
        y = y.contiguous()
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    norm = torch.empty(n, dtype=y.dtype, device=y.device)
    if n == 0:
        return out, norm
    if m == 0:
        return out, dora_norm_from_partials(partials, y.dtype)
    block_m, block_n = 32, 128
    if interpreted([y]):
        block_m, block_n = fitted_block(block_m, m), fitted_block(block_n, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    partials = partials.contiguous()
    _dora_scale_kernel[grid](
        y, magnitude.contiguous(), partials, bias if bias is not None else norm, out, norm, m, n,
        y.stride(0), out.stride(0), partials.shape[0], HAS_BIAS=bias is not None, PARTIALS=True,
        KIND=_KIND[y.dtype], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out, norm


# -- DoRA's forward without dropout: the candidates and their choice --------------------------------


def _forward_separate(x, base, lora_a, lora_b, magnitude, bias, scale):
    """The standalone norm kernel, the LoRA forward (its own choice), then m/‖·‖ + b (candidate ``separate``)."""
    from peft_fast.kernels.lora_linear import lora_linear_forward

    norm = dora_weight_norm_triton(base, lora_a, lora_b, scale)
    y0, h = lora_linear_forward(x, base, lora_a, lora_b, None, scale, 0.0, 0)
    return dora_scale_triton(y0, magnitude, norm, bias), norm, y0, h


def _forward_dequant_norm(x, base, lora_a, lora_b, magnitude, bias, scale):
    """deq(W) and the norm's partials in one pass, cuBLAS + the LoRA term over deq(W), then m/‖·‖ + b
    with the norm finished in that pass (candidate ``dequant_norm``). deq(W) lives for this call only."""
    from peft_fast.kernels.lora_linear import lora_forward_dequantized

    weight, partials = dora_dequant_norm_triton(base, lora_a, lora_b, scale)
    y0, h = lora_forward_dequantized(x, weight, lora_a, lora_b, scale)
    del weight
    out, norm = dora_scale_partials_triton(y0, magnitude, partials, bias)
    return out, norm, y0, h


_FORWARD_IMPLEMENTATIONS = {DORA_SEPARATE: _forward_separate, DORA_DEQUANT_NORM: _forward_dequant_norm}


def dora_forward_candidates(x, base, lora_a, lora_b, magnitude, bias, scale) -> list[Candidate]:
    """DoRA's forward candidates for these operands, in :func:`peft_fast.kernels.plans.dora_forward_plan`'s order."""
    names = plans.dora_forward_plan(x.shape[0], base_kind(base))
    return [Candidate(name, _FORWARD_IMPLEMENTATIONS[name]) for name in names]


def _forward_bucket(x, base, lora_a, lora_b, magnitude, bias, scale) -> tuple:
    m, k = x.shape
    n, rank = lora_b.shape
    return plans.choice_bucket(m, n, k, x.dtype, rank, base_kind(base), bias is not None)


FORWARD_CHOICE = Choice("dora_forward", _forward_bucket, dora_forward_candidates)


def dora_linear_forward(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoRA without dropout: (out = (m/‖·‖)·Y0 + b, ‖W + s·B·A‖ [N], Y0 = X·deq(W)ᵀ + s·H·Bᵀ, H = X·Aᵀ).

    x [M, K], the base, A, B and the bias in one dtype (the norm and Y0 too); m [N] any float
    dtype. Y0 and H are what the backward needs (dm = Σ_rows dOut·Y0 / ‖·‖; never deq(W)). The
    implementation is :data:`FORWARD_CHOICE`'s for the shape.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(base, lora_a, lora_b)
    n = base.shape[0]
    if magnitude.shape != (n,):
        raise ValueError(f"the DoRA magnitude must be [{n}], got {tuple(magnitude.shape)}")
    scale = float(scale)
    if x.shape[0] == 0 or n == 0:  # nothing to choose between: the general path handles the empty shapes
        return _forward_separate(x, base, lora_a, lora_b, magnitude, bias, scale)
    return FORWARD_CHOICE(x, base, lora_a, lora_b, magnitude, bias, scale)


def dora_linear_reference_forward(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`dora_linear_forward` (float64 stays float64): the same four outputs."""
    norm = dora_weight_norm_reference(base, lora_a, lora_b, scale)
    y0, h = lora_linear_reference_forward(x, base, lora_a, lora_b, None, scale, None, 0.0)
    return dora_scale_reference(y0, magnitude, norm, bias), norm, y0, h
