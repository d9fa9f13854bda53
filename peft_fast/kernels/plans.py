"""Which implementation runs each op at each shape: one plan function per op, pure (no kernels, no tensors).

A plan lists an op's candidate implementations for one shape in the static order: the one the
static Hopper report predicts fastest first, then the rest that may still win on a real GPU
(:mod:`peft_fast.kernels.choice` times them once per shape bucket there and keeps the fastest;
off the GPU the first runs). The launchers follow these lists and nothing else decides a path,
as in GemLite. Every switch point below is where the report's predictions of the two paths cross
(H200, bf16, NF4 blocksize 64 + double quantization, r = 16); ``tests/test_kernel_plans.py``
checks each against the committed baseline's predictions.

Candidates (stable names: they are what the choice cache stores):

* ``splitk_gemv``  M <= SMALL_M_MAX: a split-K GEMV streaming W once (NF4 rows or general loader),
  with a fixed-order reduction and the bias + LoRA epilogue.
* ``nf4_rows``     the row-streaming NF4 GEMM (Yᵀ = deq(W)·Xᵀ, deq(W) as wgmma's register
  operand; :mod:`peft_fast.kernels.nf4_gemm`), for NF4 weights with K % blocksize == 0 and
  blocksize >= the kernels' BLOCK_K.
* ``fused_gemm``   the general tiled GEMM with the op's prologue / epilogue fused, streaming the
  base as it is: dense, or NF4 dequantized tile by tile in registers (any layout).
* ``dequant_fused_gemm``  NF4: our dequantization kernel into a scratch buffer, then the same fused
  GEMM over the dense scratch (dequantizing inside the GEMM costs once per row tile of the output).
* ``library``      our dequantization kernel (NF4), a cuBLAS GEMM (``torch.mm`` / ``addmm``), then the
  op's extra term as library calls or one small Triton kernel: what PEFT + bitsandbytes do, the
  path the fused kernels must never lose to. For the LoRA forward it writes C = b + s·H·Bᵀ first
  (with H, one Triton pass over X) and cuBLAS accumulates X·deq(W)ᵀ into C (beta = 1).
* ``library_addmm``  the LoRA forward's literal library path: H by the down kernel, cuBLAS
  ``addmm`` with the bias, then s·H·Bᵀ as one ``addmm_`` (Y moves three times; no serial pass).
"""

from __future__ import annotations

import torch
import triton

__all__ = [
    "BASE_KINDS",
    "DECODE",
    "DECODE_MAX_RANK",
    "DEQUANT_FUSED",
    "DH_DB_FUSED_MIN_M",
    "DH_DB_MAX_RANK",
    "DORA_DEQUANT_NORM",
    "DORA_SEPARATE",
    "DX_LIBRARY_MIN_M",
    "FUSED",
    "IA3_DX_DEQUANT_MIN_M",
    "IA3_FORWARD_DEQUANT_MIN_M",
    "LIBRARY",
    "LIBRARY_ACCUMULATE_MIN_M",
    "LIBRARY_ADDMM",
    "ROWS",
    "ROWS_MIN_M",
    "SMALL_M_MAX",
    "SPLITK",
    "choice_bucket",
    "dora_forward_plan",
    "ia3_backward_plan",
    "ia3_forward_plan",
    "lora_dh_db_plan",
    "lora_dx_plan",
    "lora_forward_plan",
]

DECODE = "decode_fused"
SPLITK = "splitk_gemv"
ROWS = "nf4_rows"
FUSED = "fused_gemm"
DEQUANT_FUSED = "dequant_fused_gemm"
LIBRARY = "library"
LIBRARY_ADDMM = "library_addmm"
# DoRA's forward without dropout (op "dora_forward", :mod:`peft_fast.kernels.dora`):
# ``dequant_norm``: one pass over the NF4 codes writes deq(W) and the fp32 partial sums of
# ‖deq(W) + s·B·A‖² per row (B·A per tile), then cuBLAS over deq(W) + the LoRA term, then m/‖·‖
# with the norm finished from the partials in the same pass over Y; ``separate``: the standalone
# norm kernel, the LoRA forward's own choice, then m/‖·‖.
DORA_DEQUANT_NORM = "dequant_norm"
DORA_SEPARATE = "separate"

