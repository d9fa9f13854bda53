"""Triton kernels: the LoRA term of a mixed-adapter batch, one adapter per row (Punica SGMV style).

``Y[m] += s[a(m)]·(X[m]·A[a(m)]ᵀ·B[a(m)]ᵀ + b[a(m)])`` for every row m whose adapter a(m) is one of
the batch's; other rows (PEFT's ``"__base__"``) are not touched. Y is the base output, computed
before for the whole batch by whatever GEMM the layer runs (dense or NF4); this adds the LoRA term
of every row in one gathered pass of two kernels, never a loop over adapters:

* ``_mixed_shrink_kernel``  H[p] = X[rows[p]]·A[slot]ᵀ, p over the rows in adapter order;
* ``_mixed_expand_kernel``  Y[rows[p]] += s[slot]·(H[p]·B[slot]ᵀ + b[slot]), in place.

The batch's adapters are stacked, zero-padded to the largest rank: A [L, R, K], B [L, N, R], the
scales [L] (fp32) and optionally the ``lora_bias`` vectors [L, N]. The rows are grouped by adapter
(:class:`RowGroups`: a stable sort of the row indices by adapter slot, then segment offsets), and
each program handles BLOCK_M rows of one segment (grid axis: the segment), so every tile reads one
adapter's A and B tiles (tl.dot over a gathered X tile), as Punica's SGMV / vLLM's kernels do.
Programs past their segment's end return at once: the grid is sized for the longest segment.

Launch configs are fixed, not autotuned (as vLLM's Punica kernels): BLOCK_M follows the longest
segment (16 ... 64 rows), the rank is one BLOCK_R tile up to 64 (more: chunks), and H is split over
K when the row tiles alone leave most SMs idle (fp32 partials summed in a fixed order). H is in
X's dtype, as PEFT's ``lora_A(x)``; the expand accumulates in fp32 and rounds Y once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _DOT_PRECISION, _SUPPORTED_DTYPES, _block_r, _dot

__all__ = [
    "RowGroups",
    "group_rows",
    "lora_mixed_forward",
    "lora_mixed_reference_forward",
    "shrink_block_m",
]

# The K tile of the shrink and its split granule; the N tile of the expand.
SHRINK_BLOCK_K = 128
EXPAND_BLOCK_N = 128
_MAX_BLOCK_M = 64
# Programs wanted to keep a GPU busy (about two per SM of an H100 / H200); a few under the interpreter.
_GPU_PROGRAMS, _CPU_PROGRAMS = 264, 8


# -- the grouping of rows by adapter ----------------------------------------------------------------


@dataclass(frozen=True)
class RowGroups:
    """The rows of a mixed batch grouped by adapter slot (the segments of Punica's SGMV).

    ``rows`` int32 [P]: the indices of the rows that get a LoRA term, stably sorted by slot;
    ``seg_start`` int32 [S + 1]: segment s is ``rows[seg_start[s]:seg_start[s + 1]]``;
    ``seg_slot`` int32 [S]: its adapter's slot in the stacks. ``max_rows`` is the longest segment and
    ``n_rows`` the batch's row count M (both host ints: the launch grid needs them without a sync).
    """

    rows: torch.Tensor
    seg_start: torch.Tensor
    seg_slot: torch.Tensor
    max_rows: int
    n_rows: int

    @property
    def n_segments(self) -> int:
        return self.seg_slot.shape[0]


def group_rows(slots: list[int] | tuple[int, ...], rows_per_sample: int, device: torch.device | str) -> RowGroups:
    """The grouping of M = len(slots)·rows_per_sample rows, sample i's rows having slot ``slots[i]``.

    A slot of -1 means no LoRA term (PEFT's ``"__base__"``, or an adapter this layer lacks). Rows are
    sample-major (sample i holds rows i·T … i·T + T − 1, T = ``rows_per_sample``), as a [B, T, K]
    activation flattened. Built on the host (the slots come from a Python list of names) and copied
    to ``device`` once.
    """
    per_slot: dict[int, list[int]] = {}
    for sample, slot in enumerate(slots):
        if slot >= 0:
            per_slot.setdefault(int(slot), []).append(sample)
    order = sorted(per_slot)  # segments in slot order; within one, rows in batch order (a stable sort)
    samples = torch.tensor([s for slot in order for s in per_slot[slot]], dtype=torch.int64)
    rows = (samples[:, None] * rows_per_sample + torch.arange(rows_per_sample)).reshape(-1)
    counts = [len(per_slot[slot]) * rows_per_sample for slot in order]
    seg_start = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    as_int32 = lambda t: t.to(dtype=torch.int32).to(device)
    return RowGroups(
        as_int32(rows), as_int32(seg_start), as_int32(torch.tensor(order, dtype=torch.int64)),
        max(counts, default=0), len(slots) * rows_per_sample,
    )  # fmt: skip


# -- kernels ----------------------------------------------------------------------------------------


@triton.jit
def _mixed_shrink_kernel(
    x_ptr, a_ptr, rows_ptr, seg_start_ptr, seg_slot_ptr, h_ptr, P, K, R, k_slice,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """H[p, j] = Σ_k X[rows[p], k]·A[slot, j, k] for the BLOCK_M rows of one segment, over one K slice.

    Program (row tile, rank tile + split·rank tiles, segment) writes ``h_ptr`` + split·P·R: H itself
    with one split, else an fp32 partial the launcher sums.
    """
    seg = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    first = start + tl.program_id(0) * BLOCK_M
    if first >= end:  # the grid is sized for the longest segment
        return
    r_tiles = tl.cdiv(R, BLOCK_R)
    split = tl.program_id(1) // r_tiles
    offs_r = (tl.program_id(1) % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_p = first + tl.arange(0, BLOCK_M)
    in_seg = offs_p < end
    rows = tl.load(rows_ptr + offs_p, mask=in_seg, other=0).to(tl.int64)
    a_ptr += tl.load(seg_slot_ptr + seg).to(tl.int64) * R * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = split * k_slice
    for k0 in range(k_start, tl.minimum(k_start + k_slice, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=in_seg[:, None] & (offs_k[None, :] < K),
                    other=0.0)  # fmt: skip
        a_mask = (offs_k[:, None] < K) & (offs_r[None, :] < R)
        a_t = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + offs_k[:, None], mask=a_mask, other=0.0)
        acc = _dot(x, a_t, acc, DOT_PRECISION)
    h_ptrs = h_ptr + split.to(tl.int64) * P * R + offs_p[:, None].to(tl.int64) * R + offs_r[None, :]
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=in_seg[:, None] & (offs_r[None, :] < R))


@triton.jit
def _mixed_expand_kernel(
    h_ptr, b_ptr, scale_ptr, bias_ptr, rows_ptr, seg_start_ptr, seg_slot_ptr, y_ptr, N, R, row_tiles,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Y[rows[p], n] += s[slot]·(Σ_j H[p, j]·B[slot, n, j] + b[slot, n]) for BLOCK_M rows of one segment.

    Program (n tile · row tiles + row tile, segment): programs next in launch order share B's N tile.
    Every row is in exactly one segment, so the read-modify-write of Y never races.
    """
    seg = tl.program_id(1)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    first = start + (tl.program_id(0) % row_tiles) * BLOCK_M
    if first >= end:
        return
    offs_n = (tl.program_id(0) // row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = first + tl.arange(0, BLOCK_M)
    in_seg = offs_p < end
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    b_ptr += slot * N * R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + offs_p[:, None].to(tl.int64) * R + offs_r[None, :],
                    mask=in_seg[:, None] & (offs_r[None, :] < R), other=0.0)  # fmt: skip
        b_mask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
        b_t = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None], mask=b_mask, other=0.0)
        acc = _dot(h, b_t, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + slot * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    acc = acc * tl.load(scale_ptr + slot)
    rows = tl.load(rows_ptr + offs_p, mask=in_seg, other=0).to(tl.int64)
    y_ptrs = y_ptr + rows[:, None] * N + offs_n[None, :]
    y_mask = in_seg[:, None] & (offs_n[None, :] < N)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32) + acc
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)


