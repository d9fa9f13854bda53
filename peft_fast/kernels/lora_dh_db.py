"""Triton: the LoRA backward's two thin gradients from ONE read of dY (candidate ``fused_gemm`` of op ``lora_dh_db``).

``dH = s·dY·B`` [M, r] and ``dB = s·dYᵀ·H`` [N, r] both stream all of dY [M, N]; as two library
GEMMs (candidate ``library``) dY comes from HBM twice, 2 x 32 MB at M = N = 4096 in bf16 (7.9 µs
each in the static Hopper report, plus a launch gap). Here each program loads one [BLOCK_M, N
slice] block of dY once, tile by tile, and feeds each tile to both dots: ``dY·B`` accumulates its
rows' dH over the slice, ``tile(dY)ᵀ·H`` is its rows' share of dB for those columns. Both are fp32
partials (dH's per N slice, dB's per row block) that one reduction launch sums in a fixed order
(deterministic), scales by s and rounds once to the activation dtype: the rounding of the library
path's ``addmm(alpha = s)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.kernels import plans
from peft_fast.kernels.choice import Candidate, Choice
from peft_fast.kernels.common import _DOT_PRECISION, _block_r, _dot, fitted_block, interpreted

__all__ = [
    "DH_DB_CHOICE",
    "dh_db_candidates",
    "lora_dh_db_library",
    "lora_dh_db_reference",
    "lora_dh_db_triton",
    "scaled_mm",
]

# Rows per program, columns per dY tile, warps; the N slice per program follows the GPU's size.
DH_DB_LAUNCH = {"BLOCK_M": 256, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
_REDUCE_BLOCK = 128
# Programs wanted: about one per SM of an H100 / H200 (each streams a long run of dY); a few on CPU.
_GPU_PROGRAMS, _CPU_PROGRAMS = 132, 4


@triton.jit
def _lora_dh_db_kernel(
    dy_ptr, b_ptr, h_ptr, dh_part_ptr, db_part_ptr, M, N, R, n_slice,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (row block i, N slice j): dh_part[j, rows] = dY[rows, slice]·B[slice] and, per tile,
    db_part[i, cols] = dY[rows, cols]ᵀ·H[rows] (fp32, unscaled; the reduction scales)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    rows = offs_m.to(tl.int64)[:, None]
    h = tl.load(h_ptr + rows * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    dh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = pid_n * n_slice
    for n0 in range(n_start, tl.minimum(n_start + n_slice, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy = tl.load(dy_ptr + rows * N + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
        dh = _dot(dy, b, dh, DOT_PRECISION)
        db = _dot(tl.trans(dy), h, tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32), DOT_PRECISION)
        db_rows = pid_m.to(tl.int64) * N + offs_n.to(tl.int64)
        tl.store(db_part_ptr + db_rows[:, None] * R + offs_r[None, :], db, mask=n_mask[:, None] & r_mask[None, :])
    dh_rows = pid_n.to(tl.int64) * M + offs_m.to(tl.int64)
    tl.store(dh_part_ptr + dh_rows[:, None] * R + offs_r[None, :], dh, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_dh_db_reduce_kernel(
    dh_part_ptr, db_part_ptr, dh_ptr, db_ptr, M, N, R, dh_splits, db_splits, scale, dh_tiles,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """dH = s·Σ_j dh_part[j] (programs < dh_tiles) and dB = s·Σ_i db_part[i] (the rest), in split order."""
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    part_ptr = dh_part_ptr
    out_ptr = dh_ptr
    rows_total = M
    splits = dh_splits
    first = pid * BLOCK
    if pid >= dh_tiles:
        part_ptr = db_part_ptr
        out_ptr = db_ptr
        rows_total = N
        splits = db_splits
        first = (pid - dh_tiles) * BLOCK
    offs = first + tl.arange(0, BLOCK)
    mask = (offs < rows_total)[:, None] & (offs_r < R)[None, :]
    tile = offs.to(tl.int64)[:, None] * R + offs_r[None, :]
    total = tl.zeros((BLOCK, BLOCK_R), dtype=tl.float32)
    part_ptrs = part_ptr + tile
    for _ in range(0, splits):
        total += tl.load(part_ptrs, mask=mask, other=0.0)
        part_ptrs += rows_total * R  # the next split's partial (one split: < 2^31 elements)
    tl.store(out_ptr + tile, (total * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _n_slice(m: int, n: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Columns per program: enough N slices that (row blocks x slices) about fills the GPU once."""
    wanted = _GPU_PROGRAMS if device.type == "cuda" else _CPU_PROGRAMS
    slices = max(1, min(triton.cdiv(n, block_n), triton.cdiv(wanted, triton.cdiv(m, block_m))))
    return triton.cdiv(triton.cdiv(n, slices), block_n) * block_n