BASE_KINDS = ("dense", "nf4_rows", "nf4")  # see peft_fast.kernels.nf4_gemm.base_kind

# The switch points, with the report's predictions on either side (Triton 3.9, H200, N = K = 4096,
# bf16, NF4 blocksize 64 + double quantization, r = 16, dropout 0.1; µs). Since the cost model sees
# shared memory, the pair-table gathers (one wavefront per 128-byte line of the 2 KB table per
# warp-wide lookup), L2 re-reads, pipeline fill and a 1.5 µs gap between dependent launches, the
# NF4 kernels that dequantize inside the GEMM lose most shapes to the library path (our dequant
# kernel, cuBLAS, the LoRA term): the static order below follows those predictions, and on a GPU
# the runtime choice (kernels/choice.py) times the candidates anyway.
#
# SMALL_M_MAX: the LoRA forward over a row-layout NF4 base leaves the split-K GEMV (its BLOCK_M is
# tl.dot's minimum, 16) for the literal library path: M = 1 split-K 14.3 < library_addmm 26.1 <
# rows 26.8 < library 27.8; M = 16 14.4 < 26.2 < 26.8 < 27.8; M = 32 library_addmm 26.3 < rows 26.8
# < dequant + fused 27.5 < library 27.8. (The NF4 codes come from a 16-entry table kept in shared
# memory by tl.gather: with the former 256-entry table of pairs in global memory the split-K GEMV
# was 30.9 µs at M = 1, gather-bound.) Over a dense base the split-K GEMV never leads (the fused
# GEMM streams dense W at HBM rate).
SMALL_M_MAX = 16
# DH_DB_FUSED_MIN_M (M's bucket): the backward's dH = s·dY·B and dB = s·dYᵀ·H leave the two
# library GEMMs (dY read twice) for the fused pass (dY read once, fp32 partials, one reduction
# launch); whole backward, N = K = 4096: M = 1024 library 72.0 < fused 74.2; M = 2048 fused 123.2
# < library 123.9; M = 4096 fused 225.6 < library 230.5 (below 2048 the partials and the extra
# launch cost more than the second read of a small dY).
DH_DB_FUSED_MIN_M = 2048
# DH_DB_MAX_RANK: the fused dH / dB pass keeps the whole rank in one tile (accumulators [BLOCK_M, r]).
DH_DB_MAX_RANK = 64
# DECODE_MAX_RANK: the one-launch decode kernel holds H in one rank chunk of at most 64 columns.
DECODE_MAX_RANK = 64
# DX_LIBRARY_MIN_M (M's bucket): dX = dY·deq(W) + the LoRA term over NF4 leaves the fused GEMM
# (the general loader, deq(W) once per row tile of dX) for the library path: M = 64 fused 19.0 <
# dequant + fused 22.4 < library 24.0; M = 128 library 24.3 < fused 24.9 < dequant + fused 25.6;
# M = 512 38.8 < 51.4 < 78.5; M = 4096 210.8 < 321.5 < 617.3.
DX_LIBRARY_MIN_M = 128
# IA3_DX_DEQUANT_MIN_M: (IA)³'s input-scaling dX (its dl needs X ⊙ dX-row sums the library path
# computes in a second pass) leaves the fused GEMM for dequantize + fused: M = 128 fused 25.9 <
# dequant + fused 26.9 < library 33.7; M = 256 and up dequant + fused first (M = 512: 52.2 <
# library 62.6 < fused 78.2; M = 4096: 317.6 < 358.2 < 604.2).
IA3_DX_DEQUANT_MIN_M = 256
# IA3_FORWARD_DEQUANT_MIN_M: (IA)³'s forward over a row-layout NF4 base leaves the row-streaming
# GEMM for dequantize + fused: M = 64 rows 15.0 < dequant + fused 22.1 < library 25.1; M = 128
# 23.8 < library 26.6 < rows 27.9; M = 512 36.3 < rows 39.2 < 47.3; M = 4096 211.1 < 267.8 < 313.6.
IA3_FORWARD_DEQUANT_MIN_M = 128
# ROWS_MIN_M and LIBRARY_ACCUMULATE_MIN_M: the LoRA forward over a row-layout NF4 base, above
# SMALL_M_MAX. The literal library path leads while the GEMMs are tiny (M = 64: library_addmm 26.5 <
# rows 26.8 < dequant + fused 27.5 < library 28.0); the row-streaming GEMM, which never writes
# deq(W), leads while X·deq(W)ᵀ is still cheaper than a dequantization pass (M = 128: rows 26.4 <
# library_addmm 26.5 < library 28.2 < 29.0; M = 256: 27.0 < 29.9 < 30.8 < 35.8); from M = 512 the
# GEMM dominates and the library path that writes C = b + s·H·Bᵀ first and lets cuBLAS accumulate
# into it (beta = 1) leads, Y written once (M = 512: library 41.7 < library_addmm 41.9 < dequant +
# fused 42.8 < rows 45.0; M = 4096: 202.5 < 208.7 < 225.9 < rows 323.1, shared-memory bound). Over
# the general NF4 layout (no row loader) the literal library path leads below
# LIBRARY_ACCUMULATE_MIN_M. ``library`` loses below M = 512 because its Triton pass, one CTA per
# row block walking all of N, is latency-bound there (+1.5-1.7 µs over library_addmm at M <= 128).
ROWS_MIN_M = 128
LIBRARY_ACCUMULATE_MIN_M = 512
#
# No switch (one leader at every M the report costs):
# - (IA)³'s output-scaling backward: the library path, the fused kernel reducing dl across its
#   rows every N step.


