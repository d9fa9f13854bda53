"""Triton: NF4 GEMMs that stream W by rows — deq(W) as the MMA's register operand, Yᵀ tiles.

Every kernel here computes tiles of Yᵀ = deq(W)·Xᵀ: the dequantized weight tile [BLOCK_N, BLOCK_K]
is the first (A) operand of ``tl.dot``, which Hopper's wgmma reads from registers, so deq(W)
never round-trips through shared memory and the next tile's dequantization overlaps the running
MMA; X tiles reach shared memory by cp.async, pipelined by Triton. W tiles come from
:func:`peft_fast.kernels.nf4_tiles.load_nf4_rows` (one scale per row, both codes of a packed
byte looked up in the 16-entry code table kept in shared memory), which needs K % blocksize == 0
and BLOCK_K <= blocksize
(:func:`peft_fast.kernels.nf4_tiles.rows_scaled`); other layouts take the general kernels of
:mod:`peft_fast.kernels.lora_gemms` and :mod:`peft_fast.kernels.ia3`.

* ``_nf4_rows_fwd_kernel``    LoRA: Y = X·deq(W)ᵀ + b + s·H·Bᵀ, M between the decode and the
  dequantize-then-dense regimes (:func:`peft_fast.kernels.plans.lora_forward_plan`).
* ``_nf4_rows_splitk_kernel`` the decode path (M <= 16): partial[s] = X·deq(W[:, slice s])ᵀ,
  each weight byte read once; ``lora_gemms._splitk_epilogue_kernel`` sums the slices.
* ``_ia3_rows_fwd_kernel``    (IA)³: Y = (X ⊙ l)·deq(W)ᵀ + b (input scaling, l applied in the
  prologue to the register tile of deq(W), whose columns it scales) or (X·deq(W)ᵀ + b) ⊙ l
  (output scaling, in the epilogue, after storing the unscaled Y0 the backward needs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _cfg, _dot, _grouped_tile, autotune
from peft_fast.kernels.nf4_tiles import load_nf4_rows, rows_scaled
from peft_fast.nf4 import NF4Weight

__all__ = ["IA3_ROWS_CONFIGS", "ROWS_BLOCK_K", "ROWS_FWD_CONFIGS", "ROWS_SPLITK_CONFIGS", "base_kind"]

# BLOCK_N x BLOCK_M is the Yᵀ tile (W rows x tokens). 128 x 128 x 64 at 8 warps: the compile
# report predicts ~300 SASS instructions per warp per K step against ~694 MMA cycles, with a
# wgmma group kept in flight (the static Hopper report).
ROWS_FWD_CONFIGS = [
    _cfg(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
    _cfg(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_N=8, num_warps=4, num_stages=3),
]
ROWS_SPLITK_CONFIGS = [
    _cfg(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    # Two stages: Triton 3.6 keeps a wgmma group in flight here (4 stages drain it each step).
    _cfg(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=2),
    _cfg(BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
]
# (IA)³ has no split-K decode path, so its list reaches down to small M (the report, output
# scaling at 4096²: 10.2 µs at M = 16, 15.0 at M = 64 with 64 x 32 tiles, then dequantize + fused
# leads from M = 128, plans.IA3_FORWARD_DEQUANT_MIN_M). No 32 x 32 tile: with the codes gathered
# from the on-chip table it keeps an 8-byte stack frame (ptxas, Triton 3.9), which the ratchet refuses.
IA3_ROWS_CONFIGS = [
    _cfg(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
    _cfg(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
    _cfg(BLOCK_N=64, BLOCK_M=32, BLOCK_K=64, GROUP_N=8, num_warps=4, num_stages=3),
    _cfg(BLOCK_N=32, BLOCK_M=16, BLOCK_K=64, GROUP_N=8, num_warps=4, num_stages=4),
]
# The widest BLOCK_K of the lists above: a weight whose blocksize is narrower takes the general kernels.
ROWS_BLOCK_K = max(c.kwargs["BLOCK_K"] for c in ROWS_FWD_CONFIGS + ROWS_SPLITK_CONFIGS + IA3_ROWS_CONFIGS)
_ROWS_DIMS = {"BLOCK_N": "N", "BLOCK_M": "M", "BLOCK_K": "K"}
_SPLITK_DIMS = {"BLOCK_N": "N", "BLOCK_K": "K"}
_BLOCK_K_CAP = {"BLOCK_K": "BLOCKSIZE"}  # one scale per tile row


@autotune(ROWS_FWD_CONFIGS, key=["m_bucket", "N", "K"], dims=_ROWS_DIMS, caps=_BLOCK_K_CAP)
@triton.jit
def _nf4_rows_fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    h_ptr, lora_b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale, m_bucket,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    """Yᵀ tile [BLOCK_N, BLOCK_M] = s·B·Hᵀ + deq(W)·Xᵀ + b, stored transposed into Y [M, N]."""
    pid_n, pid_m = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = offs_m.to(tl.int64)[None, :] * K
    m_mask = offs_m[None, :] < M
    # The LoRA term s·B·Hᵀ starts the accumulator: as an epilogue, its dot after the K loop
    # makes Triton 3.6 drain wgmma to zero on every K step (no dequant/MMA overlap).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for chunk in tl.static_range(R_CHUNKS):
        offs_r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
        b_mask = (offs_n[:, None] < N) & (offs_r[None, :] < R)
        lora_b = tl.load(lora_b_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :], mask=b_mask, other=0.0)
        h_mask = m_mask & (offs_r[:, None] < R)
        h_t = tl.load(h_ptr + offs_m.to(tl.int64)[None, :] * R + offs_r[:, None], mask=h_mask, other=0.0)
        acc = _dot(lora_b, h_t, acc, DOT_PRECISION)
    acc = acc * scale
    # K is a multiple of BLOCKSIZE, hence of BLOCK_K: no K mask.
    for k0 in range(0, K, BLOCK_K):
        w = load_nf4_rows(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
            DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K,
        )  # fmt: skip
        x_t = tl.load(x_ptr + x_rows + (k0 + tl.arange(0, BLOCK_K))[:, None], mask=m_mask, other=0.0)
        # Round the dequantized weight to the activation dtype, as a bf16/fp16 matmul would.
        acc = _dot(w.to(x_t.dtype), x_t, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = m_mask & (offs_n[:, None] < N)
    tl.store(y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@autotune(ROWS_SPLITK_CONFIGS, key=["m_bucket", "N", "K", "k_slice"], dims=_SPLITK_DIMS, caps=_BLOCK_K_CAP)
@triton.jit
def _nf4_rows_splitk_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, partial_ptr,
    M, N, K, k_slice, m_bucket,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """partial[s, m, n] = Σ_{k in slice s} X[m, k]·deq(W)[n, k] for all M (<= BLOCK_M) rows.

    Program (n tile, slice s) is the only one to read its weight bytes, so W is read once.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    x_rows = offs_m.to(tl.int64)[None, :] * K
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = split * k_slice
    for k0 in range(k_start, tl.minimum(k_start + k_slice, K), BLOCK_K):
        w = load_nf4_rows(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
            DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K,
        )  # fmt: skip
        x_t = tl.load(x_ptr + x_rows + (k0 + tl.arange(0, BLOCK_K))[:, None], mask=m_mask, other=0.0)
        acc = _dot(w.to(x_t.dtype), x_t, acc, DOT_PRECISION)
    out = partial_ptr + split.to(tl.int64) * M * N + offs_m[None, :] * N + offs_n[:, None]
    tl.store(out, acc, mask=m_mask & (offs_n[:, None] < N))


