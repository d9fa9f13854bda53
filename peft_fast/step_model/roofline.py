"""The roofline of one kernel, and an op call as the cost rules see it (which tensors it reads and writes).

Every kernel takes ``max(FLOPs / 790e12, bytes / 4.3e12)`` seconds: H200 bf16 dense GEMM ~790
TFLOP/s and device copy ~4.3 TB/s read + write, both measured on the device machines. A kernel
moves at least one byte, so no device op is costed at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten

from peft_fast.step_model.memory import storage_key

__all__ = [
    "BF16_FLOPS_PER_S",
    "COPY_BYTES_PER_S",
    "Cost",
    "Kernel",
    "OpCall",
    "kernel_seconds",
    "storage_bytes",
    "tensor_extent",
]

# Ops that write their (first) mutated argument without reading it.
_WRITE_ONLY = {
    "aten.copy_", "aten.fill_", "aten.zero_", "aten.uniform_", "aten.normal_", "aten.random_", "aten.bernoulli_",
    "aten.exponential_", "aten.geometric_", "aten.cauchy_", "aten.log_normal_", "aten.index_put_",
}  # fmt: skip
BF16_FLOPS_PER_S = 790e12  # H200 bf16 dense GEMM, measured on the device machines
COPY_BYTES_PER_S = 4.3e12  # H200 device-to-device copy, read + write, measured likewise


def kernel_seconds(flops: float, nbytes: float) -> float:
    """The roofline time of one kernel."""
    return max(flops / BF16_FLOPS_PER_S, max(nbytes, 1.0) / COPY_BYTES_PER_S)


@dataclass
class Kernel:
    """One launch of an op: a label, its FLOPs and device bytes."""

    label: str
    flops: float
    bytes: float

    @property
    def seconds(self) -> float:
        return kernel_seconds(self.flops, self.bytes)


@dataclass
class Cost:
    """An op's kernels (empty for a view or host op), the rule that priced it and its transient scratch bytes."""

    rule: str
    kernel_list: list[Kernel] = field(default_factory=list)
    scratch_bytes: int = 0

    @property
    def device(self) -> bool:
        return bool(self.kernel_list)

    @property
    def kernels(self) -> int:
        return len(self.kernel_list)

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernel_list)

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.kernel_list)

    @property
    def seconds(self) -> float:
        return sum(k.seconds for k in self.kernel_list)


def tensor_extent(t: torch.Tensor) -> int:
    """Bytes a tensor spans in its storage (an expanded tensor spans its real elements only)."""
    if t.numel() == 0:
        return 0
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
    return span * t.element_size()


class OpCall:
    """One dispatched op: its function, arguments and outputs, with the device tensors each side."""

    def __init__(self, func, args: tuple, kwargs: dict, out, is_device: Callable[[object], bool]) -> None:
        self.func, self.args, self.kwargs, self.out, self.is_device = func, args, kwargs, out, is_device
        schema = func._schema
        self.name = schema.name.replace("::", ".")
        self.namespace = self.name.split(".", 1)[0]
        self._written_args: list[torch.Tensor] = []
        self._read_args: list[torch.Tensor] = []
        bound = dict(zip((a.name for a in schema.arguments[: len(args)]), args, strict=True))
        bound.update(kwargs)
        self.bound = bound
        for argument in schema.arguments:
            value = bound.get(argument.name)
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            writes = argument.alias_info is not None and argument.alias_info.is_write
            (self._written_args if writes else self._read_args).extend(tensors)
            if writes and argument.name != "out" and not argument.kwarg_only and self.name not in _WRITE_ONLY:
                self._read_args.extend(tensors)  # add_, mul_: the mutated tensor is read too

    def arg(self, name: str, default=None):
        return self.bound.get(name, default)

    def output_tensors(self) -> list[torch.Tensor]:
        """Device tensors the op returns or writes (what it may allocate)."""
        outs = [t for t in tree_flatten(self.out)[0] if isinstance(t, torch.Tensor)] + self._written_args
        return [t for t in outs if self.is_device(t)]

    def read_tensors(self) -> list[torch.Tensor]:
        return [t for t in self._read_args if self.is_device(t)]

    def returned(self) -> list[torch.Tensor]:
        return [t for t in tree_flatten(self.out)[0] if isinstance(t, torch.Tensor)]

    def is_view(self) -> bool:
        outs = self.returned()
        if not outs or self._written_args:
            return False
        ins = {storage_key(t) for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, torch.Tensor)}
        return all(storage_key(t) in ins for t in outs)

    def touches_device(self) -> bool:
        return bool(self.output_tensors() or self.read_tensors())

    def read_bytes(self) -> int:
        return storage_bytes(self.read_tensors())

    def write_bytes(self) -> int:
        return storage_bytes(self.output_tensors())


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each distinct storage once: the tensors' extents, at most the storage's size."""
    per_storage: dict[int, tuple[int, set]] = {}
    for t in tensors:
        key = storage_key(t)
        size, seen = per_storage.setdefault(key, (t.untyped_storage().nbytes(), set()))
        seen.add((t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.element_size()))
    total = 0
    for size, seen in per_storage.values():
        spans = 0
        for _, shape, stride, itemsize in seen:
            numel = math.prod(shape)
            if numel:
                spans += (sum((n - 1) * abs(s) for n, s in zip(shape, stride, strict=True)) + 1) * itemsize
        total += min(size, spans)
    return total