def lora_dh_db_triton(grad_y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: float):
    """(dH = s·dY·B [M, r], dB = s·dYᵀ·H [N, r]) in dY's dtype, dY read once.

    Operands contiguous, M, N >= 1, r <= :data:`~peft_fast.kernels.plans.DH_DB_MAX_RANK` (one rank tile).
    """
    m, n = grad_y.shape
    rank = lora_b.shape[1]
    if rank > plans.DH_DB_MAX_RANK:
        raise ValueError(f"the fused dH / dB pass takes ranks up to {plans.DH_DB_MAX_RANK}, got {rank}")
    launch = dict(DH_DB_LAUNCH)
    if interpreted((grad_y,)):
        launch.update(BLOCK_M=fitted_block(launch["BLOCK_M"], m), BLOCK_N=fitted_block(launch["BLOCK_N"], n))
    block_m, block_n, block_r = launch["BLOCK_M"], launch["BLOCK_N"], _block_r(rank)
    n_slice = _n_slice(m, n, block_m, block_n, grad_y.device)
    row_blocks, slices = triton.cdiv(m, block_m), triton.cdiv(n, n_slice)
    device = grad_y.device
    dh_part = _empty((slices, m, rank), torch.float32, device)
    db_part = _empty((row_blocks, n, rank), torch.float32, device)
    # Grid: (row blocks, N slices); every partial row is written by exactly one program.
    _lora_dh_db_kernel[(row_blocks, slices)](
        grad_y, lora_b, h, dh_part, db_part, m, n, rank, n_slice,
        DOT_PRECISION=_DOT_PRECISION[grad_y.dtype], BLOCK_R=block_r, **launch,
    )  # fmt: skip
    dh = _empty((m, rank), grad_y.dtype, device)
    db = _empty((n, rank), grad_y.dtype, device)
    block = fitted_block(_REDUCE_BLOCK, max(m, n)) if interpreted((grad_y,)) else _REDUCE_BLOCK
    dh_tiles = triton.cdiv(m, block)
    # Grid: dH's row tiles, then dB's.
    _lora_dh_db_reduce_kernel[(dh_tiles + triton.cdiv(n, block),)](
        dh_part, db_part, dh, db, m, n, rank, slices, row_blocks, float(scale), dh_tiles,
        BLOCK=block, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return dh, db


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·(a·b) in a's dtype: one library GEMM, fp32 accumulation, alpha applied before the one rounding.

    No fp32 copies of the operands: dY is M x N, so casting it would move more bytes than the
    thin GEMMs themselves.
    """
    if scale == 0.0:
        # addmm with alpha = 0 skips the product, so a NaN / Inf operand would give exact zeros;
        # the reference (and float64) give 0·NaN = NaN. Rare (a zero LoRA scale): keep the NaN.
        return torch.mm(a, b).mul_(0.0)
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0, alpha=scale)


def lora_dh_db_library(grad_y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: float):
    """(dH, dB) as two library GEMMs (candidate ``library``): dY is read twice."""
    return scaled_mm(grad_y, lora_b, scale), scaled_mm(grad_y.t(), h, scale)


def lora_dh_db_reference(grad_y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scale: float):
    """The math in fp32 (fp64 for fp64 inputs), rounded once: what both candidates compute."""
    acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    dy = grad_y.to(acc)
    return (scale * (dy @ lora_b.to(acc))).to(grad_y.dtype), (scale * (dy.t() @ h.to(acc))).to(grad_y.dtype)


_IMPLEMENTATIONS = {plans.FUSED: lora_dh_db_triton, plans.LIBRARY: lora_dh_db_library}


def dh_db_candidates(grad_y, h, lora_b, scale) -> list[Candidate]:
    """The candidates for these operands, in the plan's order."""
    names = plans.lora_dh_db_plan(grad_y.shape[0], grad_y.shape[1], grad_y.dtype, lora_b.shape[1])
    return [Candidate(name, _IMPLEMENTATIONS[name]) for name in names]


def _bucket(grad_y, h, lora_b, scale) -> tuple:
    return plans.choice_bucket(grad_y.shape[0], grad_y.shape[1], grad_y.dtype, lora_b.shape[1])


DH_DB_CHOICE = Choice("lora_dh_db", _bucket, dh_db_candidates)
