"""Triton: the whole small-M LoRA forward over a row-layout NF4 base in ONE launch (candidate ``decode_fused``).

``Y = X·deq(W)ᵀ + b + s·H·Bᵀ`` and ``H = drop(X)·Aᵀ`` for M <= :data:`plans.SMALL_M_MAX` rows. Decode
streams W once and is bound by bytes and launches, not FLOPs: the split-K GEMV path before this
one took five dependent launches (H split over K, its torch sum and copy, the split-K GEMV, the
epilogue), 6 µs of launch gaps in the static Hopper report against a 2.1 µs HBM floor.

One program per (N tile, K slice) streams its piece of W once and, by linearity, also sums its
slice's share of H: ``H = Σ_s drop(X_s)·A_sᵀ`` (A is r x K, ~1/16 of the NF4 bytes per program at
r = 16, read from L2). Each program writes fp32 partials (its Y tile's base product and its H
slice) to a workspace and arrives on its N tile's int32 counter (atomic add, acq_rel); the last
program to arrive sums the tile's partials in slice order (deterministic: no float atomics),
rounds H to the activation dtype, adds ``b + s·H·Bᵀ`` (B's tile only), writes Y, and resets the
counter to 0 so the cached counter buffer is clean for the next call. The last program of N tile
0 also writes H (the backward needs it); every tile reduces the same partials in the same order,
so the H used for Y's LoRA term is the H returned. H is rounded before the up-projection, as the
other candidates do (they compute H in x's dtype first).

Two K-loops, chosen by M (a constexpr):

* M == 1 (``GEMV``): FMA dot products, no tensor cores: a [BLOCK_N, BLOCK_K] tile of codes
  (16-entry table in shared memory via ``tl.gather``) times the x row, summed along K, then the
  row scale applied once per tile row. tl.dot would pad the one row to 16 (16x the MMA work) and
  needs deq(W) in the MMA operand layout (shared-memory round trips); see the plan's comments.
* 2 <= M <= 16: ``tl.dot`` with the dequantized tile as wgmma's register operand (Yᵀ = deq(W)·Xᵀ,
  M padded to 16), as the split-K GEMV before it; 16 FMAs per weight would be issue-bound.

The dropout mask is :mod:`peft_fast.kernels.dropout`'s Philox mask of element (m, k) of X, drawn
exactly as ``lora_gemms._lora_down_kernel`` draws it (``dropout_keep_block`` over int64 rows and
the tile's first column), so H here is H there bit for bit in its mask and the backward's
regenerated mask agrees.

Workspace: the fp32 partials come from :func:`_empty` per call (fully written before read); the
counters are one zeroed int32 buffer per (device, stream), grown on demand and left zero by every
launch. Two launches in flight on one stream never overlap; streams do not share counters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _DOT_PRECISION, _block_r, _cfg, _dot, _m_bucket, arrival_counters, autotune
from peft_fast.kernels.dropout import dropout_keep_block, dropout_threshold, dropout_tiled
from peft_fast.kernels.nf4_tiles import (
    _compile_options,
    load_nf4_rows,
    load_nf4_rows_codes,
    rows_base_args,
    rows_scaled,
)
from peft_fast.kernels.plans import DECODE_MAX_RANK, SMALL_M_MAX
from peft_fast.nf4 import NF4Weight

__all__ = ["DECODE_BLOCK_K", "DECODE_MAX_RANK", "decode_applies", "lora_decode_forward", "lora_decode_reference"]

# K tile: one NF4 block of 64 (the usual blocksize) per tile row, so each row has one scale.
DECODE_BLOCK_K = 64
# The N tile the split policy plans for; every config's BLOCK_N is at least _MIN_BLOCK_N.
_POLICY_BLOCK_N = 128
_MIN_BLOCK_N = 64

# GPU list (the interpreter keeps the first, BLOCK_N fitted to N). BLOCK_K stays 64: the K slices
# are multiples of it and the row loader needs BLOCK_K <= blocksize.
_DECODE_CONFIGS = [
    _cfg(BLOCK_N=128, BLOCK_K=DECODE_BLOCK_K, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=64, BLOCK_K=DECODE_BLOCK_K, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=128, BLOCK_K=DECODE_BLOCK_K, num_warps=8, num_stages=2),
    _cfg(BLOCK_N=256, BLOCK_K=DECODE_BLOCK_K, num_warps=8, num_stages=2),
]
assert min(c.kwargs["BLOCK_N"] for c in _DECODE_CONFIGS) >= _MIN_BLOCK_N


@autotune(
    _DECODE_CONFIGS,
    key=["m_bucket", "N", "K", "R", "k_slice", "n_splits"],
    dims={"BLOCK_N": "N"},
    caps={"BLOCK_K": "BLOCKSIZE"},
)
@triton.jit
def _lora_decode_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    a_ptr, b_ptr, bias_ptr, y_ptr, h_ptr, y_part_ptr, h_part_ptr, count_ptr,
    M, N, K, R, k_slice, n_splits, scale, seed, threshold, inv_keep, m_bucket,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DROPOUT_TILED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GEMV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (N tile, K slice): partials of Yᵀ's tile and of H over the slice, then the last to arrive reduces.

    Yᵀ tiles are [BLOCK_N, BLOCK_M] (BLOCK_M = 1 for the GEMV, 16 for tl.dot); partials live at
    y_part[s, m, n] (fp32 [n_splits, M, N]) and h_part[tile, s, m, j] (fp32 [tiles, n_splits, M, BLOCK_R]).
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)[:, None]  # [BLOCK_M, 1]: X's rows, as the dropout mask indexes them
    m_mask = offs_m < M
    k_start = split * k_slice
    k_end = tl.minimum(k_start + k_slice, K)
    a_rows = offs_r.to(tl.int64)[:, None] * K
    r_mask = offs_r[:, None] < R
    # K % BLOCK_K == 0 (the row loader's layout): no K masks.
    if GEMV:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_h = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # summed over K once, after the loop
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            code, absmax = load_nf4_rows_codes(
                w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
                DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K,
            )  # fmt: skip
            x = tl.load(x_ptr + offs_k[None, :]).to(tl.float32)  # [1, BLOCK_K]
            # One scale per tile row: applied to the row's dot product, not to every weight.
            acc = tl.fma(tl.sum(code * x, axis=1), absmax, acc)
            x_lora = x
            if HAS_DROPOUT:
                keep = dropout_keep_block(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED)
                x_lora = tl.where(keep, x, 0.0)
            lora_a = tl.load(a_ptr + a_rows + offs_k[None, :], mask=r_mask, other=0.0).to(tl.float32)
            acc_h = tl.fma(lora_a, tl.broadcast_to(x_lora, (BLOCK_R, BLOCK_K)), acc_h)
        y_t = acc[:, None]  # [BLOCK_N, 1]
        h_t = tl.sum(acc_h, axis=1)[:, None]  # [BLOCK_R, 1]
    else:
        y_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        h_t = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        x_rows_t = offs_m.to(tl.int64)[None, :] * K
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = load_nf4_rows(
                w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
                DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K,
            )  # fmt: skip
            x_t = tl.load(x_ptr + x_rows_t + offs_k[:, None], mask=m_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            # Round the dequantized weight to the activation dtype, as a bf16/fp16 matmul would.
            y_t = _dot(w.to(x_t.dtype), x_t, y_t, DOT_PRECISION)
            x_lora_t = x_t
            if HAS_DROPOUT:
                keep = dropout_keep_block(seed, rows, k0, K, threshold, BLOCK_M, BLOCK_K, DROPOUT_TILED)
                x_lora_t = tl.where(tl.trans(keep), x_t, 0.0)
            lora_a = tl.load(a_ptr + a_rows + offs_k[None, :], mask=r_mask, other=0.0)  # [BLOCK_R, BLOCK_K]
            h_t = _dot(lora_a, x_lora_t, h_t, DOT_PRECISION)
    # -- partials out, then arrive on the tile's counter ------------------------------------------
    n_mask = offs_n < N
    ym_mask = n_mask[:, None] & m_mask[None, :]
    y_offsets = offs_m[None, :] * N + offs_n[:, None]  # M <= 16: int32 is enough
    tl.store(y_part_ptr + split * M * N + y_offsets, y_t, mask=ym_mask)
    h_offsets = offs_m[None, :] * BLOCK_R + offs_r[:, None]
    h_tile = h_part_ptr + pid_n * n_splits * M * BLOCK_R
    tl.store(h_tile + split * M * BLOCK_R + h_offsets, h_t, mask=m_mask[None, :])
    # Every thread's partial stores happen before the (one-thread) release of the arrival.
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == n_splits - 1:
        # The tile's last program: every slice's partials are visible (acquire); read them from
        # L2 (.cg), not from a possibly stale L1, in slice order.
        total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        h = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
        for s in range(0, n_splits):
            total += tl.load(y_part_ptr + s * M * N + y_offsets, mask=ym_mask, other=0.0, cache_modifier=".cg")
            h += tl.load(h_tile + s * M * BLOCK_R + h_offsets, mask=m_mask[None, :], other=0.0, cache_modifier=".cg")
        if HAS_DROPOUT:
            # 1/(1-p) once on the fp32 sum, as _lora_down_kernel does.
            h = h * inv_keep
        h = h.to(y_ptr.dtype.element_ty)  # H in x's dtype, as returned and as the other candidates use it
        # Rank lanes past R hold 0·x, NaN where x has an Inf: zero them, as a masked reload of H would.
        h = tl.where((offs_r < R)[:, None], h, 0.0)
        b_mask = n_mask[:, None] & (offs_r[None, :] < R)
        lora_b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :], mask=b_mask, other=0.0)
        if GEMV:
            lora = tl.sum(lora_b.to(tl.float32) * tl.trans(h.to(tl.float32)), axis=1)[:, None]
        else:
            lora = _dot(lora_b, h, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_PRECISION)
        total += lora * scale
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + y_offsets, total.to(y_ptr.dtype.element_ty), mask=ym_mask)
        if pid_n == 0:
            h_mask = m_mask[None, :] & (offs_r[:, None] < R)
            tl.store(h_ptr + offs_m[None, :] * R + offs_r[:, None], h, mask=h_mask)
        # Nobody else touches this counter in this launch: leave it zero for the next one.
        tl.atomic_xchg(count_ptr + pid_n, 0)


# -- launcher ------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel writes except the counters comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the GPU's; 4 on a CPU (the interpreter), as lora_linear's model."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _k_slice(n: int, k: int, device: torch.device) -> int:
    """K elements per program: enough slices that (N tiles x slices) about fills the GPU once.

    One wave, one program per SM: the W bytes per SM are then balanced, and every extra slice
    only adds fp32 partials (M x N x 4 bytes) and a re-read of A's columns. 4096 x 4096 on 132
    SMs: 32 tiles of 128 rows x 4 slices of 1024 (16 K steps each), 128 programs.
    """
    steps = triton.cdiv(k, DECODE_BLOCK_K)
    tiles = triton.cdiv(n, _POLICY_BLOCK_N)
    splits = max(1, min(steps, _sms(device) // tiles))
    return triton.cdiv(steps, splits) * DECODE_BLOCK_K


def decode_applies(m: int, base: torch.Tensor | NF4Weight, rank: int) -> bool:
    """Whether the one-launch kernel handles these operands (the plan lists it only then)."""
    return 1 <= m <= SMALL_M_MAX and rows_scaled(base, DECODE_BLOCK_K) and rank <= DECODE_MAX_RANK


def lora_decode_forward(
    x: torch.Tensor,
    base: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N], h [M, r]) of the LoRA forward in one launch; operands already checked by lora_linear_forward.

    Needs M <= SMALL_M_MAX, a row-layout NF4 base (K % blocksize == 0, blocksize >= 64) and
    r <= DECODE_MAX_RANK (:func:`decode_applies`); raises ValueError otherwise.
    """
    m, k = x.shape
    n, rank = lora_b.shape
    if not decode_applies(m, base, rank):
        raise ValueError(
            f"the one-launch decode kernel needs 1 <= M <= {SMALL_M_MAX}, a row-layout NF4 base "
            f"(K % blocksize == 0, blocksize >= {DECODE_BLOCK_K}) and r <= {DECODE_MAX_RANK}; "
            f"got M={m}, base {type(base).__name__} {tuple(base.shape)}, r={rank}"
        )
    device = x.device
    y = _empty((m, n), x.dtype, device)
    h = _empty((m, rank), x.dtype, device)
    k_slice = _k_slice(n, k, device)
    n_splits = triton.cdiv(k, k_slice)
    block_r = _block_r(rank)
    tiles = triton.cdiv(n, _MIN_BLOCK_N)  # the most N tiles any config makes
    y_part = _empty((n_splits, m, n), torch.float32, device)
    h_part = _empty((tiles, n_splits, m, block_r), torch.float32, device)
    counters = arrival_counters(tiles, device)
    gemv = m == 1
    base_ptrs, base_meta = rows_base_args(base, x)
    # Grid: (N tiles, K slices); every program streams its [BLOCK_N, k_slice] piece of W once.
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), n_splits)
    _lora_decode_kernel[grid](
        x, *base_ptrs, lora_a, lora_b, x if bias is None else bias, y, h, y_part, h_part, counters,
        m, n, k, rank, k_slice, n_splits, float(scale), seed, dropout_threshold(dropout_p),
        1.0 / (1.0 - dropout_p), _m_bucket(m),
        **base_meta, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, DROPOUT_TILED=dropout_tiled(k),
        DOT_PRECISION=_DOT_PRECISION[x.dtype], GEMV=gemv, BLOCK_M=1 if gemv else SMALL_M_MAX, BLOCK_R=block_r,
        **_compile_options(base),
    )  # fmt: skip
    return y, h


def lora_decode_reference(x, base, lora_a, lora_b, bias, scale, keep, dropout_p) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of :func:`lora_decode_forward`'s math: H rounded to x's dtype before s·H·Bᵀ.

    Sums in fp32 like the kernel (the library reference rounds each product to x's dtype);
    ``keep`` is the dropout keep-mask [M, K] or None.
    """
    from peft_fast.nf4 import dequantize_nf4

    x32 = x.float()
    dropped = x32 if keep is None else torch.where(keep, x32, 0.0) / (1.0 - dropout_p)
    h = (dropped @ lora_a.float().t()).to(x.dtype)
    y = x32 @ dequantize_nf4(base, torch.float32).t() + scale * (h.float() @ lora_b.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), h
