"""Triton kernels: the LoRA linear ``Y = X·deq(W)ᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ``, forward and backward.

W is the frozen base weight [N, K], dense (same dtype as X) or an :class:`NF4Weight`, dequantized
tile by tile in registers inside the GEMM loops or once into a scratch buffer, as the shape's plan
says. A [r, K] and B [N, r] are the trainable LoRA factors, s the scale, b an optional bias.

Dropout is inverted dropout on the LoRA input only, with the Philox mask of
:mod:`peft_fast.kernels.dropout` (eight elements per Philox call); kept values are scaled by
1/(1-p). The mask is regenerated from the seed wherever it is needed (down-projection, dA, dX)
and never stored; :func:`dropout_mask` replays it in plain torch, bit for bit.

Which implementation computes the forward and dX at a shape is the list of
:func:`peft_fast.kernels.plans.lora_forward_plan` / :func:`~peft_fast.kernels.plans.lora_dx_plan`,
run through a :class:`~peft_fast.kernels.choice.Choice` (ops "lora_forward" and "lora_dx"): on a
GPU each shape bucket's candidates are timed once and the fastest kept; elsewhere the first runs.
The kernels live in :mod:`peft_fast.kernels.lora_gemms` (general layout) and
:mod:`peft_fast.kernels.nf4_gemm` (NF4 streamed by rows); this module launches them. H is split
over K and dA over M when their thin outputs alone would leave most of the GPU idle (fp32 partials
summed in a fixed order). dH = s·dY·B and dB = s·dYᵀ·H are thin library GEMMs in the activation
dtype (fp32 accumulation). Every policy (tiles, splits, switch points) is the GPU's on every
device; the device model (:func:`_programs_wanted`) is the only thing that differs on a CPU.

Dropped elements are exactly 0 (``where``, not a multiply by 0), so a NaN that dropout removes
does not leak into H; the reference does the same.
"""

from __future__ import annotations

import functools

import torch
import triton

from peft_fast.kernels import plans
from peft_fast.kernels.choice import Candidate, Choice
from peft_fast.kernels.common import (
    _DOT_PRECISION,
    _block_r,
    _m_bucket,
    arrival_counters,
    fitted_block,
    interpreted,
)
from peft_fast.kernels.dropout import dropout_mask, dropout_threshold, dropout_tiled
from peft_fast.kernels.lora_checks import check_lora_inputs, check_same_dtype
from peft_fast.kernels.lora_decode import lora_decode_forward
from peft_fast.kernels.lora_dh_db import DH_DB_CHOICE, scaled_mm
from peft_fast.kernels.lora_gemms import (
    _DA_CONFIGS,
    _LORA_DOWN_CONFIGS,
    DX_TERM_LAUNCH,
    _add_dropped_lora_term_kernel,
    _lora_da_kernel,
    _lora_down_kernel,
    _lora_down_up_kernel,
    _lora_linear_dx_kernel,
    _lora_linear_fwd_kernel,
    _splitk_epilogue_kernel,
    _splitk_partial_kernel,
)
from peft_fast.kernels.lora_reference import lora_linear_reference_backward, lora_linear_reference_forward
from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton
from peft_fast.kernels.nf4_gemm import ROWS_BLOCK_K, _nf4_rows_fwd_kernel, _nf4_rows_splitk_kernel, base_kind
from peft_fast.kernels.nf4_tiles import _base_args, _compile_options, rows_base_args, rows_scaled
from peft_fast.kernels.plans import SMALL_M_MAX
from peft_fast.nf4 import NF4Weight

__all__ = [
    "DX_CHOICE",
    "FORWARD_CHOICE",
    "SMALL_M_MAX",
    "dropout_mask",
    "dx_candidates",
    "forward_candidates",
    "lora_forward_dequantized",
    "lora_linear_backward",
    "lora_linear_forward",
    "lora_linear_reference_backward",
    "lora_linear_reference_forward",
]

