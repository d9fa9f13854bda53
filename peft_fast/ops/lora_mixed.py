"""``peft_fast::lora_mixed_batch``: the LoRA term of a mixed-adapter batch (PEFT's ``adapter_names``), one op.

PEFT's mixed batch gives every sample its own adapter (``"__base__"``: none) and computes, for each
adapter in turn, the LoRA term of its sub-batch. Here the layer runs its base GEMM once for the
whole batch, then this op adds every row's term in one gathered pass (a shrink and an expand
kernel, Punica SGMV style: :mod:`peft_fast.kernels.lora_mixed`) over the batch's adapters stacked
and zero-padded to the largest rank (:func:`stack_adapters`, cached per layer by
:class:`AdapterStackCache`).

Inference only, as in PEFT (which refuses mixed batches in training mode): the op has a fake
implementation but no autograd formula, and :func:`lora_mixed_batch` refuses inputs that would need
a gradient (the layers then take their differentiable torch path).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peft_fast.ops._common import FLOAT_DTYPES, no_autocast, uses_kernels

__all__ = ["AdapterStack", "AdapterStackCache", "group_rows", "lora_mixed_batch", "stack_adapters"]


def _kernels():
    from peft_fast.kernels import lora_mixed

    return lora_mixed


@torch.library.custom_op("peft_fast::lora_mixed_batch", mutates_args=("y",))
def _lora_mixed_op(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    seg_start: torch.Tensor,
    seg_slot: torch.Tensor,
    max_rows: int,
) -> None:
    kernels = _kernels()
    groups = kernels.RowGroups(rows, seg_start, seg_slot, max_rows, x.shape[0])
    with no_autocast(x.device):
        if uses_kernels(x):
            kernels.lora_mixed_forward(y, x, lora_a, lora_b, scales, bias, groups)
        else:
            kernels.lora_mixed_reference_forward(y, x, lora_a, lora_b, scales, bias, groups)


@_lora_mixed_op.register_fake
def _(y, x, lora_a, lora_b, scales, bias, rows, seg_start, seg_slot, max_rows):
    return None


# -- the row grouping, cached per batch composition ---------------------------------------------------


@functools.lru_cache(maxsize=64)
def _grouping(slots: tuple[int, ...], rows_per_sample: int, device: torch.device):
    return _kernels().group_rows(slots, rows_per_sample, device)


def group_rows(slots: Sequence[int], rows_per_sample: int, device: torch.device | str):
    """The rows of a batch grouped by adapter slot (``kernels.lora_mixed.RowGroups``), sample i having ``slots[i]``.

    -1 is a row without a LoRA term. Cached by (slots, rows per sample, device): every layer of a
    forward, and every decoding step of ``generate``, shares one grouping (one host-to-device copy).
    """
    return _grouping(tuple(int(s) for s in slots), int(rows_per_sample), torch.device(device))


# -- the batch's adapters, stacked --------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterStack:
    """A [L, R, K], B [L, N, R] (zero-padded to the largest rank R), scales [L] fp32, lora_bias [L, N] or None."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None


def stack_adapters(
    adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]], dtype: torch.dtype
) -> AdapterStack:
    """Stack (A [r, K], B [N, r], scale, B's bias [N] or None) per adapter, in ``dtype``, ranks zero-padded."""
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter")
    k, n = adapters[0][0].shape[1], adapters[0][1].shape[0]
    rank = max(a.shape[0] for a, _, _, _ in adapters)
    device = adapters[0][0].device
    with torch.no_grad():
        lora_a = torch.zeros((len(adapters), rank, k), dtype=dtype, device=device)
        lora_b = torch.zeros((len(adapters), n, rank), dtype=dtype, device=device)
        has_bias = any(b is not None for _, _, _, b in adapters)
        bias = torch.zeros((len(adapters), n), dtype=dtype, device=device) if has_bias else None
        for slot, (a, b, _, b_bias) in enumerate(adapters):
            if a.shape[1] != k or b.shape[0] != n or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter {slot}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit [r, {k}] / "
                                 f"[{n}, r]")  # fmt: skip
            lora_a[slot, : a.shape[0]] = a.detach()
            lora_b[slot, :, : b.shape[1]] = b.detach()
            if b_bias is not None:
                bias[slot] = b_bias.detach()
    scales = torch.tensor([float(s) for _, _, s, _ in adapters], dtype=torch.float32, device=device)
    return AdapterStack(lora_a, lora_b, scales, bias)


def _version_key(t: torch.Tensor | None) -> tuple:
    return () if t is None else (t._version, t.data_ptr(), t.dtype, tuple(t.shape))


