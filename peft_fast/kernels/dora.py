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

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _DOT_PRECISION, _SUPPORTED_DTYPES, _block_r, _dot, fitted_block, interpreted
from peft_fast.kernels.nf4_dequant import _CAST_BF16_BY_BITS
from peft_fast.kernels.nf4_tiles import (
    _base_args,
    _compile_options,
    _load_weight_tile,
    load_nf4_rows,
    rows_scaled,
)
from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = [
    "dora_scale_backward_triton",
    "dora_scale_reference",
    "dora_scale_triton",
    "dora_weight_norm_reference",
    "dora_weight_norm_triton",
]

# One program per BLOCK_N rows: N / 32 programs (128 at N = 4096, about one per H200 SM), each
# streaming its rows once; BLOCK_K = 64 is no wider than any NF4 block of 64 or more, so the
# row-scaled loader (one scale per tile row) applies to every aligned NF4 weight.
_BLOCK_N, _BLOCK_K = 32, 64
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
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=_block_r(rank), num_warps=4, **_compile_options(base),
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
    y_ptr, magnitude_ptr, norm_ptr, bias_ptr, out_ptr, M, N, stride_y, stride_out,
    HAS_BIAS: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out = y · (m / ‖·‖) + b per column, the factor and the sum in fp32, rounded once to out's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    factor = tl.load(magnitude_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32) / tl.load(
        norm_ptr + offs_n, mask=n_mask, other=1.0
    ).to(tl.float32)
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
        y, magnitude.contiguous(), norm.contiguous(), bias if bias is not None else norm, out, m, n, y.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, KIND=_KIND[y.dtype], BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
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