# H's K slices are a multiple of every _LORA_DOWN_CONFIGS BLOCK_K; the policy plans for 64-row tiles.
_LORA_DOWN_GRANULE = max(c.kwargs["BLOCK_K"] for c in _LORA_DOWN_CONFIGS)
_LORA_DOWN_POLICY_BLOCK_M = 64
# Every split-K slice is a multiple of the largest split-K BLOCK_K, so slices never share a K tile.
_SPLITK_GRANULE = 64
# The N tile the split policy plans for (the usual autotune pick; any config stays correct).
_SPLITK_POLICY_BLOCK_N = 128
_SPLITK_EPILOGUE_BLOCK_N = 64
# dA's split over M: rows per split are a multiple of this (every _DA_CONFIGS BLOCK_M divides it),
# and _DA_MIN_BLOCK_K is the narrowest BLOCK_K there (the most column tiles a launch can have).
_DA_MIN_SPLIT_ROWS = 4 * max(c.kwargs["BLOCK_M"] for c in _DA_CONFIGS)
_DA_MIN_BLOCK_K = min(c.kwargs["BLOCK_K"] for c in _DA_CONFIGS)


# -- the device model and split policies -------------------------------------------------------


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """About two programs per streaming multiprocessor; a few on a CPU (the interpreter)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _balanced_trips(tiles: int, steps: int, device: torch.device, step_bytes: float, split_bytes: float) -> int:
    """K steps per slice for a launch of ``tiles`` output tiles x K slices, by a bandwidth model.

    The busiest SM runs ceil(tiles·splits / SMs) programs of ``trips`` steps, each step
    streaming ``step_bytes``; every split adds ``split_bytes`` of fp32 partials (written and read
    back), spread over all SMs. More splits balance the SMs better; fewer move fewer partials.
    """
    sms = max(1, _programs_wanted(device) // 2)
    best_trips, best_cost = steps, None
    for trips in range(1, steps + 1):
        splits = triton.cdiv(steps, trips)
        cost = triton.cdiv(tiles * splits, sms) * trips * step_bytes + (splits - 1) * split_bytes / sms
        if best_cost is None or cost < best_cost:
            best_trips, best_cost = trips, cost
    return best_trips


def _split_k_slice(m: int, n: int, k: int, device: torch.device) -> int:
    """K elements per split of the decode GEMV: the cheapest (N tile, K slice) grid for this GPU.

    Decode streams W once and is bound by how much W each SM streams (:func:`_balanced_trips`).
    For 4096 x 4096 on 132 SMs this picks 4 splits (128 programs of 16 steps: no SM runs two).
    """
    tiles_n = triton.cdiv(n, _SPLITK_POLICY_BLOCK_N)
    steps = triton.cdiv(k, _SPLITK_GRANULE)
    step_bytes = _SPLITK_POLICY_BLOCK_N * _SPLITK_GRANULE // 2  # NF4: half a byte per weight
    return _balanced_trips(tiles_n, steps, device, step_bytes, m * n * 8) * _SPLITK_GRANULE


def _da_splits(m: int, k: int, rank: int, device: torch.device) -> int:
    """How many M ranges dA's reduction is split into: enough programs to fill the GPU about twice.

    dA is only r x K (16 x 4096: 64 tiles of 64 columns), too few programs for an H100's 132 SMs
    when each streams all M rows; each split keeps at least _DA_MIN_SPLIT_ROWS rows so the
    partials' extra traffic (splits x r x K fp32) stays small next to X's M x K.
    """
    tiles = triton.cdiv(rank, _block_r(rank)) * triton.cdiv(k, _DA_MIN_BLOCK_K)
    wanted = triton.cdiv(_programs_wanted(device), tiles)
    return max(1, min(wanted, m // _DA_MIN_SPLIT_ROWS))


# -- launchers --------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _lora_down(x: torch.Tensor, lora_a: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """H = drop(X)·Aᵀ [M, r] in x's dtype (every forward candidate's, so all share one dropout mask)."""
    m, k = x.shape
    rank = lora_a.shape[0]
    h = _empty((m, rank), x.dtype, x.device)
    block_r = _block_r(rank)
    # H is thin ([M, r]): row tiles alone leave most SMs idle below M ~ 8k, so K is split too
    # and fp32 partials are summed in a fixed order (deterministic, nothing to zero).
    row_tiles = triton.cdiv(m, _LORA_DOWN_POLICY_BLOCK_M) * triton.cdiv(rank, block_r)
    steps = triton.cdiv(max(k, 1), _LORA_DOWN_GRANULE)
    step_bytes = _LORA_DOWN_POLICY_BLOCK_M * _LORA_DOWN_GRANULE * x.element_size()
    trips = _balanced_trips(row_tiles, steps, x.device, step_bytes, m * rank * 8)
    k_slice = trips * _LORA_DOWN_GRANULE
    splits = triton.cdiv(max(k, 1), k_slice)
    out = h if splits == 1 else _empty((splits, m, rank), torch.float32, x.device)
    # Grid: one program per (BLOCK_M rows of X, BLOCK_R ranks, K slice); BLOCK_R >= 16 pads tiny
    # ranks for tl.dot.
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(rank, block_r), splits)
    _lora_down_kernel[grid](
        x, lora_a, out, m, k, rank, seed, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), _m_bucket(m), k_slice,
        HAS_DROPOUT=dropout_p > 0, DROPOUT_TILED=dropout_tiled(k), DOT_PRECISION=_DOT_PRECISION[x.dtype],
        BLOCK_R=block_r,
    )  # fmt: skip
    if splits > 1:
        h.copy_(out.sum(0))
    return h


def _y_rows(x, base: NF4Weight, h, lora_b, bias, scale: float) -> torch.Tensor:
    """Y through the row-streaming NF4 GEMM (candidate ``nf4_rows``)."""
    m, k = x.shape
    n, rank = lora_b.shape
    y = _empty((m, n), x.dtype, x.device)
    base_ptrs, base_meta = rows_base_args(base, x)
    block_r = _block_r(rank)
    # Grid: one program per [BLOCK_N, BLOCK_M] tile of Yᵀ, GROUP_N-swizzled so neighbours in
    # launch order share X tiles; W rows stream once per token tile.
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]),)
    _nf4_rows_fwd_kernel[grid](
        x, *base_ptrs, h, lora_b, x if bias is None else bias, y,
        m, n, k, rank, scale, _m_bucket(m),
        **base_meta, HAS_BIAS=bias is not None, DOT_PRECISION=_DOT_PRECISION[x.dtype], BLOCK_R=block_r,
        R_CHUNKS=triton.cdiv(rank, block_r), **_compile_options(base),
    )  # fmt: skip
    return y


def _y_fused(x, base, h, lora_b, bias, scale: float) -> torch.Tensor:
    """Y through the general tiled GEMM, the base streamed as it is (candidate ``fused_gemm``)."""
    m, k = x.shape
    n, rank = lora_b.shape
    y = _empty((m, n), x.dtype, x.device)
    base_ptrs, base_meta = _base_args(base, x)
    # Grid: one program per [BLOCK_M, BLOCK_N] tile of Y, in GROUP_M-swizzled order for L2 reuse
    # of W tiles; block sizes are autotuned per (M bucket, N, K).
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _lora_linear_fwd_kernel[grid](
        x, *base_ptrs, h, lora_b, x if bias is None else bias, y,
        m, n, k, rank, scale, _m_bucket(m),
        **base_meta, HAS_BIAS=bias is not None, DOT_PRECISION=_DOT_PRECISION[x.dtype], BLOCK_R=_block_r(rank),
        **_compile_options(base),
    )  # fmt: skip
    return y


def _y_dequant_fused(x, base: NF4Weight, h, lora_b, bias, scale: float) -> torch.Tensor:
    """deq(W) once into a scratch buffer (live for this GEMM only), then the fused GEMM over it."""
    return _y_fused(x, dequantize_nf4_triton(base, x.dtype), h, lora_b, bias, scale)


def _y_splitk(x, base, h, lora_b, bias, scale: float) -> torch.Tensor:
    """Y through the split-K GEMV (candidate ``splitk_gemv``, M <= SMALL_M_MAX)."""
    m, k = x.shape
    n, rank = lora_b.shape
    if m > SMALL_M_MAX:
        raise ValueError(f"the split-K path handles at most {SMALL_M_MAX} rows, got {m}")
    y = _empty((m, n), x.dtype, x.device)
    k_slice = _split_k_slice(m, n, max(k, 1), x.device)
    n_splits = triton.cdiv(max(k, 1), k_slice)
    # fp32 partial sums per K slice, reduced in a fixed order by the epilogue (deterministic,
    # and nothing needs zeroing, unlike atomics).
    partial = _empty((n_splits, m, n), torch.float32, x.device)
    dot_precision = _DOT_PRECISION[x.dtype]
    # Grid: (N tiles, K slices); each program owns one [BLOCK_K·slice, BLOCK_N] piece of W and all
    # M <= 16 rows of X, padded to the 16-row tl.dot minimum.
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), n_splits)
    if rows_scaled(base, ROWS_BLOCK_K):
        base_ptrs, base_meta = rows_base_args(base, x)
        partial_kernel = _nf4_rows_splitk_kernel
    else:
        base_ptrs, base_meta = _base_args(base, x)
        partial_kernel = _splitk_partial_kernel
    partial_kernel[grid](
        x, *base_ptrs, partial, m, n, k, k_slice, _m_bucket(m),
        **base_meta, DOT_PRECISION=dot_precision, BLOCK_M=SMALL_M_MAX, **_compile_options(base),
    )  # fmt: skip
    # Grid: one program per BLOCK_N columns of Y; the work is tiny (M x N sums plus a rank-r
    # product), so a fixed block size suffices.
    block_n = _SPLITK_EPILOGUE_BLOCK_N
    _splitk_epilogue_kernel[(triton.cdiv(n, block_n),)](
        partial, h, lora_b, x if bias is None else bias, y, m, n, rank, n_splits, scale,
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision, BLOCK_R=_block_r(rank),
        BLOCK_M=SMALL_M_MAX, BLOCK_N=block_n,
    )  # fmt: skip
    return y


def _dense_weight(base: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4_triton(base, dtype) if isinstance(base, NF4Weight) else base


def _lora_down_up(x, lora_a, lora_b, bias, scale: float, dropout_p: float, seed: int):
    """(C, H): H = drop(X)·Aᵀ and C = b + s·H·Bᵀ [M, N], in x's dtype, from one pass over X."""
    m, k = x.shape
    n, rank = lora_b.shape
    h = _empty((m, rank), x.dtype, x.device)
    c = _empty((m, n), x.dtype, x.device)
    # Grid: one program per BLOCK_M rows (all of H's ranks and all of C's columns for them).
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    _lora_down_up_kernel[grid](
        x, lora_a, lora_b, x if bias is None else bias, h, c, m, n, k, rank, scale,
        seed, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), _m_bucket(m),
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0, DROPOUT_TILED=dropout_tiled(k),
        DOT_PRECISION=_DOT_PRECISION[x.dtype], BLOCK_R=_block_r(rank),
    )  # fmt: skip
    return c, h


