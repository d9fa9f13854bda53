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
  path the fused kernels must never lose to.
"""

from __future__ import annotations

import torch
import triton

__all__ = [
    "BASE_KINDS",
    "DEQUANT_FUSED",
    "DX_DEQUANT_MIN_M",
    "FUSED",
    "LIBRARY",
    "ROWS",
    "SMALL_M_MAX",
    "SPLITK",
    "choice_bucket",
    "ia3_backward_plan",
    "ia3_forward_plan",
    "lora_dx_plan",
    "lora_forward_plan",
]

SPLITK = "splitk_gemv"
ROWS = "nf4_rows"
FUSED = "fused_gemm"
DEQUANT_FUSED = "dequant_fused_gemm"
LIBRARY = "library"

BASE_KINDS = ("dense", "nf4_rows", "nf4")  # see peft_fast.kernels.nf4_gemm.base_kind

# The switch points, with the report's predictions on either side (Triton 3.9, H200, N = K = 4096,
# bf16, NF4 blocksize 64 + double quantization, r = 16, dropout 0.1; µs):
#
# SMALL_M_MAX: the LoRA forward over a row-layout NF4 base leaves the split-K GEMV (its BLOCK_M is
# tl.dot's minimum, 16) for the row-streaming GEMM: at M = 16 split-K 4.1 < rows 11.5 < library
# 18.0. Over a dense base the split-K GEMV never leads (M = 16: fused GEMM 8.2, library 8.2,
# split-K 8.7; dense W is 4x the bytes of NF4, and the fused GEMM already streams it at 97% of HBM).
SMALL_M_MAX = 16
# DX_DEQUANT_MIN_M (M's bucket, i.e. from M = 65 on): dX = dY·deq(W) over NF4 dequantizes once
# into a scratch buffer instead of in the GEMM's N loop (the general loader, once per row tile of
# dX): M = 64 fused 16.6 < dequant + fused 17.9; M = 128 dequant + fused 18.1 < library 19.0 <
# fused 22.0. (IA)³'s input-scaling dX switches there too (M = 16: fused 16.5 < 17.7; M = 512: 32.3 < 73.3).
DX_DEQUANT_MIN_M = 128
#
# No switch (one leader at every M the report costs, 1 ... 8192):
# - the LoRA forward over a row-layout NF4 base above SMALL_M_MAX: the row-streaming GEMM (M = 4096:
#   188.9 < dequant + dense fused 198.7 < library 200.4; M = 8192: 377.1 < 381.3 < 390.3). The
#   former DEQUANT_GEMM_MIN_M = 2048 predated the row GEMM: its deq(W) work hides under the MMA.
# - over a general-layout NF4 base (K % blocksize != 0) above SMALL_M_MAX: dequantize + dense fused
#   (M = 32: 18.2 vs 47.4 for the general loader in the GEMM; M = 2048: 105.7 vs 431.1), which is
#   then left out.
# - (IA)³'s forward over a row-layout NF4 base: the row-streaming GEMM (output scaling: M = 16
#   5.9 < 17.7 dequant + fused < 18.0 library; M = 4096 179.4 < 189.2 < 261.8).
# - (IA)³'s output-scaling backward: the library path (M = 64: 20.8 < fused 28.4; M = 4096:
#   371.1 < dequant + fused 492.5), the fused kernel reducing dl across its rows every N step.


def _check(m: int, base_kind: str) -> None:
    if m < 1:
        raise ValueError(f"a plan needs at least one row, got M={m}")
    if base_kind not in BASE_KINDS:
        raise ValueError(f"base_kind must be one of {BASE_KINDS}, got {base_kind!r}")


def _bucket(m: int) -> int:
    """M's power-of-two bucket: plans are functions of it, as the timed choices are kept per bucket."""
    return triton.next_power_of_2(m)


def _nf4_dx(m: int) -> list[str]:
    if _bucket(m) < DX_DEQUANT_MIN_M:
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
        return [FUSED, LIBRARY, *([SPLITK] if m <= SMALL_M_MAX else [])]
    if m <= SMALL_M_MAX:
        return [SPLITK, ROWS, LIBRARY] if base_kind == "nf4_rows" else [SPLITK, LIBRARY]
    return [ROWS, DEQUANT_FUSED, LIBRARY] if base_kind == "nf4_rows" else [DEQUANT_FUSED, LIBRARY]


def lora_dx_plan(m: int, n: int, k: int, base_kind: str, dtype: torch.dtype, rank: int, dropout_p: float) -> list[str]:
    """Candidates for dX = dY·deq(W) + (dH·A) ⊙ mask/(1−p), static order."""
    _check(m, base_kind)
    return [FUSED, LIBRARY] if base_kind == "dense" else _nf4_dx(m)


def ia3_forward_plan(m: int, n: int, k: int, base_kind: str, dtype: torch.dtype, scale_input: bool) -> list[str]:
    """Candidates for (IA)³'s Y (and Y0 under output scaling), static order."""
    _check(m, base_kind)
    if base_kind == "dense":
        return [FUSED, LIBRARY]
    return [ROWS, DEQUANT_FUSED, LIBRARY] if base_kind == "nf4_rows" else [DEQUANT_FUSED, LIBRARY]


def ia3_backward_plan(m: int, n: int, k: int, base_kind: str, dtype: torch.dtype, scale_input: bool) -> list[str]:
    """Candidates for (IA)³'s dX and dl from one GEMM over deq(W), static order."""
    _check(m, base_kind)
    if base_kind == "dense":
        return [FUSED, LIBRARY] if scale_input else [LIBRARY, FUSED]
    fused = _nf4_dx(m)
    return fused if scale_input else [LIBRARY, *(c for c in fused if c != LIBRARY)]


def choice_bucket(m: int, *shape_and_kind: object) -> tuple:
    """The shape bucket a timed choice is kept for: M's power of two (uncapped) and the rest as given.

    Every switch point is a power of two, so a plan is the same for every M of a bucket.
    """
    return (triton.next_power_of_2(max(m, 1)), *shape_and_kind)
