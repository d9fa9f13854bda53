"""Dropout masks from Philox, shared by every kernel that drops: device helpers and a torch replay.

Element ``e = row·cols + col`` of an [rows, cols] tensor is kept iff ``u16(e) >= threshold``,
``threshold = round(p·65536)`` (:func:`dropout_threshold`), where ``u16(e)`` is 16-bit half
``e % 2`` (0 = low) of word ``(e // 2) % 4`` of ``tl.randint4x(seed, e // 8)`` — Philox-4x32-10
with the 64-bit counter ``e // 8`` split into its two low words. One Philox call thus serves
eight elements; ``tl.rand`` per element costs ~63 SASS instructions per element on sm_90, this
~7. Kept values are scaled by 1/(1-p) as in PyTorch; p is resolved to steps of 2**-16 (p = 0.1
drops with probability 0.100006), far below the sampling noise of any training run.

:func:`dropout_keep_tile` draws a [BLOCK_M, BLOCK_K] tile with one Philox call per eight
elements (rows start at multiples of 8 elements: cols % 8 == 0, tile columns at multiples of 8);
:func:`dropout_keep` draws any elements, one call each (any shape, any orientation).
:func:`dropout_mask` replays the stream in plain torch, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "check_dropout_args",
    "dropout_keep",
    "dropout_keep_block",
    "dropout_keep_tile",
    "dropout_mask",
    "dropout_threshold",
    "dropout_tiled",
    "philox4x32",
]

_MAX_SEED = 2**63
_U16_STEPS = 65536


def dropout_threshold(p: float) -> int:
    """The 16-bit keep threshold of dropout probability ``p`` in [0, 1): round(p·65536), < 65536."""
    return min(round(float(p) * _U16_STEPS), _U16_STEPS - 1)


@triton.jit
def _u16_of(c0, c1, c2, c3, e):
    """16-bit random number of element ``e`` from the four Philox words of counter e // 8."""
    word_index = (e >> 1) & 3
    word = tl.where(word_index == 0, c0, tl.where(word_index == 1, c1, tl.where(word_index == 2, c2, c3)))
    return tl.where((e & 1) == 0, word & 0xFFFF, word >> 16).to(tl.int32)


@triton.jit
def dropout_keep(seed, rows, cols, n_cols, threshold):
    """True where element (row, col) of an [*, n_cols] tensor survives; any index tiles (int64 rows)."""
    e = rows * n_cols + cols
    c0, c1, c2, c3 = tl.randint4x(seed, e >> 3)
    return _u16_of(c0, c1, c2, c3, e) >= threshold


@triton.jit
def dropout_keep_tile(seed, rows, col0, n_cols, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask of the [BLOCK_M, BLOCK_K] tile at int64 ``rows`` [BLOCK_M, 1] x columns col0 + [0, BLOCK_K).

    Needs n_cols % 8 == 0 and col0 % 8 == 0, so each Philox call covers 8 elements of one row.
    """
    counters = (rows * n_cols + col0) // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
    c0, c1, c2, c3 = tl.randint4x(seed, counters)
    # join adds a last axis: [q, x, y] holds (c0, c2 | c1, c3)[y][x] = word 2x + y, at 4q + 2x + y.
    words = tl.join(tl.join(c0, c2), tl.join(c1, c3)).reshape(BLOCK_M, BLOCK_K // 2)
    # Low half first: element 8q + 2w + h takes half h of word w.
    halves = tl.join(words & 0xFFFF, words >> 16).reshape(BLOCK_M, BLOCK_K)
    return halves.to(tl.int32) >= threshold


@triton.jit
def dropout_keep_block(
    seed, rows, col0, n_cols, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr
):
    """:func:`dropout_keep_tile` when TILED (see :func:`dropout_tiled`), else element by element."""
    if TILED:
        return dropout_keep_tile(seed, rows, col0, n_cols, threshold, BLOCK_M, BLOCK_K)
    else:
        return dropout_keep(seed, rows, col0 + tl.arange(0, BLOCK_K)[None, :], n_cols, threshold)


def dropout_tiled(n_cols: int) -> bool:
    """Whether tiles of an [*, n_cols] tensor may draw 8 elements per Philox call (rows 8-aligned)."""
    return n_cols % 8 == 0


# -- torch replay -----------------------------------------------------------------------------

# Philox-4x32 constants (the same as triton.language.random).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_U32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product a·b of 32-bit unsigned values held in int64.

    a is split into 16-bit halves so no intermediate leaves the int64 range.
    """
    low_part = b * (a & 0xFFFF)
    high_part = b * (a >> 16)
    middle = high_part + (low_part >> 16)
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox4x32(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, counters)`` for int64 counters, bit for bit: four int64 tensors in [0, 2**32)."""
    c0, c1 = counters & _U32, counters >> 32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _U32, (k1 + _KEY_B) & _U32
    return c0, c1, c2, c3


def check_dropout_args(p, seed) -> None:
    """Raise ValueError/TypeError unless p is a number in [0, 1) and seed an int in [0, 2**63)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def dropout_mask(seed: int, m: int, k: int, p: float, device: torch.device | str) -> torch.Tensor:
    """bool [m, k], True = kept: the exact mask the kernels use (for tests / seed replay).

    Plain torch, so it runs on any device; a few int64 temporaries per eight elements.
    """
    check_dropout_args(p, seed)
    n = m * k
    counters = torch.arange((n + 7) // 8, dtype=torch.int64, device=device)
    words = philox4x32(seed, counters)
    halves = torch.stack([h for w in words for h in (w & 0xFFFF, w >> 16)], dim=1).reshape(-1)[:n]
    return (halves >= dropout_threshold(p)).reshape(m, k)