def _y_library_addmm(x, base, h, lora_b, bias, scale: float) -> torch.Tensor:
    """Our dequantization, a cuBLAS GEMM with the bias, then s·H·Bᵀ as one addmm (candidate ``library_addmm``).

    What PEFT + bitsandbytes do, less their extra passes: the baseline every fused path is timed
    against. Y moves three times (written, read and written by the addmm), which at small M costs
    less than :func:`_forward_library`'s serial H·Bᵀ pass.
    """
    weight = _dense_weight(base, x.dtype)
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return y.addmm_(h, lora_b.t(), alpha=scale)


def _forward_library(x, base, lora_a, lora_b, bias, scale: float, dropout_p: float, seed: int):
    """Candidate ``library``: C = b + s·H·Bᵀ (with H, one Triton pass over X), our dequantization,
    then cuBLAS accumulates X·deq(W)ᵀ into C (``addmm_``, beta = 1).

    Y is written once and never read back by a separate LoRA pass: a compute-bound GEMM reads C in
    its epilogue for free, where ``mm`` then ``addmm_(H, Bᵀ)`` would move Y three times.
    """
    y, h = _lora_down_up(x, lora_a, lora_b, bias, scale, dropout_p, seed)
    return y.addmm_(x, _dense_weight(base, x.dtype).t()), h


