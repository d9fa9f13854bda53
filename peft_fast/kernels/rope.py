"""Triton kernels: rotary position embedding (RoPE) on q and k, in place or into a new tensor, and its torch reference.

Hugging Face's ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` (Llama, Mistral, Qwen2/3,
Gemma 1/2, and Phi-3's partial-rotary form) splits the first ``rd = cos.shape[-1]`` features of
each head into halves x1, x2 (``h = rd/2`` each) and computes, with c1, c2, s1, s2 the halves of
cos and sin,

    o1 = x1·c1 - x2·s1,    o2 = x2·c2 + x1·s2,    features rd..D pass through.

Its gradient (the transpose) is the same map with (s1, s2) replaced by (-s2, -s1): "sin negated,
its halves swapped", which for HF's cos / sin (both halves equal) is the inverse rotation. Both
halves of cos and sin are read, so any cos / sin HF's rotary modules produce (every rope type and
attention scaling is already folded into them) gives HF's result.

* ``_rope_kernel``  one program per (batch, position) row of cos and a block of heads: cos and sin
  are loaded once and applied to BLOCK_HQ heads of q and BLOCK_HK heads of k (one launch for both
  under GQA). Reads with any strides (HF's q is a transposed view of the projection's output) and
  writes to an output with its own strides: the output may be the input itself (in place).

Math in fp32 (fp64 for fp64 inputs) with one rounding per output element; HF rounds each product
and the sum to the input dtype, so bf16 / fp16 results agree within their rounding, and fp32 / fp64
ones bit for bit (their launches forbid contracted multiply-adds, so every product rounds as HF's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peft_fast.kernels.common import _INTERPRET, _SUPPORTED_DTYPES

__all__ = [
    "rope_reference_",
    "rope_reference_rotate",
    "rope_rotate",
    "rope_rotate_",
]

_KERNEL_DTYPES = (*_SUPPORTED_DTYPES, torch.float64)
# Elements of one half-tile (heads x rotary half) of q a program rotates: 2048 is Llama-3-8B's 32 heads
# x 64, i.e. a program moves ~20 KB (q and k, read and written) in bf16, enough to stream.
_MAX_HALF_TILE = 2048
# Elements of a half-tile each thread holds: 16 bf16 = two 16-byte vectors per half.
_ELEMENTS_PER_THREAD = 16
# Pass-through features (partial rotary) are copied in chunks of at most this many per head.
_MAX_BLOCK_PASS = 128


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr, a, b, head0, n_heads,
    in_sa, in_sb, in_sc, in_sd, out_sa, out_sb, out_sc, out_sd,
    c1, c2, s1, s2, HALF, PASS,
    COPY_PASS: tl.constexpr, FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    """Rotate heads [head0, head0 + BLOCK_H) of row (a, b) of one tensor; c1..s2 are [1, BLOCK_HALF] rows."""
    acc = tl.float64 if FP64 else tl.float32
    heads = head0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    heads = heads.to(tl.int64)[:, None]
    cols = cols[None, :]
    src = in_ptr + a * in_sa + b * in_sb + heads * in_sc
    dst = out_ptr + a * out_sa + b * out_sb + heads * out_sc
    # Both halves are loaded before either is stored: the output may be the input itself.
    x1 = tl.load(src + cols * in_sd, mask=mask, other=0.0).to(acc)
    x2 = tl.load(src + (cols + HALF) * in_sd, mask=mask, other=0.0).to(acc)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(dst + cols * out_sd, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + (cols + HALF) * out_sd, o2.to(out_ptr.dtype.element_ty), mask=mask)
    if COPY_PASS:
        # Out of place with partial rotary: features 2·HALF.. are copied unchanged (in place they stay).
        for p0 in range(0, PASS, BLOCK_PASS):
            pcols = 2 * HALF + p0 + tl.arange(0, BLOCK_PASS)[None, :]
            pmask = (heads < n_heads) & (pcols < 2 * HALF + PASS)
            x = tl.load(src + pcols * in_sd, mask=pmask, other=0.0)
            tl.store(dst + pcols * out_sd, x.to(out_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(
    q_in_ptr, q_out_ptr, k_in_ptr, k_out_ptr, cos_ptr, sin_ptr,
    ROWS_B, HQ, HK, HALF, PASS,
    q_in_sa, q_in_sb, q_in_sc, q_in_sd, q_out_sa, q_out_sb, q_out_sc, q_out_sd,
    k_in_sa, k_in_sb, k_in_sc, k_in_sd, k_out_sa, k_out_sb, k_out_sc, k_out_sd,
    cos_sa, cos_sb, cos_sd, sin_sa, sin_sb, sin_sd,
    HAS_K: tl.constexpr, INVERSE: tl.constexpr, COPY_PASS: tl.constexpr, FP64: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    """Row (a, b) = divmod(program_id(0), ROWS_B), heads block program_id(1): q (and k) rotated into the outputs.

    Tensors are [A, ROWS_B, heads, D] by their strides (sa, sb, sc, sd), cos / sin [A, ROWS_B, 2·HALF]
    (a stride may be 0: one row for the whole batch). ``INVERSE`` applies the transpose (backward).
    """
    acc = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0)
    a = (row // ROWS_B).to(tl.int64)
    b = (row % ROWS_B).to(tl.int64)
    head_block = tl.program_id(1)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos_row = cos_ptr + a * cos_sa + b * cos_sb
    sin_row = sin_ptr + a * sin_sa + b * sin_sb
    c1 = tl.load(cos_row + cols * cos_sd, mask=col_mask, other=0.0).to(acc)[None, :]
    c2 = tl.load(cos_row + (cols + HALF) * cos_sd, mask=col_mask, other=0.0).to(acc)[None, :]
    s1 = tl.load(sin_row + cols * sin_sd, mask=col_mask, other=0.0).to(acc)[None, :]
    s2 = tl.load(sin_row + (cols + HALF) * sin_sd, mask=col_mask, other=0.0).to(acc)[None, :]
    if INVERSE:
        # The transpose of the rotation: o1 = x1·c1 + x2·s2, o2 = x2·c2 - x1·s1.
        s1, s2 = -s2, -s1
    _rotate_heads(
        q_in_ptr, q_out_ptr, a, b, head_block * BLOCK_HQ, HQ,
        q_in_sa, q_in_sb, q_in_sc, q_in_sd, q_out_sa, q_out_sb, q_out_sc, q_out_sd,
        c1, c2, s1, s2, HALF, PASS, COPY_PASS, FP64, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip
    if HAS_K:
        _rotate_heads(
            k_in_ptr, k_out_ptr, a, b, head_block * BLOCK_HK, HK,
            k_in_sa, k_in_sb, k_in_sc, k_in_sd, k_out_sa, k_out_sb, k_out_sc, k_out_sd,
            c1, c2, s1, s2, HALF, PASS, COPY_PASS, FP64, BLOCK_HK, BLOCK_HALF, BLOCK_PASS,
        )  # fmt: skip


# -- geometry and checks ------------------------------------------------------------------------


def _unsqueezed(cos: torch.Tensor, x: torch.Tensor, unsqueeze_dim: int) -> tuple[torch.Tensor, int]:
    """``cos.unsqueeze(unsqueeze_dim)`` expanded to x's shape (stride 0 where it broadcasts), and x's head dim.

    The head dim is the one the unsqueeze inserted (HF: 1 for q [B, H, S, D], 2 for [B, S, H, D]).
    """
    cos_u = cos.unsqueeze(unsqueeze_dim)
    head_dim = unsqueeze_dim if unsqueeze_dim >= 0 else unsqueeze_dim + cos_u.dim()
    if cos_u.dim() > x.dim() or head_dim == cos_u.dim() - 1:
        raise ValueError(
            f"cos / sin of shape {tuple(cos.shape)} unsqueezed at dim {unsqueeze_dim} do not broadcast "
            f"over the heads of a tensor of shape {tuple(x.shape)}"
        )
    pad = x.dim() - cos_u.dim()
    cos_u = cos_u.reshape((1,) * pad + tuple(cos_u.shape)) if pad else cos_u
    lead = tuple(x.shape[:-1])
    try:
        if torch.broadcast_shapes(tuple(cos_u.shape[:-1]), lead) != lead:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"cos / sin of shape {tuple(cos.shape)} unsqueezed at dim {unsqueeze_dim} do not broadcast to "
            f"{lead} (the leading dims of a tensor of shape {tuple(x.shape)})"
        ) from None
    return cos_u.expand(*lead, cos_u.shape[-1]), pad + head_dim


def _rotary_dim(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """rd = cos.shape[-1]; raises ValueError unless it is even, at most x's head_dim, and cos and sin agree."""
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rd = cos.shape[-1] if cos.dim() else 0
    if rd == 0 or rd % 2 or rd > x.shape[-1]:
        raise ValueError(f"the rotary dim cos.shape[-1] = {rd} must be even, > 0 and <= head_dim = {x.shape[-1]}")
    return rd


