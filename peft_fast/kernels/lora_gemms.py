"""Triton kernels of the LoRA linear over a dense or NF4 base in its general layout: their autotune configs.

The launchers and the math they implement are in :mod:`peft_fast.kernels.lora_linear`; which of
these, the row-streaming NF4 kernels (:mod:`peft_fast.kernels.nf4_gemm`) or the library path runs
at a shape is :mod:`peft_fast.kernels.plans`' decision.

* ``_lora_down_kernel``       H = drop(X)·Aᵀ over one K slice (fp32 partials when K is split).
* ``_lora_down_up_kernel``    H = drop(X)·Aᵀ and C = b + s·H·Bᵀ for whole row blocks: the library
  forward's LoRA term, written where cuBLAS then accumulates X·deq(W)ᵀ (beta = 1).
* ``_lora_linear_fwd_kernel`` tiled Y GEMM with the NF4 dequant in the K loop (any layout) and
  the ``b + s·H·Bᵀ`` epilogue; with a dense (or scratch-dequantized) base, the large-M forward.
* ``_splitk_partial_kernel`` + ``_splitk_epilogue_kernel``  the small-M (M <= 16) split-K GEMV
  and the fixed-order reduction of its partial sums with the same epilogue.
* ``_lora_linear_dx_kernel``  dX = dY·deq(W) + (dH·A) ⊙ mask/(1-p).
* ``_lora_da_kernel``         dA = dHᵀ·drop(X) over one M range.
* ``_add_dropped_lora_term_kernel``  dX += (dH·A) ⊙ mask/(1-p) in place, after a library dY·deq(W).
"""

from __future__ import annotations

import triton
import triton.language as tl

from peft_fast.kernels.common import _add_bias_and_lora_up, _cfg, _dot, _grouped_tile, autotune
from peft_fast.kernels.dropout import dropout_keep_block
from peft_fast.kernels.nf4_tiles import _load_weight_tile

# -- autotuning -------------------------------------------------------------------------------

# The GPU's lists everywhere: under the interpreter common.autotune keeps the first, fitted to the shape.
# Which dimension each block tiles (for that fitting):
_GEMM_DIMS = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K"}
_MK_DIMS = {"BLOCK_M": "M", "BLOCK_K": "K"}
_NK_DIMS = {"BLOCK_N": "N", "BLOCK_K": "K"}

_GEMM_CONFIGS = [
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
]
_LORA_DOWN_CONFIGS = [
    _cfg(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
]
# Row blocks of the down+up kernel: 16 rows keep M = 4096 at 256 programs (two per SM); the N
# loop writes C in 128-column tiles. The 32-row config steps K by 64: by 128 it spilled 24 B of
# stack under Triton 3.6 (the report's choice at M = 4096, K = 14336; 35.3 µs predicted either way).
_LORA_DOWN_UP_CONFIGS = [
    _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
]
_DA_CONFIGS = [
    _cfg(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=4),
]
# BLOCK_K <= 64, the usual NF4 blocksize: each tile row then needs a single scale.
_SPLITK_CONFIGS = [
    _cfg(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
]


# -- kernels ----------------------------------------------------------------------------------


@autotune(_LORA_DOWN_CONFIGS, key=["m_bucket", "R", "K", "k_slice"], dims=_MK_DIMS)
@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, h_ptr, M, K, R, seed, threshold, inv_keep, m_bucket, k_slice,
    HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """H[m, j] = Σ_k drop(X)[m, k]·A[j, k], the dropout mask regenerated per X tile.

    Program (row tile, rank tile, split s) sums K slice s into ``h_ptr`` + s·M·R: H itself with
    one split, else an fp32 partial the launcher reduces (``k_slice`` is a multiple of BLOCK_K).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    h_ptr += split.to(tl.int64) * M * R
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = split * k_slice
    for k0 in range(k_start, tl.minimum(k_start + k_slice, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=x_mask, other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep_block(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED), x, 0.0)
        a_mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
        a_t = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None], mask=a_mask, other=0.0)
        acc = _dot(x, a_t, acc, DOT_PRECISION)
    if HAS_DROPOUT:
        # 1/(1-p) once on the fp32 sum instead of on every (possibly 16-bit) X element.
        acc = acc * inv_keep
    h_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    tl.store(h_ptr + rows * R + offs_r[None, :], acc.to(h_ptr.dtype.element_ty), mask=h_mask)


@autotune(_LORA_DOWN_UP_CONFIGS, key=["m_bucket", "N", "K", "R"], dims=_GEMM_DIMS)
@triton.jit
def _lora_down_up_kernel(
    x_ptr, a_ptr, lora_b_ptr, bias_ptr, h_ptr, c_ptr, M, N, K, R, scale, seed, threshold, inv_keep, m_bucket,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """For BLOCK_M rows: H = drop(X)·Aᵀ (stored, x's dtype), then C = b + s·H·Bᵀ over all N columns.

    One pass over X and one over C: the LoRA term reaches Y without a read-modify-write of Y,
    because cuBLAS adds X·deq(W)ᵀ into C afterwards (``addmm_``, beta = 1). C uses the rounded H,
    as every other forward candidate does (they read H back from memory).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m[:, None].to(tl.int64)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=x_mask, other=0.0)
            if HAS_DROPOUT:
                x = tl.where(dropout_keep_block(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED), x, 0.0)
            a_mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
            a_t = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None], mask=a_mask, other=0.0)
            acc = _dot(x, a_t, acc, DOT_PRECISION)
        if HAS_DROPOUT:
            acc = acc * inv_keep  # 1/(1-p) once on the fp32 sum, as _lora_down_kernel does
        h_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        tl.store(h_ptr + rows * R + offs_r[None, :], acc.to(h_ptr.dtype.element_ty), mask=h_mask)
    # The up-projection reads H back (every thread of the program must see all of it).
    tl.debug_barrier()
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        c = _add_bias_and_lora_up(
            tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), offs_m, offs_n, M, N, R, scale, h_ptr, lora_b_ptr,
            bias_ptr, HAS_BIAS, DOT_PRECISION, BLOCK_R,
        )  # fmt: skip
        c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + rows * N + offs_n[None, :], c.to(c_ptr.dtype.element_ty), mask=c_mask)


@autotune(_GEMM_CONFIGS, key=["m_bucket", "N", "K"], dims=_GEMM_DIMS)
@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    h_ptr, lora_b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale, m_bucket,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCKS_IN_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Y tile = X·deq(W)ᵀ (dequantized in registers, one K tile at a time) + b + s·H·Bᵀ."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        # W tile transposed to [BLOCK_K, BLOCK_N]: element (k, n) is W[n, k].
        w_t = _load_weight_tile(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
            offs_n[None, :], offs_k[:, None], k0, N, K,
            IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCKS_IN_ROWS, BLOCK_K,
        )  # fmt: skip
        # Round the dequantized weight to the activation dtype, as a bf16/fp16 matmul would.
        acc = _dot(x, w_t.to(x.dtype), acc, DOT_PRECISION)
    acc = _add_bias_and_lora_up(
        acc, offs_m, offs_n, M, N, R, scale, h_ptr, lora_b_ptr, bias_ptr, HAS_BIAS, DOT_PRECISION, BLOCK_R
    )
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@autotune(_SPLITK_CONFIGS, key=["m_bucket", "N", "K", "k_slice"], dims=_NK_DIMS)
@triton.jit
def _splitk_partial_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, partial_ptr,
    M, N, K, k_slice, m_bucket,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCKS_IN_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """partial[s, m, n] = Σ_{k in slice s} X[m, k]·deq(W)[n, k] for all M (<= BLOCK_M) rows.

    Program (n tile, slice s) is the only one to read its weight bytes, so W is read once.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_slice
    for k0 in range(k_start, tl.minimum(k_start + k_slice, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w_t = _load_weight_tile(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
            offs_n[None, :], offs_k[:, None], k0, N, K,
            IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCKS_IN_ROWS, BLOCK_K,
        )  # fmt: skip
        acc = _dot(x, w_t.to(x.dtype), acc, DOT_PRECISION)
    out = partial_ptr + split.to(tl.int64) * M * N + rows * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _splitk_epilogue_kernel(
    partial_ptr, h_ptr, lora_b_ptr, bias_ptr, y_ptr, M, N, R, n_splits, scale,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Y = Σ_s partial[s] (always in the same order, so results are reproducible) + b + s·H·Bᵀ."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    partial_ptrs = partial_ptr + rows * N + offs_n[None, :]
    for _ in range(0, n_splits):
        acc += tl.load(partial_ptrs, mask=mask, other=0.0)
        partial_ptrs += M * N  # M <= 16: no int32 overflow
    acc = _add_bias_and_lora_up(
        acc, offs_m, offs_n, M, N, R, scale, h_ptr, lora_b_ptr, bias_ptr, HAS_BIAS, DOT_PRECISION, BLOCK_R
    )
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(_GEMM_CONFIGS, key=["m_bucket", "N", "K"], dims=_GEMM_DIMS)
@triton.jit
def _lora_linear_dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    dh_ptr, a_ptr, dx_ptr,
    M, N, K, R, seed, threshold, inv_keep, m_bucket,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCKS_IN_ROWS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dX tile = dY·deq(W) (dequantized in the N loop) + (dH·A) ⊙ mask/(1-p)."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rows * N + offs_n[None, :], mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _load_weight_tile(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
            offs_n[:, None], offs_k[None, :], pid_k * BLOCK_K, N, K,
            IS_NF4, DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCKS_IN_ROWS, BLOCK_K,
        )  # fmt: skip
        acc = _dot(dy, w.to(dy.dtype), acc, DOT_PRECISION)
    lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        dh = tl.load(dh_ptr + rows * R + offs_r[None, :], mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        a_mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
        a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :], mask=a_mask, other=0.0)
        lora = _dot(dh, a, lora, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep_block(seed, rows, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED)
        lora = tl.where(keep, lora * inv_keep, 0.0)
    acc += lora
    dx_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(dx_ptr + rows * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@autotune(_DA_CONFIGS, key=["m_bucket", "R", "K"], dims=_MK_DIMS)
@triton.jit
def _lora_da_kernel(
    dh_ptr, x_ptr, da_ptr, part_ptr, count_ptr, M, K, R, seed, threshold, inv_keep, m_bucket, m_per_split,
    HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dA[j, k] = Σ_m dH[m, j]·drop(X)[m, k], the dropout mask regenerated per X tile.

    Program (r tile, k tile, split) sums rows [split·m_per_split, (split+1)·m_per_split);
    ``m_per_split`` is a multiple of every BLOCK_M, so splits never share a row tile. One split
    stores dA. SPLIT: each program stores its fp32 partial at ``part_ptr`` + split·R·K and arrives
    on its tile's counter; the last to arrive sums the tile's partials in split order (a fixed
    order: deterministic, no float atomics), stores dA and leaves the counter zero. That spares the
    two launches (a sum and a cast) and their gaps that a host-side reduction costs.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    m_start = split * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dh_mask = (offs_r[:, None] < R) & (offs_m[None, :] < m_end)
        dh_t = tl.load(dh_ptr + offs_m[None, :].to(tl.int64) * R + offs_r[:, None], mask=dh_mask, other=0.0)
        rows = offs_m[:, None].to(tl.int64)
        x_mask = (offs_m[:, None] < m_end) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows * K + offs_k[None, :], mask=x_mask, other=0.0)
        if HAS_DROPOUT:
            col0 = tl.program_id(1) * BLOCK_K
            keep = dropout_keep_block(seed, rows, col0, K, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED)
            x = tl.where(keep, x, 0.0)
        acc = _dot(dh_t, x, acc, DOT_PRECISION)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    da_mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
    offsets = offs_r[:, None].to(tl.int64) * K + offs_k[None, :]
    if SPLIT:
        tl.store(part_ptr + split.to(tl.int64) * R * K + offsets, acc, mask=da_mask)
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        splits = tl.num_programs(2)
        # Every thread's partial stores happen before the (one-thread) release of the arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            # The last: every split's partial is visible (acquire); read them from L2 (.cg).
            total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(part_ptr + s * R * K + offsets, mask=da_mask, other=0.0, cache_modifier=".cg")
            tl.store(da_ptr + offsets, total.to(da_ptr.dtype.element_ty), mask=da_mask)
            tl.atomic_xchg(count_ptr + tile, 0)  # nobody else touches it in this launch
    else:
        tl.store(da_ptr + offsets, acc.to(da_ptr.dtype.element_ty), mask=da_mask)


# Not autotuned: it updates dX in place (a timed trial would add the term twice), and it is
# bandwidth-bound (dX read and written once, a rank-r dot per tile), so one wide tile serves.
DX_TERM_LAUNCH = {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}


@triton.jit
def _add_dropped_lora_term_kernel(
    dx_ptr, dh_ptr, a_ptr, M, K, R, seed, threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """dX tile (+)= (dH·A) ⊙ mask/(1-p), the mask regenerated from the seed (the library dX path).

    ACCUMULATE: add into dX in place (a read-modify-write); else write the term alone, for cuBLAS to
    add dY·deq(W) into afterwards (beta = 1), which spares this pass the read of dX.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        dh = tl.load(dh_ptr + rows * R + offs_r[None, :], mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        a_mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
        a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * K + offs_k[None, :], mask=a_mask, other=0.0)
        lora = _dot(dh, a, lora, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep_block(seed, rows, tl.program_id(1) * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED)
        lora = tl.where(keep, lora * inv_keep, 0.0)
    dx_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx_ptrs = dx_ptr + rows * K + offs_k[None, :]
    if ACCUMULATE:
        lora += tl.load(dx_ptrs, mask=dx_mask, other=0.0).to(tl.float32)
    tl.store(dx_ptrs, lora.to(dx_ptr.dtype.element_ty), mask=dx_mask)