def _with_down(y_of_h):
    """A candidate computing Y from H: H first by :func:`_lora_down`, then ``y_of_h``."""

    def run(x, base, lora_a, lora_b, bias, scale, dropout_p, seed):
        h = _lora_down(x, lora_a, dropout_p, seed)
        return y_of_h(x, base, h, lora_b, bias, scale), h

    return run


# Every forward candidate: (x, base, lora_a, lora_b, bias, scale, dropout_p, seed) -> (y, h).
_FORWARD_IMPLEMENTATIONS = {
    plans.SPLITK: _with_down(_y_splitk),
    plans.ROWS: _with_down(_y_rows),
    plans.FUSED: _with_down(_y_fused),
    plans.DEQUANT_FUSED: _with_down(_y_dequant_fused),
    plans.LIBRARY: _forward_library,
    plans.LIBRARY_ADDMM: _with_down(_y_library_addmm),
    plans.DECODE: lora_decode_forward,
}


def _forward_with(name: str):
    # Looked up at call time, so a test can spy on an entry of the table.
    def run(x, base, lora_a, lora_b, bias, scale, dropout_p, seed):
        return _FORWARD_IMPLEMENTATIONS[name](x, base, lora_a, lora_b, bias, scale, dropout_p, seed)

    return run


def forward_candidates(x, base, lora_a, lora_b, bias, scale, dropout_p, seed) -> list[Candidate]:
    """The forward's candidates for these operands, in the plan's order; each returns (y, h)."""
    m, k = x.shape
    n, rank = lora_b.shape
    names = plans.lora_forward_plan(m, n, k, base_kind(base), x.dtype, rank, dropout_p)
    return [Candidate(name, _forward_with(name)) for name in names]


