"""Record the kernel launches a launcher function makes, without a GPU and without running anything.

Inside :func:`capture`:

* ``torch.empty(..., device="cuda")`` and friends make **meta** tensors (shapes and dtypes, no
  storage) wrapped in :class:`FakeCudaTensor`, whose ``.device`` says ``cuda:0``, so launchers'
  device checks pass and their ``device.type == "cuda"`` branches run; every torch op on them
  runs on the meta device (shape inference only).
* ``torch.cuda.get_device_properties`` / ``get_device_capability`` describe an H200 (132 SMs, sm_90).
* ``JITFunction.run`` records (kernel, spec as the JIT would specialise it for sm_90, bound
  arguments, grid) instead of launching; ``Autotuner.run`` records one launch whose candidates
  are every config left after the autotuner's own pruning (``prune_configs``: early_config_prune
  and perf_model), each specialised with that config's constexprs and options.
* A ``TorchDispatchMode`` records the aten ops the launcher itself runs on device tensors
  (matmuls, casts, sums, copies) as library-call launches with their FLOPs and bytes; views,
  allocations and metadata queries launch nothing and are not recorded.

Launchers are called twice and the second call is kept: the first fills caches that a real
process fills once (codebooks copied to the device, SM counts), as the autotuner's cache would be.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from tools.hopper import sm90

CUDA = torch.device("cuda", 0)
META = torch.device("meta")

# An H200's properties, as torch.cuda.get_device_properties would report them.
H200_PROPERTIES = SimpleNamespace(
    name="NVIDIA H200",
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=141 * 2**30,
    max_threads_per_multi_processor=2048,
    shared_memory_per_block_optin=227 * 1024,
    L2_cache_size=50 * 2**20,
    warp_size=32,
    regs_per_multiprocessor=65536,
)


class FakeCudaTensor(torch.Tensor):
    """A meta tensor that reports ``cuda:0`` as its device (to Python code only)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "cuda":
        return META
    if isinstance(value, str) and value.startswith("cuda"):
        return "meta"
    return value


def _wrap(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, FakeCudaTensor) and value.is_meta:
        return value.as_subclass(FakeCudaTensor)
    return value


def _unwrap(value: Any) -> Any:
    return value.as_subclass(torch.Tensor) if isinstance(value, FakeCudaTensor) else value


class _FakeCudaMode(TorchFunctionMode):
    """Sends "cuda" to the meta device and hands meta results back as FakeCudaTensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs or {}))
        return tree_map(_wrap, out)


# -- what is recorded ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """A tensor argument: enough to count the bytes a launch moves."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    storage: int  # identity of the underlying storage (views of one buffer count once)

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorInfo:
        plain = _unwrap(t)
        return cls(
            tuple(plain.shape),
            str(plain.dtype).removeprefix("torch."),
            plain.numel() * plain.element_size(),
            plain.untyped_storage()._cdata,
        )


@dataclass
class Candidate:
    """One way a Triton launch may run: a spec (one autotune config) and its grid."""

    spec: sm90.KernelSpec
    grid: tuple[int, int, int]
    args: dict[str, Any]  # bound arguments; tensors as TensorInfo
    config: dict[str, Any] | None  # the autotune config's kwargs and options (None: not autotuned)


@dataclass
class Launch:
    """A kernel launch (``kind == "triton"``) or a library call the launcher makes (``"library"``)."""

    kind: str
    kernel: str  # "module:attribute" or e.g. "torch.mm"
    candidates: list[Candidate] = field(default_factory=list)
    flops: float = 0.0  # library calls
    bytes: int = 0  # library calls
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # library calls: operand shapes

    def tensor_bytes(self, candidate: Candidate) -> int:
        """Bytes a Triton launch moves at least: each distinct storage among its tensor args once."""
        sizes: dict[int, int] = {}
        for value in candidate.args.values():
            if isinstance(value, TensorInfo):
                sizes[value.storage] = max(sizes.get(value.storage, 0), value.nbytes)
        return sum(sizes.values())