class AdapterStackCache:
    """The stack of one layer's adapters in the last mixed batch, kept while it stays valid.

    Valid while the batch's adapters (names, order), their A / B / bias tensors (storage and
    in-place version: an optimizer step, ``load_state_dict`` or a reassignment invalidates), their
    scales and the compute dtype are unchanged. ``generate`` reuses it at every decoding step; a
    batch with other adapters rebuilds it (one read and write of those adapters' weights, about
    what the kernels read anyway). It holds one extra copy of the batch's adapters in the compute
    dtype per layer; :meth:`clear` drops it.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._stack: AdapterStack | None = None

    def get(
        self,
        adapters: Sequence[tuple[str, torch.Tensor, torch.Tensor, float, torch.Tensor | None]],
        dtype: torch.dtype,
    ) -> AdapterStack:
        """The stack of ``adapters`` (name, A, B, scale, B's bias or None) in ``dtype``, rebuilt only when stale."""
        key = (dtype, *((name, _version_key(a), _version_key(b), float(s), _version_key(bb))
                        for name, a, b, s, bb in adapters))  # fmt: skip
        if self._key != key or self._stack is None:
            self._stack = stack_adapters([(a, b, s, bb) for _, a, b, s, bb in adapters], dtype)
            self._key = key
        return self._stack

    def clear(self) -> None:
        self._key = self._stack = None

    def __getstate__(self) -> dict:  # a pickled / deep-copied layer rebuilds its stack
        return {"_key": None, "_stack": None}

    def __deepcopy__(self, memo) -> AdapterStackCache:
        return AdapterStackCache()


# -- the public op ------------------------------------------------------------------------------------


def lora_mixed_batch(y: torch.Tensor, x: torch.Tensor, stack: AdapterStack, groups) -> torch.Tensor:
    """``Y[m] += s[a(m)]·(X[m]·A[a(m)]ᵀ·B[a(m)]ᵀ + b[a(m)])`` in place for every grouped row; returns ``y``.

    Args:
        y: the base output [..., N] (contiguous), in x's dtype; rows outside ``groups`` are untouched.
        x: the activations [..., K] (fp32 / fp16 / bf16; fp64 runs the torch reference).
        stack: the batch's adapters from :func:`stack_adapters`, in x's dtype.
        groups: :func:`group_rows` of the flattened rows (M = x.numel() / K).

    Inference only: refused when autograd would record (grad mode on and an input requiring grad).
    """
    for name, t in (("y", y), ("x", x), ("lora_a", stack.lora_a), ("lora_b", stack.lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.dim() < 1 or y.dim() != x.dim() or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y {tuple(y.shape)} and x {tuple(x.shape)} must share their leading dimensions")
    n_adapters, rank, k = stack.lora_a.shape
    n = y.shape[-1]
    if x.shape[-1] != k or tuple(stack.lora_b.shape) != (n_adapters, n, rank):
        raise ValueError(f"A {tuple(stack.lora_a.shape)} / B {tuple(stack.lora_b.shape)} do not fit x "
                         f"{tuple(x.shape)} and y {tuple(y.shape)}")  # fmt: skip
    if tuple(stack.scales.shape) != (n_adapters,) or stack.scales.dtype != torch.float32:
        raise ValueError(f"scales must be fp32 [{n_adapters}], got {stack.scales.dtype} {tuple(stack.scales.shape)}")
    if stack.bias is not None and tuple(stack.bias.shape) != (n_adapters, n):
        raise ValueError(f"the lora_bias stack must be [{n_adapters}, {n}], got {tuple(stack.bias.shape)}")
    tensors = [y, stack.lora_a, stack.lora_b] + ([] if stack.bias is None else [stack.bias])
    for t in tensors:
        if t.dtype != x.dtype:
            raise TypeError(f"y, A, B and the lora_bias stack must be in x's dtype {x.dtype}, got {t.dtype}")
    for t in (*tensors, stack.scales, groups.rows):
        if t.device != x.device:
            raise ValueError(f"every tensor must be on x's device {x.device}, got one on {t.device}")
    if not y.is_contiguous():
        raise ValueError("y must be contiguous (it is updated in place)")
    m = math.prod(x.shape[:-1])
    if groups.n_rows != m:
        raise ValueError(f"the row grouping is for {groups.n_rows} rows, x has {m}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, *tensors)):
        raise RuntimeError(
            "peft_fast::lora_mixed_batch is inference only (no autograd formula, as PEFT runs mixed batches in "
            "eval mode only): call it under torch.no_grad() / torch.inference_mode()"
        )
    _lora_mixed_op(
        y.view(m, n), x.reshape(m, k).contiguous(), stack.lora_a.contiguous(), stack.lora_b.contiguous(),
        stack.scales, None if stack.bias is None else stack.bias.contiguous(),
        groups.rows, groups.seg_start, groups.seg_slot, groups.max_rows,
    )  # fmt: skip
    return y