def _forward_bucket(x, base, lora_a, lora_b, bias, scale, dropout_p, seed) -> tuple:
    m, k = x.shape
    n, rank = lora_b.shape
    return plans.choice_bucket(m, n, k, x.dtype, rank, dropout_p > 0, base_kind(base), bias is not None)


FORWARD_CHOICE = Choice("lora_forward", _forward_bucket, forward_candidates)


def _lora_dx_fused(grad_y, base, dh, lora_a, dropout_p: float, seed: int) -> torch.Tensor:
    """dX through the fused dX GEMM, the base streamed as it is (candidate ``fused_gemm``)."""
    m, n = grad_y.shape
    rank, k = lora_a.shape
    dx = _empty((m, k), grad_y.dtype, grad_y.device)
    base_ptrs, base_meta = _base_args(base, grad_y)
    # Grid: one program per [BLOCK_M, BLOCK_K] tile of dX (the GEMM's N loop is the reduction),
    # GROUP_M-swizzled; the same autotuned tile set as the forward GEMM.
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    _lora_linear_dx_kernel[grid](
        grad_y, *base_ptrs, dh, lora_a, dx,
        m, n, k, rank, seed, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), _m_bucket(m),
        **base_meta, HAS_DROPOUT=dropout_p > 0, DROPOUT_TILED=dropout_tiled(k),
        DOT_PRECISION=_DOT_PRECISION[grad_y.dtype],
        BLOCK_R=_block_r(rank), **_compile_options(base),
    )  # fmt: skip
    return dx


def _lora_dx_dequant_fused(grad_y, base: NF4Weight, dh, lora_a, dropout_p: float, seed: int) -> torch.Tensor:
    return _lora_dx_fused(grad_y, dequantize_nf4_triton(base, grad_y.dtype), dh, lora_a, dropout_p, seed)


def _add_dropped_lora_term_(dx, dh, lora_a, dropout_p: float, seed: int, accumulate: bool = True) -> torch.Tensor:
    """dX += (dH·A) ⊙ mask/(1−p) in place (``accumulate``; else dX = the term), the Philox mask regenerated."""
    m, k = dx.shape
    rank = lora_a.shape[0]
    launch = dict(DX_TERM_LAUNCH)
    if interpreted((dx,)):
        launch.update(BLOCK_M=fitted_block(launch["BLOCK_M"], m), BLOCK_K=fitted_block(launch["BLOCK_K"], k))
    # Grid: one program per [BLOCK_M, BLOCK_K] tile of dX.
    grid = (triton.cdiv(m, launch["BLOCK_M"]), triton.cdiv(k, launch["BLOCK_K"]))
    _add_dropped_lora_term_kernel[grid](
        dx, dh, lora_a, m, k, rank, seed, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0, DROPOUT_TILED=dropout_tiled(k), DOT_PRECISION=_DOT_PRECISION[dx.dtype],
        BLOCK_R=_block_r(rank), ACCUMULATE=accumulate, **launch,
    )  # fmt: skip
    return dx