def _layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int):
    """(x as [A, ROWS_B, H, D] dims order, its sizes (A, ROWS_B, H), cos / sin expanded to x's lead)."""
    if x.dim() < 2 or x.dim() > 4:
        raise ValueError(f"q and k must be 2-D to 4-D [..., heads, ..., head_dim], got shape {tuple(x.shape)}")
    cos_e, head = _unsqueezed(cos, x, unsqueeze_dim)
    sin_e, _ = _unsqueezed(sin, x, unsqueeze_dim)
    others = [d for d in range(x.dim() - 1) if d != head]
    # Pad to two row dims (A, ROWS_B): a missing one has size 1 and is never indexed.
    order = [-1] * (2 - len(others)) + others + [head]
    sizes = [x.shape[d] if d >= 0 else 1 for d in order]
    return order, sizes, cos_e, sin_e


def _row_strides(t: torch.Tensor, order: list[int]) -> list[int]:
    return [(t.stride(d) if t.shape[d] > 1 else 0) if d >= 0 else 0 for d in order[:3]] + [t.stride(-1)]


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("q / k", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name} must be a float64, float32, float16 or bfloat16 tensor")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 at import), got {x.device}")
    if len({x.device, cos.device, sin.device}) > 1:
        raise ValueError(f"q / k, cos and sin must be on one device, got {x.device}, {cos.device}, {sin.device}")


