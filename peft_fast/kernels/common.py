"""Pieces every GEMM kernel module shares: interpreter switch, autotune helpers, dot, tile order, epilogue."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The kernels below are plain JIT functions under the interpreter (decided when this module is
# imported), so CPU tensors are accepted only then.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# fp32 inputs must not be rounded to TF32 on the tensor cores (the fp32 tolerance is 1e-5).
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}


# -- autotuning -------------------------------------------------------------------------------


def _configs(interpreted: list[triton.Config], gpu: list[triton.Config]) -> list[triton.Config]:
    # Autotuning under the interpreter would run every config in numpy: take the one small config.
    return interpreted if _INTERPRET else gpu


def _cfg(num_warps: int = 4, num_stages: int = 3, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# LoRA ranks are handled in chunks of at most this many columns (padded to >= 16 for tl.dot).
_MAX_BLOCK_R = 32 if _INTERPRET else 64


def _m_bucket(m: int) -> int:
    """Autotuning key for M: its power-of-two bucket, so every batch size does not retune."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _block_r(rank: int) -> int:
    """Rank chunk for tl.dot: a power of two >= 16 (the MMA minimum), at most _MAX_BLOCK_R."""
    return min(max(16, triton.next_power_of_2(rank)), _MAX_BLOCK_R)


# -- device helpers ---------------------------------------------------------------------------

# The interpreter keeps bf16 tensors as raw uint16 and its tl.dot would multiply those bits.
_BF16_DOT_IN_FP32 = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a·b with fp32 accumulation (tl.dot; see _BF16_DOT_IN_FP32 for the interpreter)."""
    if _BF16_DOT_IN_FP32 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row, col) tile of program ``pid``: programs sweep GROUP row tiles per column tile, so
    neighbours in launch order share column (weight) tiles while those are still in L2."""
    tiles_per_group = GROUP * n_cols
    first_row = (pid // tiles_per_group) * GROUP
    rows_in_group = tl.minimum(n_rows - first_row, GROUP)
    within = pid % tiles_per_group
    return first_row + within % rows_in_group, within // rows_in_group


@triton.jit
def _add_bias_and_lora_up(
    acc, offs_m, offs_n, M, N, R, scale, h_ptr, lora_b_ptr, bias_ptr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """acc + b + s·H·Bᵀ for the [BLOCK_M, BLOCK_N] tile at (offs_m, offs_n), in fp32."""
    lora = tl.zeros_like(acc)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], mask=h_mask, other=0.0)
        b_mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
        b_t = tl.load(lora_b_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None], mask=b_mask, other=0.0)
        lora = _dot(h, b_t, lora, DOT_PRECISION)
    acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc
