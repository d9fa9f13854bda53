"""NF4 weight tiles for the GEMM kernels: the general loader, the row-scaled fast loader, launch arguments.

Element e = n·K + k of a row-major NF4 weight [N, K] has its code in byte e // 2 (high nibble when
e is even) and its scale in block e // BLOCKSIZE. :func:`_load_weight_tile` handles any layout
(blocks spanning rows, odd K) element by element. When K % BLOCKSIZE == 0 and a tile is no wider
than a block, every tile row has one scale and its packed bytes are contiguous:
:func:`load_nf4_rows` then loads a [BLOCK_N, BLOCK_K // 2] byte tile (k contiguous, 16-byte
vectors), looks both codes of a byte up in the 16-entry code table held in shared memory
(``tl.gather``: one bank per entry, so one wavefront per warp-wide lookup) and rebuilds one
scale per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.nf4 import NESTED_BLOCKSIZE, NF4Weight, dynamic_map, nf4_code


@triton.jit
def _nf4_block_scale(
    block, mask, absmax_ptr, nested_absmax_ptr, offset_ptr, code2_ptr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr
):
    """fp32 absmax of quantization block(s) ``block``, rebuilt from double quantization if used."""
    if DOUBLE_QUANT:
        q2 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED, mask=mask, other=0.0)
        # Two roundings, as bitsandbytes: the launch disables FMA contraction (enable_fp_fusion).
        return tl.load(code2_ptr + q2, mask=mask, other=0.0) * nested_scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _load_weight_tile(
    w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    rows, cols, k_start, N, K,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCKS_IN_ROWS: tl.constexpr, TILE_K: tl.constexpr,
):  # fmt: skip
    """W[rows, cols], 0 outside [N, K]; ``rows``/``cols`` are index tiles that broadcast to the
    tile shape and the tile covers columns [k_start, k_start + TILE_K), k_start a multiple of TILE_K.

    NF4 values are fp32(code[q]) · absmax as in :func:`peft_fast.nf4.dequantize_nf4`; the
    caller casts them to the activation dtype. Element e = n·K + k of the row-major weight has
    its code in byte e//2 (high nibble when e is even) and its scale in block e//BLOCKSIZE.
    Blocks run over the flattened weight, so in general a block spans rows and every element
    looks its scale up; when BLOCKS_IN_ROWS (K % BLOCKSIZE == 0) and the tile is no wider than a
    block, each tile row has one scale, loaded once per row.
    """
    mask = (rows < N) & (cols < K)
    elem = rows.to(tl.int64) * K + cols
    if IS_NF4:
        byte = tl.load(w_ptr + elem // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(elem % 2 == 0, byte >> 4, byte & 0xF)
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        if BLOCKS_IN_ROWS and TILE_K <= BLOCKSIZE:
            row_block = (rows.to(tl.int64) * K + k_start) // BLOCKSIZE
            absmax = _nf4_block_scale(
                row_block, rows < N, absmax_ptr, nested_absmax_ptr, offset_ptr, code2_ptr, DOUBLE_QUANT, NESTED
            )
        else:
            absmax = _nf4_block_scale(
                elem // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, offset_ptr, code2_ptr, DOUBLE_QUANT, NESTED
            )
        # Masked lanes would hold code[0]·offset under double quantization: zero them.
        return tl.where(mask, value * absmax, 0.0)
    else:
        return tl.load(w_ptr + elem, mask=mask, other=0.0)


@triton.jit
def load_nf4_rows_codes(
    w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(fp32 codes [BLOCK_N, BLOCK_K], fp32 scale [BLOCK_N]) of W[offs_n, k0:k0+BLOCK_K], unscaled.

    W's tile is ``codes * scale[:, None]`` (:func:`load_nf4_rows`); a GEMV can apply the row scale
    once to its dot product instead of to every element. Same layout needs as load_nf4_rows.
    """
    n_mask = offs_n < N
    byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    rows = offs_n.to(tl.int64)[:, None] * (K // 2)
    packed = tl.load(w_ptr + rows + byte_cols[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
    # Both codes of a byte from the 16-entry code table held on chip: tl.gather keeps it in shared
    # memory (64 bytes, 16 banks, so a warp-wide lookup is one wavefront whatever the codes) and
    # reads it with LDS. A gather through global memory instead is pipelined by Triton into cp.async
    # copies of every looked-up value (4 bytes per weight written to and read from shared memory),
    # and the former 256-entry table of pairs spans 16 cache lines per warp-wide lookup.
    table = tl.load(code_ptr + tl.arange(0, 16))
    rows_n: tl.constexpr = offs_n.shape[0]
    half: tl.constexpr = BLOCK_K // 2
    flat: tl.constexpr = rows_n * half
    # Gathered flat: a [rows, 16] table gathered along its rows cost more in the report (the decode
    # GEMV 16.8 against 14.3 µs, the (IA)³ forward 477 against 314 µs at M = 4096).
    even = tl.gather(table, (packed >> 4).reshape(flat), 0).reshape(rows_n, half)  # high nibble: even element
    odd = tl.gather(table, (packed & 0xF).reshape(flat), 0).reshape(rows_n, half)
    code = tl.join(even, odd).reshape(rows_n, BLOCK_K)
    block = (offs_n.to(tl.int64) * K + k0) // BLOCKSIZE
    absmax = _nf4_block_scale(block, n_mask, absmax_ptr, nested_absmax_ptr, offset_ptr, code2_ptr, DOUBLE_QUANT, NESTED)
    return code, absmax


@triton.jit
def load_nf4_rows(
    w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 W[offs_n, k0:k0+BLOCK_K] as [BLOCK_N, BLOCK_K]; needs K % BLOCKSIZE == 0, BLOCK_K <= BLOCKSIZE.

    Rows n >= N hold junk (finite); callers never store them. k0 is a multiple of BLOCK_K.
    """
    code, absmax = load_nf4_rows_codes(
        w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
        DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K,
    )  # fmt: skip
    return code * absmax[:, None]


def rows_scaled(base: torch.Tensor | NF4Weight, block_k: int) -> bool:
    """Whether :func:`load_nf4_rows` can load ``base`` in tiles ``block_k`` wide."""
    return isinstance(base, NF4Weight) and base.shape[1] % base.blocksize == 0 and block_k <= base.blocksize


def _base_args(base: torch.Tensor | NF4Weight, placeholder: torch.Tensor) -> tuple[list, dict]:
    """Pointer arguments and constexprs that describe the base weight to the GEMM kernels.

    A dense base passes ``placeholder`` for the NF4-only pointers; the kernels never read them.
    """
    if not isinstance(base, NF4Weight):
        meta = {
            "IS_NF4": False,
            "DOUBLE_QUANT": False,
            "BLOCKSIZE": 64,
            "NESTED": NESTED_BLOCKSIZE,
            "BLOCKS_IN_ROWS": False,
        }
        return [base, placeholder, placeholder, placeholder, placeholder, placeholder], meta
    device = base.device
    dq = base.double_quant
    absmax = base.absmax.contiguous()
    nested_absmax = base.nested_absmax.contiguous() if dq else placeholder
    offset = base.nested_offset.reshape(1).to(torch.float32) if dq else placeholder
    pointers = [base.packed.contiguous(), absmax, nested_absmax, offset, nf4_code(device), dynamic_map(device)]
    meta = {
        "IS_NF4": True,
        "DOUBLE_QUANT": dq,
        "BLOCKSIZE": base.blocksize,
        "NESTED": NESTED_BLOCKSIZE,
        "BLOCKS_IN_ROWS": base.shape[1] % base.blocksize == 0,
    }
    return pointers, meta


def rows_base_args(base: NF4Weight, placeholder: torch.Tensor) -> tuple[list, dict]:
    """Pointer arguments and constexprs of an NF4 base for the row-streaming kernels (nf4_gemm.py)."""
    pointers, meta = _base_args(base, placeholder)
    return pointers, {name: meta[name] for name in ("DOUBLE_QUANT", "BLOCKSIZE", "NESTED")}


def _compile_options(base: torch.Tensor | NF4Weight) -> dict:
    # No FMA contraction where double-quantized scales are rebuilt: bitsandbytes rounds the
    # multiply and the add separately, and so does dequantize_nf4.
    return {"enable_fp_fusion": False} if isinstance(base, NF4Weight) else {}