@autotune(IA3_ROWS_CONFIGS, key=["m_bucket", "N", "K"], dims=_ROWS_DIMS, caps=_BLOCK_K_CAP)
@triton.jit
def _ia3_rows_fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr,
    l_ptr, bias_ptr, y_ptr, y0_ptr,
    M, N, K, m_bucket,
    DOUBLE_QUANT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    SCALE_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):  # fmt: skip
    """Yᵀ tile [BLOCK_N, BLOCK_M] = (deq(W)·diag(l))·Xᵀ + b (SCALE_INPUT) or (deq(W)·Xᵀ + b) ⊙ l, writing Y0 then.

    Input scaling rounds deq(W)·l to X's dtype where ``ia3._ia3_linear_fwd_kernel`` and PEFT round
    X ⊙ l: the same product, one rounding each, so the two agree within the dtype's tolerance.
    fp32 accumulation; Y and Y0 are rounded once.
    """
    pid_n, pid_m = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = offs_m.to(tl.int64)[None, :] * K
    m_mask = offs_m[None, :] < M
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # K is a multiple of BLOCKSIZE, hence of BLOCK_K: no K mask.
    for k0 in range(0, K, BLOCK_K):
        w = load_nf4_rows(
            w_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, code2_ptr, offs_n, k0, N, K,
            DOUBLE_QUANT, BLOCKSIZE, NESTED, BLOCK_K,
        )  # fmt: skip
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if SCALE_INPUT:
            # (X ⊙ l)·Wᵀ = X·(W·diag(l))ᵀ: l scales the register tile of W, not the X tile, which
            # would have to leave shared memory for registers and go back (wgmma's B operand).
            w = w * tl.load(l_ptr + offs_k)[None, :]
        x_t = tl.load(x_ptr + x_rows + offs_k[:, None], mask=m_mask, other=0.0)
        acc = _dot(w.to(x_t.dtype), x_t, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = m_mask & (offs_n[:, None] < N)
    out = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    if not SCALE_INPUT:
        tl.store(y0_ptr + out, acc.to(y0_ptr.dtype.element_ty), mask=y_mask)
        acc = acc * tl.load(l_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def base_kind(base: torch.Tensor | NF4Weight) -> str:
    """The plan's name for a base weight (:mod:`peft_fast.kernels.plans`): "dense", "nf4_rows" or "nf4".

    "nf4_rows" when the row loader applies at every config's BLOCK_K (K % blocksize == 0 and
    blocksize >= ROWS_BLOCK_K), on CPU and GPU alike; other NF4 layouts are "nf4".
    """
    if not isinstance(base, NF4Weight):
        return "dense"
    return "nf4_rows" if rows_scaled(base, ROWS_BLOCK_K) else "nf4"