class Recorder:
    """Collects launches while :func:`capture` is active."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.enabled = True
        self._autotune: list[list[Candidate]] = []  # candidates of the autotuned launch being recorded

    def add(self, launch: Launch) -> None:
        if self.enabled:
            self.launches.append(launch)


_RECORDER: Recorder | None = None


def _stub(value: Any) -> Any:
    """Tensors -> pointer stubs for the JIT's specializer (also inside tensor descriptors)."""
    if isinstance(value, torch.Tensor):
        return sm90.pointer_stub(_unwrap(value))
    base = getattr(value, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(value, "block_shape"):
        import dataclasses

        return (
            dataclasses.replace(value, base=sm90.pointer_stub(_unwrap(base)))
            if dataclasses.is_dataclass(value)
            else value
        )
    return value


def _info(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo.of(value)
    base = getattr(value, "base", None)
    if isinstance(base, torch.Tensor):
        return TensorInfo.of(base)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _grid(grid: Any, bound: dict[str, Any]) -> tuple[int, int, int]:
    grid = grid(bound) if callable(grid) else grid
    grid = tuple(int(g) for g in grid)
    return (*grid, 1, 1)[:3]


def _jit_run(self, *args, grid, warmup, **kwargs):
    """Replacement for JITFunction.run: record, never compile or launch."""
    recorder = _RECORDER
    assert recorder is not None
    stub_args = tuple(_stub(a) for a in args)
    stub_kwargs = {k: _stub(v) for k, v in kwargs.items()}
    spec, bound = sm90.specialize_launch(self, stub_args, stub_kwargs)
    real = dict(zip(self.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
    infos = {name: _info(real.get(name, value)) for name, value in bound.items()}
    candidate = Candidate(spec, _grid(grid, bound), infos, None)
    if recorder._autotune:
        recorder._autotune[-1].append(candidate)
    else:
        recorder.add(Launch("triton", spec.kernel, [candidate]))
    return None


def _autotuner_run(self, *args, **kwargs):
    """Replacement for Autotuner.run: one launch, one candidate per config the autotuner would time."""
    recorder = _RECORDER
    assert recorder is not None
    self.nargs = dict(zip(self.arg_names, args, strict=False))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else list(self.configs)
    recorder._autotune.append([])
    try:
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
            recorder._autotune[-1][-1].config = config.all_kwargs()
    finally:
        candidates = recorder._autotune.pop()
        self.nargs = None
    recorder.add(Launch("triton", sm90.kernel_name(self), candidates))
    return None


# aten ops that launch no kernel: allocation, views, metadata.
_NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "lift_fresh_copy",
    "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "resize_", "set_", "detach", "alias", "_reshape_alias", "_unsafe_view", "view", "as_strided", "t",
    "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze", "unfold", "split", "unbind",
    "split_with_sizes", "chunk", "narrow", "diagonal", "view_as_real", "view_as_complex", "_conj", "_neg_view",
    "dim", "size", "stride", "numel", "is_contiguous", "result_type",
}  # fmt: skip
_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm"}
# In-place ops that only write their first argument; every other in-place op reads it too.
_WRITE_ONLY_IN_PLACE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}


def _in_place_read_bytes(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes of the destination an in-place op reads before writing it (``addmm_`` with beta = 1: C).

    The storage table counts each storage once, which is a write for the destination of an
    in-place op; its read is this second pass (beta = 0 reads nothing).
    """
    if not name.endswith("_") or name in _WRITE_ONLY_IN_PLACE or not args or not isinstance(args[0], torch.Tensor):
        return 0
    if name in ("addmm_", "baddbmm_", "addbmm_") and kwargs.get("beta", 1) == 0:
        return 0
    destination = args[0]
    return destination.numel() * destination.element_size() if destination.is_meta else 0


def _flops(name: str, args: tuple, out: Any) -> float:
    """FLOPs of a matmul-like aten op (2 per multiply-add); 0 for the rest (they are byte-bound)."""
    if name.rstrip("_") not in _MATMULS:  # addmm_ is addmm in place
        return 0.0
    mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
    a, b = mats[-2], mats[-1]
    batch = math.prod(a.shape[:-2]) if a.dim() > 2 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class _LibraryCallMode(TorchDispatchMode):
    """Records aten ops on device (meta) tensors as library-call launches."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args, kwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        tensors_in = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if isinstance(out, (tuple, list)):
            tensors_out = [t for t in out if isinstance(t, torch.Tensor)]
        else:
            tensors_out = [out] if isinstance(out, torch.Tensor) else []
        on_device = any(t.is_meta for t in tensors_in + tensors_out)
        host_copy = (
            any(not t.is_meta for t in tensors_in)
            and all(t.is_meta for t in tensors_out)
            and name
            in (
                "_to_copy",
                "copy_",
                "lift_fresh_copy",
            )
        )
        if _RECORDER is not None and on_device and not host_copy and name not in _NO_KERNEL and not func.is_view:
            sizes: dict[int, int] = {}
            for t in tensors_in + tensors_out:
                if t.is_meta:
                    key = t.untyped_storage()._cdata
                    sizes[key] = max(sizes.get(key, 0), t.numel() * t.element_size())
            _RECORDER.add(
                Launch(
                    "library",
                    f"torch.{name}",
                    flops=_flops(name, args, out),
                    bytes=sum(sizes.values()) + _in_place_read_bytes(name, args, kwargs),
                    shapes=[tuple(t.shape) for t in tensors_in],
                )
            )
        return out


@contextlib.contextmanager
def capture() -> Iterator[Recorder]:
    """Record launches made inside the block (see the module docstring)."""
    global _RECORDER
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    recorder = Recorder()
    previous, _RECORDER = _RECORDER, recorder
    patches = [
        mock.patch.object(JITFunction, "run", _jit_run),
        mock.patch.object(Autotuner, "run", _autotuner_run),
        mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: H200_PROPERTIES),
        mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "device_count", lambda: 1),
        mock.patch.object(torch.cuda, "is_available", lambda: True),
        mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
    ]
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            stack.enter_context(_FakeCudaMode())
            stack.enter_context(_LibraryCallMode())
            yield recorder
    finally:
        _RECORDER = previous


def record(call: Callable[[], Any]) -> list[Launch]:
    """The launches of ``call()`` in steady state: it runs twice inside :func:`capture`, the second is kept.

    ``call`` must build its inputs itself (inside the capture, so they are fake CUDA tensors).
    """
    with capture() as recorder:
        recorder.enabled = False
        call()
        recorder.enabled = True
        call()
    return recorder.launches
