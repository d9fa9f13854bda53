"""Triton kernels of the bottleneck adapter, forward and backward, and their autotune configs.

The math, the saved tensors and the launchers are in :mod:`peft_fast.kernels.adapter`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from peft_fast.kernels.common import _cfg, _dot, _grouped_tile, autotune
from peft_fast.kernels.dropout import dropout_keep, dropout_keep_block

# The GPU's lists everywhere: under the interpreter common.autotune keeps the first, fitted to the
# shape. Every kernel tiles rows with BLOCK_M and the hidden size D with BLOCK_K / BLOCK_N.
_DIMS = {"BLOCK_M": "M", "BLOCK_K": "D", "BLOCK_N": "D"}

# Kernels that own row blocks (and B or D column blocks) and reduce over D or B.
_ROW_CONFIGS = [
    _cfg(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=4),
]
# The up-projection: [BLOCK_M, BLOCK_N] tiles of Y, reducing over B.
_UP_CONFIGS = [
    _cfg(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=4),
]
# dX: fixed tiles, not autotuned, because with LN the kernel writes one row of partial dγ / dβ sums
# per BLOCK_M rows; configs with different BLOCK_M would leave stale rows behind in autotuning.
# (The launcher fits the blocks to the shape under the interpreter, as common.autotune does.)
_DX_LAUNCH = {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
# Weight gradients: tiles of dW, reducing over M.
_WEIGHT_GRAD_CONFIGS = [
    _cfg(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
]


# -- device helpers ---------------------------------------------------------------------------


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) for fp32 z: relu (NaN stays NaN, as torch.relu), gelu (erf form), swish = z·σ(z)."""
    if ACTIVATION == 0:
        return tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) for fp32 z (relu' is 0 at 0, as torch's)."""
    if ACTIVATION == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == 1:
        # Φ(z) + z·φ(z)
        return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _in_first_block(offs, n, block_id):
    """offs < n in block 0, all false in the others: one writer for a value every block computes.

    (Arithmetic rather than ``& (block_id == 0)``: the interpreter rejects scalar-bool masks.)
    """
    return offs + block_id * n < n


@triton.jit
def _row_stats(x_ptr, rows, row_mask, D, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, 1/std) in fp32 of the X rows ``rows``: two sweeps (mean, then the centred squares),
    as torch does, not E[x²] − mean², which cancels badly for rows with a large mean."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        acc += tl.load(x_ptr + rows * D + cols, mask=row_mask & (cols < D), other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / D
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        mask = row_mask & (cols < D)
        x = tl.load(x_ptr + rows * D + cols, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        acc += centred * centred
    return mean, 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)


@triton.jit
def _normalized(x, mean, rstd, ln_w_ptr, ln_b_ptr, offs_k, D):
    """γ·(x − mean)·rstd + β for an X tile (fp32; 0 in columns past D)."""
    gamma = tl.load(ln_w_ptr + offs_k, mask=offs_k < D, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + offs_k, mask=offs_k < D, other=0.0).to(tl.float32)
    return (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]


@triton.jit
def _dz_times_wd(
    dz_ptr, wd_ptr, rows, row_mask, offs_k, D, B,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The [BLOCK_M, BLOCK_K] tile of dZ·Wd at (rows, offs_k), in fp32: the gradient of LN?(X)."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        dz = tl.load(dz_ptr + rows * B + offs_b[None, :], mask=row_mask & (offs_b[None, :] < B), other=0.0)
        wd_mask = (offs_b[:, None] < B) & (offs_k[None, :] < D)
        wd = tl.load(wd_ptr + offs_b[:, None].to(tl.int64) * D + offs_k[None, :], mask=wd_mask, other=0.0)
        acc = _dot(dz, wd, acc, DOT_PRECISION)
    return acc


@triton.jit
def _store_up_tile(
    acc, rows, row_mask, offs_n, col0, bu_ptr, r_ptr, y_ptr, D, scale, seed, threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Y tile = R + s·drop(acc + bu) for the up-projection tile ``acc`` at columns col0 + [0, BLOCK_N)."""
    acc += tl.load(bu_ptr + offs_n, mask=offs_n < D, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if HAS_DROPOUT:
        keep = dropout_keep_block(seed, rows, col0, D, threshold, BLOCK_M, BLOCK_N, DROPOUT_TILED)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    mask = row_mask & (offs_n[None, :] < D)
    acc += tl.load(r_ptr + rows * D + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * D + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# -- forward kernels --------------------------------------------------------------------------


@autotune(_ROW_CONFIGS, key=["m_bucket", "D", "B"], dims=_DIMS)
@triton.jit
def _adapter_down_kernel(
    x_ptr, ln_w_ptr, ln_b_ptr, wd_ptr, bd_ptr, z_ptr, mean_ptr, rstd_ptr,
    M, D, B, eps, m_bucket,
    HAS_LN: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Z[m, j] = Σ_k LN?(X)[m, k]·Wd[j, k] + bd[j]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = offs_m[:, None].to(tl.int64)
    row_mask = offs_m[:, None] < M
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_LN:
        mean, rstd = _row_stats(x_ptr, rows, row_mask, D, eps, BLOCK_M, BLOCK_K)
        # Every column block computes the statistics; the first one stores them.
        tl.store(mean_ptr + offs_m, mean, mask=_in_first_block(offs_m, M, tl.program_id(1)))
        tl.store(rstd_ptr + offs_m, rstd, mask=_in_first_block(offs_m, M, tl.program_id(1)))
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows * D + offs_k[None, :], mask=row_mask & (offs_k[None, :] < D), other=0.0)
        if HAS_LN:
            # Rounded to X's dtype, as a LayerNorm module's output feeding the projection would be.
            x = _normalized(x, mean, rstd, ln_w_ptr, ln_b_ptr, offs_k, D).to(x.dtype)
        wd_mask = (offs_k[:, None] < D) & (offs_b[None, :] < B)
        wd_t = tl.load(wd_ptr + offs_b[None, :].to(tl.int64) * D + offs_k[:, None], mask=wd_mask, other=0.0)
        acc = _dot(x, wd_t, acc, DOT_PRECISION)
    acc += tl.load(bd_ptr + offs_b, mask=offs_b < B, other=0.0).to(tl.float32)[None, :]
    z_mask = row_mask & (offs_b[None, :] < B)
    tl.store(z_ptr + rows * B + offs_b[None, :], acc.to(z_ptr.dtype.element_ty), mask=z_mask)


@autotune(_UP_CONFIGS, key=["m_bucket", "D", "B"], dims=_DIMS)
@triton.jit
def _adapter_up_kernel(
    z_ptr, wu_ptr, bu_ptr, r_ptr, y_ptr,
    M, D, B, scale, seed, threshold, inv_keep, m_bucket,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Y tile = R + s·drop(act(Z)·Wuᵀ + bu), act applied to Z tiles in registers."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m[:, None].to(tl.int64)
    row_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        z = tl.load(z_ptr + rows * B + offs_b[None, :], mask=row_mask & (offs_b[None, :] < B), other=0.0)
        # act(0) = 0 for every activation, so padded lanes add nothing.
        a = _activation(z.to(tl.float32), ACTIVATION).to(z.dtype)
        wu_mask = (offs_b[:, None] < B) & (offs_n[None, :] < D)
        wu_t = tl.load(wu_ptr + offs_n[None, :].to(tl.int64) * B + offs_b[:, None], mask=wu_mask, other=0.0)
        acc = _dot(a, wu_t, acc, DOT_PRECISION)
    _store_up_tile(
        acc, rows, row_mask, offs_n, pid_n * BLOCK_N, bu_ptr, r_ptr, y_ptr, D, scale, seed, threshold, inv_keep,
        HAS_DROPOUT, DROPOUT_TILED, BLOCK_M, BLOCK_N,
    )  # fmt: skip


# One pass per row block (no LayerNorm, one bottleneck chunk): BLOCK_M rows of X are read once
# from HBM for Z, and again (from L2: 128 blocks of 32 rows x 4096 x 2 bytes = 33.5 MB in flight)
# as the residual. BLOCK_M = 32 gives 128 programs at M = 4096 on 132 SMs.
_FUSED_CONFIGS = [
    _cfg(BLOCK_M=32, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_K=128, BLOCK_N=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=16, BLOCK_K=128, BLOCK_N=128, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3),
]


@autotune(_FUSED_CONFIGS, key=["m_bucket", "D", "B"], dims=_DIMS)
@triton.jit
def _adapter_fused_fwd_kernel(
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, z_ptr, y_ptr,
    M, D, B, scale, seed, threshold, inv_keep, m_bucket,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Serial adapter without LayerNorm, B <= BLOCK_B: Z = X·Wdᵀ + bd, then Y = X + s·drop(act(Z)·Wuᵀ + bu).

    The same roundings as _adapter_down_kernel + _adapter_up_kernel: Z is stored (and used) in
    X's dtype, act(Z) is rounded to it before the up-projection.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_B)
    rows = offs_m[:, None].to(tl.int64)
    row_mask = offs_m[:, None] < M
    b_mask = offs_b < B
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows * D + offs_k[None, :], mask=row_mask & (offs_k[None, :] < D), other=0.0)
        wd_mask = (offs_k[:, None] < D) & b_mask[None, :]
        wd_t = tl.load(wd_ptr + offs_b[None, :].to(tl.int64) * D + offs_k[:, None], mask=wd_mask, other=0.0)
        acc = _dot(x, wd_t, acc, DOT_PRECISION)
    acc += tl.load(bd_ptr + offs_b, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    z = acc.to(z_ptr.dtype.element_ty)
    tl.store(z_ptr + rows * B + offs_b[None, :], z, mask=row_mask & b_mask[None, :])
    # act(0) = 0 for every activation, so padded bottleneck lanes add nothing.
    a = _activation(z.to(tl.float32), ACTIVATION).to(z.dtype)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        wu_mask = b_mask[:, None] & (offs_n[None, :] < D)
        wu_t = tl.load(wu_ptr + offs_n[None, :].to(tl.int64) * B + offs_b[:, None], mask=wu_mask, other=0.0)
        u = _dot(a, wu_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION)
        _store_up_tile(
            u, rows, row_mask, offs_n, n0, bu_ptr, x_ptr, y_ptr, D, scale, seed, threshold, inv_keep,
            HAS_DROPOUT, DROPOUT_TILED, BLOCK_M, BLOCK_N,
        )  # fmt: skip


# -- backward kernels -------------------------------------------------------------------------


@autotune(_ROW_CONFIGS, key=["m_bucket", "D", "B"], dims=_DIMS)
@triton.jit
def _adapter_dz_kernel(
    dy_ptr, wu_ptr, z_ptr, dz_ptr,
    M, D, B, grad_scale, seed, threshold, m_bucket,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dZ = (s·drop(dY)·Wu) ⊙ act'(Z); grad_scale = s/(1−p) is applied once, to the fp32 sum."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows = offs_m[:, None].to(tl.int64)
    row_mask = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        dy = tl.load(dy_ptr + rows * D + offs_n[None, :], mask=row_mask & (offs_n[None, :] < D), other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep_block(seed, rows, n0, D, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED)
            dy = tl.where(keep, dy, 0.0)
        wu_mask = (offs_n[:, None] < D) & (offs_b[None, :] < B)
        wu = tl.load(wu_ptr + offs_n[:, None].to(tl.int64) * B + offs_b[None, :], mask=wu_mask, other=0.0)
        acc = _dot(dy, wu, acc, DOT_PRECISION)
    z_mask = row_mask & (offs_b[None, :] < B)
    z = tl.load(z_ptr + rows * B + offs_b[None, :], mask=z_mask, other=0.0).to(tl.float32)
    dz = acc * grad_scale * _activation_grad(z, ACTIVATION)
    tl.store(dz_ptr + rows * B + offs_b[None, :], dz.to(dz_ptr.dtype.element_ty), mask=z_mask)


@autotune(_WEIGHT_GRAD_CONFIGS, key=["m_bucket", "D", "B"], dims=_DIMS)
@triton.jit
def _adapter_dup_kernel(
    dy_ptr, z_ptr, dwu_ptr, dbu_ptr,
    M, D, B, grad_scale, seed, threshold, m_bucket,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dWu[n, j] = Σ_m G[m, n]·act(Z)[m, j] and dbu[n] = Σ_m G[m, n], G = s·drop(dY).

    BLOCK_K tiles D (the rows of Wu). The first column block also stores dbu.
    """
    offs_n = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows_t = offs_m[None, :].to(tl.int64)
        dy_mask = (offs_m[None, :] < M) & (offs_n[:, None] < D)
        dy_t = tl.load(dy_ptr + rows_t * D + offs_n[:, None], mask=dy_mask, other=0.0)
        if HAS_DROPOUT:
            dy_t = tl.where(dropout_keep(seed, rows_t, offs_n[:, None], D, threshold), dy_t, 0.0)
        z_mask = (offs_m[:, None] < M) & (offs_b[None, :] < B)
        z = tl.load(z_ptr + offs_m[:, None].to(tl.int64) * B + offs_b[None, :], mask=z_mask, other=0.0)
        a = _activation(z.to(tl.float32), ACTIVATION).to(z.dtype)
        acc = _dot(dy_t, a, acc, DOT_PRECISION)
        bias_acc += tl.sum(dy_t.to(tl.float32), axis=1)
    w_mask = (offs_n[:, None] < D) & (offs_b[None, :] < B)
    dwu = (acc * grad_scale).to(dwu_ptr.dtype.element_ty)
    tl.store(dwu_ptr + offs_n[:, None].to(tl.int64) * B + offs_b[None, :], dwu, mask=w_mask)
    dbu = (bias_acc * grad_scale).to(dbu_ptr.dtype.element_ty)
    tl.store(dbu_ptr + offs_n, dbu, mask=_in_first_block(offs_n, D, tl.program_id(1)))


@autotune(_WEIGHT_GRAD_CONFIGS, key=["m_bucket", "D", "B"], dims=_DIMS)
@triton.jit
def _adapter_ddown_kernel(
    dz_ptr, x_ptr, ln_w_ptr, ln_b_ptr, mean_ptr, rstd_ptr, dwd_ptr, dbd_ptr,
    M, D, B, m_bucket,
    HAS_LN: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dWd[j, k] = Σ_m dZ[m, j]·LN?(X)[m, k] and dbd[j] = Σ_m dZ[m, j]; LN(X) rebuilt from the saved
    statistics. The first column block also stores dbd."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dz_mask = (offs_b[:, None] < B) & (offs_m[None, :] < M)
        dz_t = tl.load(dz_ptr + offs_m[None, :].to(tl.int64) * B + offs_b[:, None], mask=dz_mask, other=0.0)
        rows = offs_m[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows * D + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < D), other=0.0)
        if HAS_LN:
            mean = tl.load(mean_ptr + offs_m, mask=offs_m < M, other=0.0)
            rstd = tl.load(rstd_ptr + offs_m, mask=offs_m < M, other=0.0)
            x = _normalized(x, mean, rstd, ln_w_ptr, ln_b_ptr, offs_k, D).to(x.dtype)
        acc = _dot(dz_t, x, acc, DOT_PRECISION)
        bias_acc += tl.sum(dz_t.to(tl.float32), axis=1)
    w_mask = (offs_b[:, None] < B) & (offs_k[None, :] < D)
    dwd = acc.to(dwd_ptr.dtype.element_ty)
    tl.store(dwd_ptr + offs_b[:, None].to(tl.int64) * D + offs_k[None, :], dwd, mask=w_mask)
    tl.store(dbd_ptr + offs_b, bias_acc.to(dbd_ptr.dtype.element_ty), mask=_in_first_block(offs_b, B, tl.program_id(1)))


@triton.jit
def _adapter_dx_kernel(
    dz_ptr, wd_ptr, dy_ptr, x_ptr, ln_w_ptr, mean_ptr, rstd_ptr, dx_ptr, dgamma_ptr, dbeta_ptr,
    M, D, B,
    HAS_LN: tl.constexpr, ADD_GRAD_Y: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dX = LN-backward(dZ·Wd) (+ dY for a serial adapter, whose residual is X itself).

    Without LN, program (i, j) writes one [BLOCK_M, BLOCK_K] tile. With LN, program (i, 0) owns
    BLOCK_M whole rows: x̂ = (x − mean)·rstd, g = (dZ·Wd)·γ,
    dX = rstd·(g − mean_k(g) − x̂·mean_k(g·x̂)); it also writes row block i's partial sums of
    dγ = Σ_m (dZ·Wd)·x̂ and dβ = Σ_m dZ·Wd into row i of the [row blocks, D] buffers.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m[:, None].to(tl.int64)
    row_mask = offs_m[:, None] < M
    if HAS_LN:
        mean = tl.load(mean_ptr + offs_m, mask=offs_m < M, other=0.0)
        rstd = tl.load(rstd_ptr + offs_m, mask=offs_m < M, other=0.0)
        mean_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
        mean_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask & (offs_k[None, :] < D)
            g = _dz_times_wd(dz_ptr, wd_ptr, rows, row_mask, offs_k, D, B, DOT_PRECISION, BLOCK_B, BLOCK_M, BLOCK_K)
            g = g * tl.load(ln_w_ptr + offs_k, mask=offs_k < D, other=0.0).to(tl.float32)[None, :]
            x = tl.load(x_ptr + rows * D + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            mean_g += tl.sum(g, axis=1)
            mean_gx += tl.sum(g * x_hat, axis=1)
        mean_g = mean_g / D
        mean_gx = mean_gx / D
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask & (offs_k[None, :] < D)
            dxn = _dz_times_wd(dz_ptr, wd_ptr, rows, row_mask, offs_k, D, B, DOT_PRECISION, BLOCK_B, BLOCK_M, BLOCK_K)
            x = tl.load(x_ptr + rows * D + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            gamma = tl.load(ln_w_ptr + offs_k, mask=offs_k < D, other=0.0).to(tl.float32)
            dx = (dxn * gamma[None, :] - mean_g[:, None] - x_hat * mean_gx[:, None]) * rstd[:, None]
            if ADD_GRAD_Y:
                dx += tl.load(dy_ptr + rows * D + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows * D + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            partial = pid_m.to(tl.int64) * D + offs_k
            tl.store(dgamma_ptr + partial, tl.sum(dxn * x_hat, axis=0), mask=offs_k < D)
            tl.store(dbeta_ptr + partial, tl.sum(dxn, axis=0), mask=offs_k < D)
    else:
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = row_mask & (offs_k[None, :] < D)
        dx = _dz_times_wd(dz_ptr, wd_ptr, rows, row_mask, offs_k, D, B, DOT_PRECISION, BLOCK_B, BLOCK_M, BLOCK_K)
        if ADD_GRAD_Y:
            dx += tl.load(dy_ptr + rows * D + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows * D + offs_k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