def _lora_dx_library(grad_y, base, dh, lora_a, dropout_p: float, seed: int) -> torch.Tensor:
    """Our dequantization, the dropped LoRA term written to dX, then cuBLAS adds dY·deq(W) (candidate ``library``).

    The term first and cuBLAS accumulating into it (``addmm_``, beta = 1) as the library forward
    does: the term's pass writes dX without reading it (the report: 14.7 -> µs at M = N = K = 4096),
    and the GEMM, FLOP-bound there, reads dX in its epilogue for free.
    """
    m, k = grad_y.shape[0], lora_a.shape[1]
    weight = _dense_weight(base, grad_y.dtype)
    dx = _add_dropped_lora_term_(_empty((m, k), grad_y.dtype, grad_y.device), dh, lora_a, dropout_p, seed, False)
    return dx.addmm_(grad_y, weight)


_DX_IMPLEMENTATIONS = {
    plans.FUSED: _lora_dx_fused,
    plans.DEQUANT_FUSED: _lora_dx_dequant_fused,
    plans.LIBRARY: _lora_dx_library,
}


def dx_candidates(grad_y, base, dh, lora_a, dropout_p, seed) -> list[Candidate]:
    """dX's candidates for these operands, in the plan's order."""
    m, n = grad_y.shape
    rank, k = lora_a.shape
    names = plans.lora_dx_plan(m, n, k, base_kind(base), grad_y.dtype, rank, dropout_p)
    return [Candidate(name, lambda *args, name=name: _DX_IMPLEMENTATIONS[name](*args)) for name in names]


def _dx_bucket(grad_y, base, dh, lora_a, dropout_p, seed) -> tuple:
    m, n = grad_y.shape
    rank, k = lora_a.shape
    return plans.choice_bucket(m, n, k, grad_y.dtype, rank, dropout_p > 0, base_kind(base))


DX_CHOICE = Choice("lora_dx", _dx_bucket, dx_candidates)


def _lora_da(dh, x, dropout_p: float, seed: int) -> torch.Tensor:
    m, k = x.shape
    rank = dh.shape[1]
    da = _empty((rank, k), x.dtype, x.device)
    if k == 0:
        return da
    block_r = _block_r(rank)
    splits = _da_splits(m, k, rank, x.device)
    # Rows per split: a multiple of every config's BLOCK_M (all divide _DA_MIN_SPLIT_ROWS).
    m_per_split = triton.cdiv(triton.cdiv(max(m, 1), splits), _DA_MIN_SPLIT_ROWS) * _DA_MIN_SPLIT_ROWS
    splits = triton.cdiv(max(m, 1), m_per_split)
    # fp32 partials, summed in a fixed order by each tile's last program: deterministic, and
    # nothing to zero (the counters are left zero by every launch).
    out = _empty((splits, rank, k), torch.float32, x.device) if splits > 1 else da
    tiles = triton.cdiv(rank, block_r) * triton.cdiv(k, _DA_MIN_BLOCK_K)  # the most any config's grid has
    counters = arrival_counters(tiles, x.device)
    # Grid: one program per [BLOCK_R, BLOCK_K] tile of dA and M range.
    grid = lambda meta: (triton.cdiv(rank, block_r), triton.cdiv(k, meta["BLOCK_K"]), splits)
    _lora_da_kernel[grid](
        dh, x, da, out, counters, m, k, rank, seed, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        _m_bucket(m), m_per_split, HAS_DROPOUT=dropout_p > 0, DROPOUT_TILED=dropout_tiled(k),
        DOT_PRECISION=_DOT_PRECISION[x.dtype], BLOCK_R=block_r, SPLIT=splits > 1,
    )  # fmt: skip
    return da


def _contiguous(t):
    return t.contiguous() if isinstance(t, torch.Tensor) else t


# -- public API -------------------------------------------------------------------------------


