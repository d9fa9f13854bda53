"""Device memory through the step: live storages, the peak and where it happened, bytes saved for backward.

A storage is live while anything but this tracker holds it. The tracker keeps one reference to
every device storage it has seen and asks ``torch._C._storage_Use_Count`` whether anyone else
still does (a view, a saved tensor, a ``.grad``); fake tensors have real (meta) storages, so this
counts exactly what the caching allocator would hold, without weakrefs (a storage's Python object
can die while the storage lives on in a saved tensor). Freed storages are swept before each
allocation, so the live total at an allocation is exact, and the peak can only occur at one.

An op's internal scratch (peft_fast's scratch dequantization at M >= 2048, bitsandbytes' dequantized
weight, FlashAttention's fp32 dQ accumulator) is live only while the op runs: it is added to the
live total at that op and never kept. Host (CPU) tensors never count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["DeviceMemory", "SavedBytes", "is_device_tensor", "on_device", "storage_key"]


def on_device(device_type: str = "cuda"):
    """The predicate "a tensor on ``device_type``" (a fake tensor by its fake device): what counts as device
    bytes and memory. "cuda" for the model; "cpu" lets the checks price real CPU tensors the same way."""

    def is_device(t: object) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        device = t.fake_device if isinstance(t, FakeTensor) else t.device
        return device.type == device_type

    return is_device


is_device_tensor = on_device("cuda")


def storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (views of one storage share it)."""
    return t.untyped_storage()._cdata


class DeviceMemory:
    """Live device bytes, by storage; the peak, the op it happened at and its breakdown."""

    def __init__(self) -> None:
        self.static: dict[int, int] = {}  # alive when the step began: parameters, buffers, inputs
        self._dynamic: dict[int, tuple[torch.UntypedStorage, int]] = {}
        self.static_bytes = 0
        self.dynamic_bytes = 0
        self.peak_bytes = 0
        self.peak_at = ""
        self.peak_scratch = 0
        self.peak_static = 0
        self.allocated_total = 0  # every byte ever allocated in the step (scratch excluded)

    @property
    def live_bytes(self) -> int:
        return self.static_bytes + self.dynamic_bytes

    def add_static(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages alive before the step; they are kept for the whole step (the model holds them)."""
        for t in tensors:
            key = storage_key(t)
            if key not in self.static:
                self.static[key] = t.untyped_storage().nbytes()
                self.static_bytes += self.static[key]
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.peak_static = self.static_bytes

    def sweep(self) -> None:
        """Forget the storages only this tracker still holds (their last tensor died)."""
        dead = [key for key, (storage, _) in self._dynamic.items() if torch._C._storage_Use_Count(storage._cdata) <= 1]
        for key in dead:
            self.dynamic_bytes -= self._dynamic.pop(key)[1]

    def allocate(self, tensors: Iterable[torch.Tensor]) -> int:
        """Take note of the storages of ``tensors`` not seen before; returns the bytes newly allocated."""
        fresh = []
        for t in tensors:
            key = storage_key(t)
            if key not in self.static and key not in self._dynamic:
                fresh.append((key, t.untyped_storage()))
        if not fresh:
            return 0
        self.sweep()
        added = 0
        for key, storage in fresh:
            if key not in self._dynamic:
                nbytes = storage.nbytes()
                self._dynamic[key] = (storage, nbytes)
                added += nbytes
        self.dynamic_bytes += added
        self.allocated_total += added
        return added

    def free(self, tensors: Iterable[torch.Tensor]) -> None:
        """Stop tracking ``tensors``' storages at once (the tracker's own references dropped), then sweep."""
        for t in tensors:
            entry = self._dynamic.pop(storage_key(t), None)
            if entry is not None:
                self.dynamic_bytes -= entry[1]

    def observe(self, scratch: int, where: Callable[[], str], force: bool = False) -> int:
        """The live bytes at an op (with its transient ``scratch``); updates the peak. Returns them."""
        if scratch and not force:
            self.sweep()
        live = self.live_bytes + scratch
        if live > self.peak_bytes:
            self.peak_bytes, self.peak_at, self.peak_scratch = live, where(), scratch
        return live

    def holds(self, t: torch.Tensor) -> bool:
        key = storage_key(t)
        return key in self._dynamic or key in self.static


class SavedBytes:
    """Bytes of the distinct device storages autograd saves in the forward pass (model state excluded)."""

    def __init__(self, memory: DeviceMemory, is_device=is_device_tensor) -> None:
        self.memory, self.is_device = memory, is_device
        self.storages: dict[int, int] = {}
        self.tensors = 0

    def pack(self, tensor: torch.Tensor, in_forward: bool) -> None:
        if not in_forward or not self.is_device(tensor):
            return
        key = storage_key(tensor)
        if key in self.memory.static:
            return  # a weight: saving it costs no memory
        self.tensors += 1
        self.storages.setdefault(key, tensor.untyped_storage().nbytes())

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())
