"""The Philox dropout mask (peft_fast/kernels/dropout.py): tile and element draws equal the torch replay."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from peft_fast.kernels.dropout import dropout_keep, dropout_keep_tile, dropout_mask, dropout_threshold

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _mask_kernel(out_ptr, seed, M, K, threshold, TILED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    if TILED:
        keep = dropout_keep_tile(seed, rows, col0, K, threshold, BLOCK_M, BLOCK_K)
    else:
        keep = dropout_keep(seed, rows, offs_k[None, :], K, threshold)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + rows * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


def _kernel_mask(seed, m, k, p, tiled):
    out = torch.full((m, k), 7, dtype=torch.int8, device=KERNEL_DEVICE)  # poisoned: 7 is neither 0 nor 1
    grid = (triton.cdiv(m, 16), triton.cdiv(k, 32))
    _mask_kernel[grid](out, seed, m, k, dropout_threshold(p), TILED=tiled, BLOCK_M=16, BLOCK_K=32)
    return out


@pytest.mark.parametrize(
    "seed,m,k,tiled",
    [(3, 17, 72, True), (3, 17, 72, False), (2**40 + 9, 5, 45, False), (11, 33, 40, True), (0, 1, 8, True)],
)
def test_kernel_masks_equal_the_torch_replay(seed, m, k, tiled):
    p = 0.3
    assert torch.equal(_kernel_mask(seed, m, k, p, tiled), dropout_mask(seed, m, k, p, KERNEL_DEVICE).to(torch.int8))


def test_tile_and_element_draws_agree():
    assert torch.equal(_kernel_mask(5, 20, 64, 0.1, True), _kernel_mask(5, 20, 64, 0.1, False))


def test_threshold_resolution():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.1) == 6554  # drops with probability 0.100006
    assert dropout_threshold(0.999999999) == 65535  # never 65536: that would drop everything
    keep = dropout_mask(1, 512, 512, 0.5, KERNEL_DEVICE)
    assert abs(keep.float().mean().item() - 0.5) < 5 * (0.25 / keep.numel()) ** 0.5


def test_rows_of_odd_width_continue_the_stream():
    """Element e of a [m, k] mask is element e of the flat stream, whatever k is."""
    flat = dropout_mask(9, 1, 7 * 13, 0.4, KERNEL_DEVICE).reshape(-1)
    assert torch.equal(dropout_mask(9, 7, 13, 0.4, KERNEL_DEVICE).reshape(-1), flat)
