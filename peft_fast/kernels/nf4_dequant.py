"""Triton kernel: NF4 (with or without double quantization) -> fp32 / fp16 / bf16.

Same math as :func:`peft_fast.nf4.dequantize_nf4` (the torch reference), bit for bit:
``out = dtype(fp32(code[q]) · absmax)`` with, under double quantization,
``absmax = fp32(code2[q2] · nested_absmax) + offset`` rounded after each step. The kernel is
launched with ``enable_fp_fusion=False`` so the GPU compiler cannot contract that multiply-add
into an FMA (one rounding instead of two), which would break bit-exactness.

Layout of the work: each program takes a [ROWS, COLS] tile of packed bytes, COLS dividing the
bytes of one quantization block (blocksize / 2), so every tile row has one scale, rebuilt once
per row instead of once per element. Bytes are loaded as contiguous rows (16-byte vectors),
split into their two nibbles in registers (``tl.join`` + reshape puts the high nibble, the even
element, first) and stored as contiguous output rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import interpreted
from peft_fast.kernels.nf4_tiles import _nf4_block_scale
from peft_fast.nf4 import NESTED_BLOCKSIZE, NF4Weight, dynamic_map, nf4_code

__all__ = ["bf16_bits_rtne", "dequantize_nf4_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's fp32 -> bf16 cast truncates; GPUs round to nearest even (cvt.rn.bf16).
_CAST_BF16_BY_BITS = tl.constexpr(_INTERPRET)
_OUT_FP32, _OUT_FP16, _OUT_BF16 = 0, 1, 2
_OUT_KIND = {torch.float32: _OUT_FP32, torch.float16: _OUT_FP16, torch.bfloat16: _OUT_BF16}
# Packed bytes per program: 4096 bytes = 8192 elements, 16 bytes per thread at 8 warps.
_TILE_BYTES = 4096
_NUM_WARPS = 8


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
    numel, n_bytes,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    OUT_KIND: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    first_byte = tl.program_id(0).to(tl.int64) * (ROWS * COLS)
    row_byte = first_byte + tl.arange(0, ROWS) * COLS  # [ROWS] first byte of each tile row
    byte = row_byte[:, None] + tl.arange(0, COLS)[None, :]
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
    # Element 2b is byte b's high nibble, element 2b + 1 its low nibble.
    nibble = tl.join(packed >> 4, packed & 0xF).reshape(ROWS, 2 * COLS).to(tl.int32)
    value = tl.load(code_ptr + nibble)
    # One scale per tile row (COLS divides BLOCKSIZE // 2).
    block = row_byte // (BLOCKSIZE // 2)
    in_range = row_byte < n_bytes
    absmax = _nf4_block_scale(
        block, in_range, absmax_ptr, nested_absmax_ptr, offset_ptr, code2_ptr, DOUBLE_QUANT, NESTED
    )
    out = value * absmax[:, None]
    elem = 2 * row_byte[:, None] + tl.arange(0, 2 * COLS)[None, :]
    mask = elem < numel
    if OUT_KIND == 2:
        if _CAST_BF16_BY_BITS:
            tl.store(out_ptr + elem, bf16_bits_rtne(out), mask=mask)
        else:
            tl.store(out_ptr + elem, out.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)
    elif OUT_KIND == 1:
        tl.store(out_ptr + elem, out.to(tl.float16), mask=mask)
    else:
        tl.store(out_ptr + elem, out, mask=mask)


def dequantize_nf4_triton(
    nf4: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize ``nf4`` with the Triton kernel; equals :func:`peft_fast.nf4.dequantize_nf4`.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. ``out`` (contiguous,
    of ``nf4.shape`` and ``dtype``) receives the result when given, e.g. a reused scratch buffer.
    """
    dtype = nf4.dtype if dtype is None else dtype
    if dtype not in _OUT_KIND:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = nf4.device
    if out is None:
        out = torch.empty(nf4.shape, dtype=dtype, device=device)
    elif out.shape != nf4.shape or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(nf4.shape)} on {device}")
    numel = nf4.numel
    if numel == 0:
        return out
    # A bf16 result is written as its int16 bit pattern (see bf16_bits_rtne).
    out_view = out.view(torch.int16) if dtype == torch.bfloat16 else out
    dq = nf4.double_quant
    absmax = nf4.absmax.contiguous()
    nested_absmax = nf4.nested_absmax.contiguous() if dq else absmax
    offset = nf4.nested_offset.reshape(1).float() if dq else absmax
    n_bytes = (numel + 1) // 2
    # Tile columns: the bytes of one block, at most 256 (a 16-byte vector per thread per row).
    cols = min(nf4.blocksize // 2, 256)
    rows = max(1, _TILE_BYTES // cols)
    if interpreted((nf4.packed,)):  # the GPU's tile, shrunk only as far as a small weight demands
        rows = min(rows, triton.next_power_of_2(triton.cdiv(n_bytes, cols)))
    # Grid: one program per ROWS x COLS bytes; bandwidth-bound, so big tiles keep many loads in
    # flight per thread and the per-row scale is rebuilt once per COLS bytes.
    grid = (triton.cdiv(n_bytes, rows * cols),)
    _nf4_dequant_kernel[grid](
        nf4.packed.contiguous(), absmax, nested_absmax, offset,
        nf4_code(device), dynamic_map(device), out_view,
        numel, n_bytes,
        BLOCKSIZE=nf4.blocksize, NESTED=NESTED_BLOCKSIZE, DOUBLE_QUANT=dq,
        OUT_KIND=_OUT_KIND[dtype], ROWS=rows, COLS=cols,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return out