def _check(m: int, base_kind: str) -> None:
    if m < 1:
        raise ValueError(f"a plan needs at least one row, got M={m}")
    if base_kind not in BASE_KINDS:
        raise ValueError(f"base_kind must be one of {BASE_KINDS}, got {base_kind!r}")


def _bucket(m: int) -> int:
    """M's power-of-two bucket: plans are functions of it, as the timed choices are kept per bucket."""
    return triton.next_power_of_2(m)


def _nf4_dx(m: int) -> list[str]:
    if _bucket(m) < DX_LIBRARY_MIN_M:
        return [FUSED, DEQUANT_FUSED, LIBRARY]
    return [LIBRARY, FUSED, DEQUANT_FUSED]


def _nf4_ia3_dx(m: int) -> list[str]:
    if _bucket(m) < IA3_DX_DEQUANT_MIN_M:
        return [FUSED, DEQUANT_FUSED, LIBRARY]
    return [DEQUANT_FUSED, LIBRARY, FUSED]


def lora_forward_plan(
    m: int, n: int, k: int, base_kind: str, dtype: torch.dtype, rank: int, dropout_p: float
) -> list[str]:
    """Candidates for the forward (H = drop(X)·Aᵀ, then Y = X·deq(W)ᵀ + b + s·H·Bᵀ), static order.

    ``base_kind``: "dense", "nf4_rows" (the row loader applies) or "nf4" (general layout). Every
    candidate computes H with the same kernel (the backward regenerates its dropout mask).
    """
    _check(m, base_kind)
    if base_kind == "dense":
        return [FUSED, LIBRARY, LIBRARY_ADDMM, *([SPLITK] if m <= SMALL_M_MAX else [])]
    rows = [ROWS] if base_kind == "nf4_rows" else []
    if m <= SMALL_M_MAX:
        decode = [DECODE] if rows and rank <= DECODE_MAX_RANK else []
        return [*decode, SPLITK, LIBRARY_ADDMM, LIBRARY, *rows]
    if _bucket(m) >= LIBRARY_ACCUMULATE_MIN_M:
        return [LIBRARY, LIBRARY_ADDMM, DEQUANT_FUSED, *rows]
    if rows and _bucket(m) >= ROWS_MIN_M:
        return [ROWS, LIBRARY_ADDMM, LIBRARY, DEQUANT_FUSED]
    return [LIBRARY_ADDMM, LIBRARY, DEQUANT_FUSED, *rows]


