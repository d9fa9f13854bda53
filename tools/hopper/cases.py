"""What one op at one shape is (:class:`OpCase`), its goal, and the inputs its launcher is called with.

An op case's ``run()`` builds its inputs with :func:`fake` / :func:`fake_nf4` and calls the
library's public launcher exactly as the library does. Those two ask the current input source:
by default :class:`MetaInputs`, whose tensors are the fake CUDA tensors of
:func:`tools.hopper.launch_capture.capture` (shapes only, nothing runs); the GPU timing harness
swaps in real tensors with :func:`inputs_from`.

The shared parameters of the report's ops: LoRA rank 16, scale 2.0, dropout 0.1 where it applies,
NF4 with the library's default blocksize and double quantization.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from peft_fast.nf4 import NESTED_BLOCKSIZE, NF4Weight, quantize_nf4

R = 16
SCALE = 2.0
DROPOUT = 0.1
# A seed that is not a multiple of 16 (nor 1): the JIT specialises ints on divisibility by 16,
# which a random seed hits only one time in 16.
SEED = 12345
# The blocksize a weight gets from quantize_nf4 unless told otherwise (bitsandbytes' default, 64).
BLOCKSIZE: int = inspect.signature(quantize_nf4).parameters["blocksize"].default

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASES = ("dense", "nf4", "nf4dq")  # a dense weight, NF4, NF4 with double quantization


@dataclass(frozen=True)
class Goal:
    """An acceptance goal: ``kind`` is "ratio_max", "hbm_fraction_min" or "copy_fraction_min"."""

    kind: str
    target: float

    def met(self, op: dict[str, Any]) -> bool | None:
        """Whether the report's op object meets the goal (None: the op lacks the value)."""
        value = op.get(
            {"ratio_max": "ratio", "hbm_fraction_min": "hbm_fraction", "copy_fraction_min": "copy_fraction"}[self.kind]
        )
        if value is None:
            return None
        return value <= self.target if self.kind == "ratio_max" else value >= self.target

    def describe(self) -> str:
        return {
            "ratio_max": f"ratio ≤ {self.target:.2f}",
            "hbm_fraction_min": f"≥ {self.target:.0%} of HBM bw",
            "copy_fraction_min": f"≥ {self.target:.0%} of copy bw",
        }[self.kind]


@dataclass
class OpCase:
    """One op at one shape, in one dtype, over one kind of base weight."""

    op: str
    M: int
    N: int
    K: int
    r: int
    base: str  # "nf4", "nf4dq" or "dense"
    dropout: float
    run: Callable[[], Any]
    flops: float  # the op's useful FLOPs
    bytes: float  # the fewest bytes the op must move (inputs once, outputs once)
    floor_flops: float | None = None  # FLOPs the floor is stated against, if not ``flops``
    goal: Goal | None = None
    note: str = ""
    dtype: str = "bf16"
    # Bandwidth-bound ops: the fraction of which rate the report states, "hbm" or "copy" (None: neither).
    bandwidth: str | None = None

    @property
    def id(self) -> str:
        """The op's identity in reports and baselines (the ratchet compares ops by it)."""
        return f"{self.op} M={self.M} N={self.N} K={self.K}"


def element_size(dtype: str) -> int:
    """Bytes per element of an activation dtype name ("fp32", "fp16", "bf16")."""
    return DTYPES[dtype].itemsize


def weight_bytes(base: str, n: int, k: int, dtype: str = "bf16", blocksize: int = BLOCKSIZE) -> int:
    """Bytes of an [n, k] base weight: dense in ``dtype``, or NF4 codes plus scales."""
    if base == "dense":
        return element_size(dtype) * n * k
    n_blocks = math.ceil(n * k / blocksize)
    if base == "nf4":  # fp32 absmax per block
        return (n * k + 1) // 2 + 4 * n_blocks
    # uint8 absmax per block, fp32 nested scales and offset
    return (n * k + 1) // 2 + n_blocks + 4 * math.ceil(n_blocks / NESTED_BLOCKSIZE) + 4


# -- the inputs a case's launcher is called with ---------------------------------------------------


class InputSource(Protocol):
    """Where :func:`fake` and :func:`fake_nf4` get their tensors."""

    def tensor(self, *shape: int, dtype: torch.dtype) -> torch.Tensor: ...

    def nf4(self, n: int, k: int, dtype: torch.dtype, blocksize: int, double_quant: bool) -> NF4Weight: ...


class MetaInputs:
    """Uninitialised "cuda" tensors: inside ``launch_capture.capture`` they are shapes on the meta device."""

    def tensor(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="cuda")

    def nf4(self, n: int, k: int, dtype: torch.dtype, blocksize: int, double_quant: bool) -> NF4Weight:
        """An NF4Weight [n, k] with the shapes quantize_nf4 (and bitsandbytes) store."""
        numel = n * k
        n_blocks = math.ceil(numel / blocksize)
        packed = self.tensor((numel + 1) // 2, 1, dtype=torch.uint8)
        absmax = self.tensor(n_blocks, dtype=torch.uint8 if double_quant else torch.float32)
        nested = {}
        if double_quant:
            nested = dict(
                nested_absmax=self.tensor(math.ceil(n_blocks / NESTED_BLOCKSIZE), dtype=torch.float32),
                nested_offset=torch.empty((), dtype=torch.float32, device="cuda"),
            )
        return NF4Weight(
            packed=packed, absmax=absmax, shape=torch.Size((n, k)), dtype=dtype, blocksize=blocksize, **nested
        )


_source: InputSource = MetaInputs()


@contextlib.contextmanager
def inputs_from(source: InputSource) -> Iterator[InputSource]:
    """Cases built inside the block take their tensors from ``source`` (restored after)."""
    global _source
    previous, _source = _source, source
    try:
        yield source
    finally:
        _source = previous


def current_inputs() -> InputSource:
    """The source :func:`fake` and :func:`fake_nf4` use now."""
    return _source


def fake(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A tensor of ``shape`` from the current input source (call inside ``run()``)."""
    return _source.tensor(*shape, dtype=dtype)


def fake_nf4(
    n: int, k: int, dtype: torch.dtype = torch.bfloat16, blocksize: int = BLOCKSIZE, double_quant: bool = True
) -> NF4Weight:
    """An NF4 weight [n, k] from the current input source (call inside ``run()``)."""
    return _source.nf4(n, k, dtype, blocksize, double_quant)


def fake_base(base: str, n: int, k: int, dtype: torch.dtype, blocksize: int = BLOCKSIZE) -> torch.Tensor | NF4Weight:
    """The base weight of kind ``base`` ("dense", "nf4", "nf4dq"), [n, k], for activations of ``dtype``."""
    if base == "dense":
        return fake(n, k, dtype=dtype)
    return fake_nf4(n, k, dtype, blocksize, double_quant=base == "nf4dq")


def _no_cases(dtype: str) -> list[OpCase]:
    return []


@dataclass(frozen=True)
class OpEntry:
    """One op of the toolkit, an entry of ``tools.hopper.ops.REGISTRY``.

    ``report()`` gives its cases at the report's shapes (with floors and goals); ``sweep(dtype)``
    its representative cases in one activation dtype ("fp32", "fp16", "bf16"), which the compile
    sweep captures and compiles in every autotune config (none: the report's kernels only).
    """

    name: str
    report: Callable[[], list[OpCase]]
    sweep: Callable[[str], list[OpCase]] = _no_cases
