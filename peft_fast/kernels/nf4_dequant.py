"""Triton kernel: NF4 (with or without double quantization) -> fp32 / fp16 / bf16.

Same math as :func:`peft_fast.nf4.dequantize_nf4` (the torch reference), bit for bit:
``out = dtype(fp32(code[q]) · absmax)`` with, under double quantization,
``absmax = fp32(code2[q2] · nested_absmax) + offset`` rounded after each step. The kernel is
launched with ``enable_fp_fusion=False`` so the GPU compiler cannot contract that multiply-add
into an FMA (one rounding instead of two), which would break bit-exactness.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.nf4 import NESTED_BLOCKSIZE, NF4Weight, dynamic_map, nf4_code

__all__ = ["dequantize_nf4_triton"]

_OUT_FP32, _OUT_FP16, _OUT_BF16 = 0, 1, 2
_OUT_KIND = {torch.float32: _OUT_FP32, torch.float16: _OUT_FP16, torch.bfloat16: _OUT_BF16}


@triton.jit
def bf16_bits_rtne(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even, NaN kept quiet.

    Done with integer ops because the Triton interpreter's fp32->bf16 cast does not round to
    nearest even; integer ops give the same bits on every backend.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    # The even element of each pair sits in the high nibble.
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = offs // BLOCKSIZE
    if DOUBLE_QUANT:
        q2 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + block // NESTED, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + q2, mask=mask, other=0.0) * scale2
        absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    out = value * absmax
    if OUT_KIND == 2:
        tl.store(out_ptr + offs, bf16_bits_rtne(out), mask=mask)
    elif OUT_KIND == 1:
        tl.store(out_ptr + offs, out.to(tl.float16), mask=mask)
    else:
        tl.store(out_ptr + offs, out, mask=mask)


def dequantize_nf4_triton(nf4: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize ``nf4`` with the Triton kernel; equals :func:`peft_fast.nf4.dequantize_nf4`.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    dtype = nf4.dtype if dtype is None else dtype
    if dtype not in _OUT_KIND:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = nf4.device
    out = torch.empty(nf4.shape, dtype=dtype, device=device)
    numel = nf4.numel
    if numel == 0:
        return out
    # A bf16 result is written as its int16 bit pattern (see bf16_bits_rtne).
    out_view = out.view(torch.int16) if dtype == torch.bfloat16 else out
    dq = nf4.double_quant
    absmax = nf4.absmax.contiguous()
    nested_absmax = nf4.nested_absmax.contiguous() if dq else absmax
    offset = nf4.nested_offset.reshape(1).float() if dq else absmax
    # 1024 elements per program: 512 packed bytes, enough in flight to hide memory latency
    # on a GPU while keeping the interpreter's per-program arrays small.
    block = 1024
    grid = (triton.cdiv(numel, block),)
    _nf4_dequant_kernel[grid](
        nf4.packed.contiguous(), absmax, nested_absmax, offset,
        nf4_code(device), dynamic_map(device), out_view,
        numel,
        BLOCKSIZE=nf4.blocksize, NESTED=NESTED_BLOCKSIZE, DOUBLE_QUANT=dq,
        OUT_KIND=_OUT_KIND[dtype], BLOCK=block,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