# -- launchers --------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage)."""
    return torch.empty(shape, dtype=dtype, device=device)


def shrink_block_m(max_rows: int) -> int:
    """BLOCK_M of both kernels: the longest segment's power of two, between tl.dot's 16 and 64."""
    return min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(max(max_rows, 1))))


def _shrink_splits(tiles: int, k: int, device: torch.device) -> int:
    """K slices of the shrink: enough programs to fill the GPU about twice, each slice >= 4 K tiles.

    H is thin ([P, R]): with few row tiles (a short batch, or few rows per adapter spread over many
    adapters' weights) most SMs would idle while a few stream all of K.
    """
    wanted = _GPU_PROGRAMS if device.type == "cuda" else _CPU_PROGRAMS
    most = max(1, triton.cdiv(k, 4 * SHRINK_BLOCK_K))
    return max(1, min(most, triton.cdiv(wanted, max(tiles, 1))))


def _check(y, x, lora_a, lora_b, scales, bias, groups: RowGroups) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the kernels take fp32 / fp16 / bf16 activations, got {x.dtype}")
    for name, t in (("y", y), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if bias is not None and not bias.is_contiguous():
        raise ValueError("bias must be contiguous")
    if groups.n_rows != x.shape[0]:
        raise ValueError(f"the row grouping is for {groups.n_rows} rows, x has {x.shape[0]}")


def lora_mixed_forward(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    groups: RowGroups,
) -> torch.Tensor:
    """Y [M, N] += the LoRA term of every grouped row, in place, by the two kernels; returns Y.

    x [M, K], lora_a [L, R, K] and lora_b [L, N, R] (x's dtype, zero-padded ranks), scales [L] fp32,
    bias [L, N] or None, groups from :func:`group_rows`.
    """
    _check(y, x, lora_a, lora_b, scales, bias, groups)
    k = x.shape[1]
    n, rank = lora_b.shape[1], lora_b.shape[2]
    segments, p = groups.n_segments, groups.rows.shape[0]
    if segments == 0 or p == 0 or rank == 0:
        return y  # every row is a base row
    block_m, block_r = shrink_block_m(groups.max_rows), _block_r(rank)
    row_tiles = triton.cdiv(groups.max_rows, block_m)
    r_tiles = triton.cdiv(rank, block_r)
    splits = _shrink_splits(triton.cdiv(p, block_m) * r_tiles, k, x.device)
    k_slice = triton.cdiv(triton.cdiv(max(k, 1), splits), SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    splits = triton.cdiv(max(k, 1), k_slice)
    h = _empty((p, rank), x.dtype, x.device)
    out = h if splits == 1 else _empty((splits, p, rank), torch.float32, x.device)
    dot_precision = _DOT_PRECISION[x.dtype]
    # Grid: (row tiles of the longest segment, rank tiles x K slices, segments).
    _mixed_shrink_kernel[(row_tiles, r_tiles * splits, segments)](
        x, lora_a, groups.rows, groups.seg_start, groups.seg_slot, out, p, k, rank, k_slice,
        DOT_PRECISION=dot_precision, BLOCK_M=block_m, BLOCK_K=SHRINK_BLOCK_K, BLOCK_R=block_r,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    if splits > 1:
        h.copy_(out.sum(0))
    # Grid: (N tiles x row tiles of the longest segment, segments).
    _mixed_expand_kernel[(triton.cdiv(n, EXPAND_BLOCK_N) * row_tiles, segments)](
        h, lora_b, scales, scales if bias is None else bias, groups.rows, groups.seg_start, groups.seg_slot, y,
        n, rank, row_tiles, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision,
        BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=block_r, num_warps=4, num_stages=2,
    )  # fmt: skip
    return y


# -- the torch reference ----------------------------------------------------------------------------


def lora_mixed_reference_forward(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    groups: RowGroups,
) -> torch.Tensor:
    """The kernels' math in torch, segment by segment (the torch backend and the tests' reference).

    H in x's dtype (PEFT's ``lora_A(x)``), the expand in fp32 (fp64 for fp64 inputs), Y rounded once.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    starts = groups.seg_start.tolist()
    for s, slot in enumerate(groups.seg_slot.tolist()):
        rows = groups.rows[starts[s] : starts[s + 1]].long()
        if rows.numel() == 0:
            continue
        h = x.index_select(0, rows) @ lora_a[slot].t()
        term = h.to(acc) @ lora_b[slot].to(acc).t()
        if bias is not None:
            term = term + bias[slot].to(acc)
        term = term * scales[slot].to(acc)
        y.index_copy_(0, rows, (y.index_select(0, rows).to(acc) + term).to(y.dtype))
    return y