def lora_dx_plan(m: int, n: int, k: int, base_kind: str, dtype: torch.dtype, rank: int, dropout_p: float) -> list[str]:
    """Candidates for dX = dY·deq(W) + (dH·A) ⊙ mask/(1−p), static order."""
    _check(m, base_kind)
    return [FUSED, LIBRARY] if base_kind == "dense" else _nf4_dx(m)


def ia3_forward_plan(m: int, n: int, k: int, base_kind: str, dtype: torch.dtype, scale_input: bool) -> list[str]:
    """Candidates for (IA)³'s Y (and Y0 under output scaling), static order."""
    _check(m, base_kind)
    if base_kind == "dense":
        return [FUSED, LIBRARY]
    if base_kind == "nf4_rows" and _bucket(m) < IA3_FORWARD_DEQUANT_MIN_M:
        return [ROWS, DEQUANT_FUSED, LIBRARY]
    return [DEQUANT_FUSED, LIBRARY, ROWS] if base_kind == "nf4_rows" else [DEQUANT_FUSED, LIBRARY]


def ia3_backward_plan(m: int, n: int, k: int, base_kind: str, dtype: torch.dtype, scale_input: bool) -> list[str]:
    """Candidates for (IA)³'s dX and dl from one GEMM over deq(W), static order."""
    _check(m, base_kind)
    if base_kind == "dense":
        return [FUSED, LIBRARY] if scale_input else [LIBRARY, FUSED]
    if scale_input:
        return _nf4_ia3_dx(m)
    return [LIBRARY, *(c for c in _nf4_dx(m) if c != LIBRARY)]


def choice_bucket(m: int, *shape_and_kind: object) -> tuple:
    """The shape bucket a timed choice is kept for: M's power of two (uncapped) and the rest as given.

    Every switch point is a power of two, so a plan is the same for every M of a bucket.
    """
    return (triton.next_power_of_2(max(m, 1)), *shape_and_kind)


def dora_forward_plan(m: int, base_kind: str) -> list[str]:
    """Candidates for DoRA's forward without dropout (the norm, Y0 = X·deq(W)ᵀ + s·H·Bᵀ, m/‖·‖ + b), static order.

    Over NF4 above SMALL_M_MAX the LoRA forward dequantizes W anyway (the library path leads its
    plan): emitting the norm from that pass saves the norm's own launch and NF4 read (report, H200,
    N = K = 4096, bf16, r = 16, no dropout; see ``tools/hopper/fused_ops.py``'s dora_forward). At
    decode sizes the LoRA forward streams the NF4 codes once without dequantizing, and a dense
    base has no dequantization pass: there the standalone norm kernel runs.
    """
    _check(m, base_kind)
    if base_kind != "dense" and m > SMALL_M_MAX:
        return [DORA_DEQUANT_NORM, DORA_SEPARATE]
    return [DORA_SEPARATE]


def lora_dh_db_plan(m: int, n: int, dtype: torch.dtype, rank: int) -> list[str]:
    """Candidates for the backward's dH = s·dY·B and dB = s·dYᵀ·H (op "lora_dh_db"), static order.

    ``fused_gemm`` reads dY once for both (:mod:`peft_fast.kernels.lora_dh_db`), ``library`` is two
    cuBLAS GEMMs reading it twice. DH_DB_FUSED_MIN_M (M's bucket): where the fused pass leads.
    """
    _check(m, "dense")
    if rank > DH_DB_MAX_RANK:
        return [LIBRARY]  # the fused pass holds dH's and dB's rows in one rank tile
    return [FUSED, LIBRARY] if _bucket(m) >= DH_DB_FUSED_MIN_M else [LIBRARY, FUSED]