def lora_linear_forward(
    x: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = X·deq(W)ᵀ + b + s·H·Bᵀ`` with ``H = drop(X)·Aᵀ``; returns (y [M,N] in x.dtype, h [M,r] in x.dtype).

    Args:
        x: activations [M, K], fp32, fp16 or bf16.
        base: frozen weight [N, K], a tensor of x's dtype or an :class:`NF4Weight`.
        lora_a: [r, K]; lora_b: [N, r]; bias: [N] or None (all of x's dtype).
        scale: the LoRA scale s.
        dropout_p: dropout probability on the LoRA input, in [0, 1); 0 disables dropout.
        seed: Philox seed of the dropout mask (see :func:`dropout_mask`), in [0, 2**63).

    ``h`` is what the backward needs besides x. The implementation is :data:`FORWARD_CHOICE`'s
    for the shape (:func:`peft_fast.kernels.plans.lora_forward_plan`).
    """
    check_lora_inputs(x, base, lora_a, lora_b, bias, dropout_p, seed)
    x, base, lora_a, lora_b, bias = map(_contiguous, (x, base, lora_a, lora_b, bias))
    scale, dropout_p = float(scale), float(dropout_p)
    m = x.shape[0]
    n, rank = lora_b.shape
    if m == 0:
        return _empty((0, n), x.dtype, x.device), _empty((0, rank), x.dtype, x.device)
    if n == 0:
        return _empty((m, 0), x.dtype, x.device), _lora_down(x, lora_a, dropout_p, seed)
    return FORWARD_CHOICE(x, base, lora_a, lora_b, bias, scale, dropout_p, seed)


def lora_linear_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    base: torch.Tensor | NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    needs_dx: bool,
    needs_da: bool,
    needs_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`lora_linear_forward`: (dx [M,K], da [r,K], db [N,r]) in x.dtype, None where not needed.

    ``dH = s·dY·B`` and ``dB = s·dYᵀ·H`` (``DH_DB_CHOICE``, :mod:`peft_fast.kernels.lora_dh_db`);
    ``dA = dHᵀ·drop(X)``; ``dX = dY·deq(W) + (dH·A) ⊙ mask/(1−p)``, the mask regenerated from
    ``seed`` (pass the forward's seed and ``h``); dX is
    :data:`DX_CHOICE`'s implementation for the shape (:func:`peft_fast.kernels.plans.lora_dx_plan`).
    """
    check_lora_inputs(x, base, lora_a, lora_b, None, dropout_p, seed)
    m, k = x.shape
    n, rank = lora_b.shape
    for name, t, shape in (("grad_y", grad_y, (m, n)), ("h", h, (m, rank))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        check_same_dtype(t, name, x.dtype)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    grad_y, x, h, base, lora_a, lora_b = map(_contiguous, (grad_y, x, h, base, lora_a, lora_b))
    scale, dropout_p = float(scale), float(dropout_p)
    if m == 0:  # an empty batch: dx is empty and the weight gradients are sums over nothing
        dx = _empty((0, k), x.dtype, x.device) if needs_dx else None
        da = torch.zeros((rank, k), dtype=x.dtype, device=x.device) if needs_da else None
        db = torch.zeros((n, rank), dtype=x.dtype, device=x.device) if needs_db else None
        return dx, da, db
    if not (needs_dx or needs_da):
        return None, None, scaled_mm(grad_y.t(), h, scale) if needs_db else None
    if needs_db and n > 0:
        dh, db = DH_DB_CHOICE(grad_y, h, lora_b, scale)  # dY read once for both
    else:
        dh, db = scaled_mm(grad_y, lora_b, scale), scaled_mm(grad_y.t(), h, scale) if needs_db else None
    dx = None
    if needs_dx:
        dx = _empty((m, 0), x.dtype, x.device) if k == 0 else DX_CHOICE(grad_y, base, dh, lora_a, dropout_p, seed)
    da = _lora_da(dh, x, dropout_p, seed) if needs_da else None
    return dx, da, db


def lora_forward_dequantized(
    x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 forward's ``library`` candidate over a weight its caller dequantized already, no dropout, no bias.

    For a caller whose own pass over the NF4 codes wrote deq(W) (DoRA's dequant + norm kernel,
    :func:`peft_fast.kernels.dora.dora_dequant_norm_triton`): (Y = X·Wᵀ + s·H·Bᵀ, H = X·Aᵀ), the
    same kernels and library calls as :func:`lora_linear_forward`'s ``library`` candidate after
    its dequantization (H and C = s·H·Bᵀ in one pass, then cuBLAS accumulates X·Wᵀ
    into C). ``weight`` is dense, in x's dtype; M and N must be at least 1.
    """
    check_lora_inputs(x, weight, lora_a, lora_b, None, 0.0, 0)
    x, weight, lora_a, lora_b = map(_contiguous, (x, weight, lora_a, lora_b))
    if x.shape[0] == 0 or weight.shape[0] == 0:
        raise ValueError(f"lora_forward_dequantized needs M, N >= 1, got x {tuple(x.shape)}, W {tuple(weight.shape)}")
    return _forward_library(x, weight, lora_a, lora_b, None, float(scale), 0.0, 0)