# -- launchers ----------------------------------------------------------------------------------


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison it to prove full coverage).

    x's strides where they are dense (the incoming gradient's layout, usually the forward's q), else contiguous.
    """
    return torch.empty_like(x)


def _tiles(half: int, hq: int, hk: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_HALF, BLOCK_HQ, BLOCK_HK, head blocks, num_warps) for the given rotary half and head counts."""
    block_half = triton.next_power_of_2(half)
    heads_cap = max(1, _MAX_HALF_TILE // block_half)
    block_hq = min(triton.next_power_of_2(hq), heads_cap)
    head_blocks = triton.cdiv(hq, block_hq)
    # k's block covers its heads in as many programs as q's (GQA: 8 kv heads beside 32 q heads).
    block_hk = min(triton.next_power_of_2(triton.cdiv(max(hk, 1), head_blocks)), heads_cap)
    head_blocks = max(head_blocks, triton.cdiv(hk, block_hk))
    # Warps for the larger tile (q's): 16 elements per thread there, 128-bit accesses for bf16.
    elements = max(block_hq, block_hk) * block_half
    num_warps = min(8, max(1, triton.next_power_of_2(elements // (32 * _ELEMENTS_PER_THREAD))))
    return block_half, block_hq, block_hk, head_blocks, num_warps


def _launch(pairs: list[tuple[torch.Tensor, torch.Tensor]], cos, sin, unsqueeze_dim: int, inverse: bool) -> None:
    """Rotate each (source, destination) pair; two pairs share one launch when their rows agree."""
    src0 = pairs[0][0]
    rd = _rotary_dim(src0, cos, sin)
    layouts = [_layout(src, cos, sin, unsqueeze_dim) for src, _ in pairs]
    if len(pairs) == 2 and (layouts[0][1][:2] != layouts[1][1][:2] or pairs[0][0].shape[-1] != pairs[1][0].shape[-1]):
        for pair in pairs:  # q and k rows differ (never in HF): one launch each
            _launch([pair], cos, sin, unsqueeze_dim, inverse)
        return
    order_q, (rows_a, rows_b, hq), cos_e, sin_e = layouts[0]
    (q_in, q_out), (k_in, k_out) = pairs[0], pairs[-1]
    order_k = layouts[-1][0]
    hk = layouts[-1][1][2] if len(pairs) == 2 else 0
    if rows_a * rows_b * max(hq, hk) == 0:
        return
    half, d = rd // 2, src0.shape[-1]
    copy_pass = rd < d and any(src is not dst for src, dst in pairs)
    block_half, block_hq, block_hk, head_blocks, num_warps = _tiles(half, hq, hk)
    block_pass = min(triton.next_power_of_2(max(d - rd, 1)), _MAX_BLOCK_PASS)
    fp64 = src0.dtype == torch.float64
    cos_strides = _row_strides(cos_e, order_q)
    sin_strides = _row_strides(sin_e, order_q)
    # Grid: one program per (batch, position) row of cos (dim 0, up to 2^31 rows) x head blocks (dim 1).
    # cos / sin go in as given (the expanded views only supplied their strides).
    _rope_kernel[(rows_a * rows_b, head_blocks)](
        q_in, q_out, k_in, k_out, cos, sin,
        rows_b, hq, hk, half, d - rd,
        *_row_strides(q_in, order_q), *_row_strides(q_out, order_q),
        *_row_strides(k_in, order_k), *_row_strides(k_out, order_k),
        cos_strides[0], cos_strides[1], cos_strides[3], sin_strides[0], sin_strides[1], sin_strides[3],
        HAS_K=len(pairs) == 2, INVERSE=inverse, COPY_PASS=copy_pass, FP64=fp64,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        # fp32 / fp64: no contracted multiply-adds, so each product rounds as in HF's expression (bit parity).
        num_warps=num_warps, enable_fp_fusion=src0.dtype not in (torch.float32, torch.float64),
    )  # fmt: skip


def rope_rotate_(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    inverse: bool = False,
) -> None:
    """Rotate q (and k) in place: HF's ``apply_rotary_pos_emb`` written into its inputs, one launch for both.

    Args:
        q, k: [B, H, S, D] (``unsqueeze_dim=1``) or [B, S, H, D] (``unsqueeze_dim=2``), any strides,
            one dtype (fp64, fp32, fp16, bf16); k may have fewer heads (GQA) or be None.
        cos, sin: [B or 1, S, rd] in any of those dtypes, any strides; rd even and <= D (features
            rd.. pass through unchanged: Phi-3's partial rotary).
        inverse: apply the transpose instead (the rotation's backward).
    """
    tensors = [q] if k is None else [q, k]
    for t in tensors:
        _check(t, cos, sin)
    if k is not None and k.dtype != q.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    _launch([(t, t) for t in tensors], cos, sin, unsqueeze_dim, inverse)


def rope_rotate(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rotations of q (and k) into new tensors, one launch for both (see :func:`rope_rotate_`).

    Each output has its input's strides when that is dense, else it is contiguous; pass-through
    features are copied. k's output is None without k.
    """
    tensors = [q] if k is None else [q, k]
    for t in tensors:
        _check(t, cos, sin)
    if k is not None and k.dtype != q.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    outputs = [_empty_like(t) for t in tensors]
    _launch(list(zip(tensors, outputs, strict=True)), cos, sin, unsqueeze_dim, inverse)
    return outputs[0], (outputs[1] if k is not None else None)


# -- the torch reference (the op's torch backend) ------------------------------------------------


def _reference_halves(x, cos, sin, unsqueeze_dim: int, inverse: bool):
    """(o1, o2) of the rotation of x's rotary features, op for op as HF's ``apply_rotary_pos_emb`` rounds them."""
    rd = _rotary_dim(x, cos, sin)
    _layout(x, cos, sin, unsqueeze_dim)  # the kernels' shape checks, so both backends refuse the same inputs
    half = rd // 2
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    x1, x2 = x[..., :half], x[..., half:rd]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if inverse:
        # Autograd's gradient of HF's expression: g·cos + rotate_half's transpose of (g·sin).
        return x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    # HF: (x·cos) + (rotate_half(x)·sin) with rotate_half(x) = cat(-x2, x1); -(x2·s1) is exact.
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


def rope_reference_(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    inverse: bool = False,
) -> None:
    """The torch reference of :func:`rope_rotate_`: HF's values (bit for bit on CPU), written into q and k."""
    for t in (q,) if k is None else (q, k):
        o1, o2 = _reference_halves(t, cos, sin, unsqueeze_dim, inverse)
        half = o1.shape[-1]
        t[..., :half].copy_(o1)
        t[..., half : 2 * half].copy_(o2)


def rope_reference_rotate(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch reference of :func:`rope_rotate`: new tensors (their inputs' strides where dense), HF's roundings."""
    outputs = []
    for t in (q,) if k is None else (q, k):
        o1, o2 = _reference_halves(t, cos, sin, unsqueeze_dim, inverse)
        half = o1.shape[-1]
        out = _empty_like(t)
        out[..., :half].copy_(o1)
        out[..., half : 2 * half].copy_(o2)
        out[..., 2 * half :].copy_(t[..., 2 * half :])
        outputs.append(out)
    return outputs[0], (outputs[1] if k is not None else None)
