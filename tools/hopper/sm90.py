"""Compile a Triton kernel for an H100/H200 (sm_90) without a GPU, specialised as the JIT would.

The one compile path of the toolkit (the report, its ``--recompile`` check and the compile
sweep): a :class:`KernelSpec` (kernel, argument types, constexpr values, the arguments known to
be divisible by 16, launch options) is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``.

Specs come from :func:`specialize_launch`, which runs the JIT's own binder
(``create_function_from_signature`` with a CUDA backend for sm_90, then ``JITFunction._pack_args``)
on the arguments of a launch recorded by :mod:`tools.hopper.launch_capture`, so types, constexprs
(declared ones, and ints equal to 1, which the JIT turns into constexprs) and ``tt.divisibility``
hints are exactly what Triton would compile at run time, in whichever Triton version is
installed. Tensors are replaced by pointer stubs whose address is 512-byte aligned plus the
view's offset: PyTorch's caching allocator hands out 512-byte aligned blocks, so every whole
tensor argument is "divisible by 16".

The SASS and resource usage come from the ``cuobjdump`` Triton ships, run on ``asm["cubin"]``.
TRITON_INTERPRET must be unset before the kernels are imported (the interpreter never compiles).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from tools.hopper import ttir
from tools.hopper.sass import parse_res_usage, summarize

TARGET = GPUTarget("cuda", 90, 32)  # compute capability 9.0, warp size 32
_ALLOCATOR_ALIGNMENT = 512  # bytes: PyTorch's CUDA caching allocator
_STUB_BASE = 1 << 32  # any 512-aligned fake address


@functools.cache
def backend():
    """Triton's CUDA backend for sm_90 (no GPU needed to build it)."""
    return make_backend(TARGET)


def jit_function(kernel: Any) -> JITFunction:
    """The JITFunction under an Autotuner / Heuristics wrapper (each keeps the wrapped one in ``.fn``)."""
    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(f"{kernel!r} is not a Triton kernel")
        fn = fn.fn
    return fn


def kernel_name(kernel: Any) -> str:
    """ "module:attribute" of a kernel, e.g. "peft_fast.kernels.lora_linear:_lora_linear_fwd_kernel"."""
    fn = jit_function(kernel)
    return f"{fn.module}:{fn.fn.__qualname__}"


def resolve(name: str) -> JITFunction:
    """The JITFunction named by :func:`kernel_name`."""
    module, _, attr = name.partition(":")
    return jit_function(getattr(importlib.import_module(module), attr))


# -- specs --------------------------------------------------------------------------------------


@dataclass
class KernelSpec:
    """Everything that selects one binary: what the report stores and what is recompiled from it."""

    kernel: str  # "module:attribute"
    signature: dict[str, str]  # every argument: Triton type ("*bf16", "i32", "fp32") or "constexpr"
    constexprs: dict[str, Any]  # argument name -> value, for every "constexpr" in the signature
    divisible_by_16: list[str]  # arguments with the tt.divisibility = 16 hint
    options: dict[str, Any] = field(default_factory=dict)  # num_warps, num_stages, enable_fp_fusion, ...

    def key(self) -> str:
        """Stable identity for caching compiles (same key = same binary)."""
        return json.dumps(asdict(self), sort_keys=True, default=repr)

    def short_hash(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:10]

    @property
    def num_warps(self) -> int:
        return int(self.options.get("num_warps", 4))

    @property
    def num_stages(self) -> int:
        return int(self.options.get("num_stages", 3))

    @classmethod
    def from_json(cls, obj: dict) -> KernelSpec:
        return cls(
            obj["kernel"],
            dict(obj["signature"]),
            dict(obj["constexprs"]),
            list(obj["divisible_by_16"]),
            dict(obj["options"]),
        )


def _path_name(fn: JITFunction, path: tuple[int, ...]) -> str:
    """A JIT argument path as a name: (3,) -> "K"; a tuple element (3, 1) -> "K/1"."""
    return "/".join([fn.arg_names[path[0]], *(str(p) for p in path[1:])])


def _name_path(fn: JITFunction, name: str) -> tuple[int, ...]:
    head, *rest = name.split("/")
    return (fn.arg_names.index(head), *(int(p) for p in rest))


def _plain(value: Any) -> Any:
    """A constexpr value as JSON can hold it (tl.constexpr wraps the value the JIT saw)."""
    value = getattr(value, "value", value) if type(value).__name__ == "constexpr" else value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr value {value!r} ({type(value).__name__}) cannot be stored in a spec")


class PointerStub:
    """What the JIT's specializer reads of a tensor: its dtype and address (no data)."""

    def __init__(self, dtype: Any, offset_bytes: int = 0) -> None:
        self.dtype = dtype
        self._ptr = _STUB_BASE + offset_bytes

    def data_ptr(self) -> int:
        return self._ptr


def pointer_stub(tensor: Any) -> PointerStub:
    """A stub for ``tensor``: its storage is 512-byte aligned, the view starts at its offset."""
    return PointerStub(tensor.dtype, tensor.storage_offset() * tensor.element_size())


@functools.cache
def _binder(fn: JITFunction):
    return create_function_from_signature(fn.signature, fn.params, backend())


def specialize_launch(kernel: Any, args: tuple, kwargs: dict) -> tuple[KernelSpec, dict[str, Any]]:
    """The spec the JIT would compile for ``kernel[grid](*args, **kwargs)`` on sm_90, and the bound arguments.

    Tensors in ``args``/``kwargs`` must already be :class:`PointerStub` (or anything with
    ``dtype`` and ``data_ptr()``). ``kwargs`` holds constexprs by name and launch options
    (num_warps, num_stages, enable_fp_fusion, ...), as a launch or an autotune config passes them.
    """
    fn = jit_function(kernel)
    bound, specialization, options = _binder(fn)(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend(), dict(kwargs), bound, specialization, options)
    sig_names = set(fn.arg_names)
    launch_options = {k: v for k, v in kwargs.items() if k not in sig_names and v is not None}
    if not launch_options.get("debug", True):
        launch_options.pop("debug")
    divisible = sorted(
        (_path_name(fn, path) for path, value in attrs.items() if ["tt.divisibility", 16] in value),
        key=lambda name: _name_path(fn, name),
    )
    spec = KernelSpec(
        kernel=kernel_name(fn),
        signature=dict(signature),
        constexprs={_path_name(fn, path): _plain(value) for path, value in constexprs.items()},
        divisible_by_16=divisible,
        options=launch_options,
    )
    return spec, dict(bound)


# -- compiling and reading the binary -----------------------------------------------------------


def compile_spec(spec: KernelSpec):
    """``triton.compile`` of ``spec`` for sm_90 (raises what Triton raises)."""
    fn = resolve(spec.kernel)
    hint = backend().parse_attr("D")  # [["tt.divisibility", 16]] in the Triton versions we support
    attrs = {_name_path(fn, name): hint for name in spec.divisible_by_16}
    constexprs = {_name_path(fn, name): value for name, value in spec.constexprs.items()}
    source = ASTSource(fn, dict(spec.signature), constexprs, attrs)
    return triton.compile(source, target=TARGET, options=dict(spec.options))


def jit_compile(kernel: Any, args: dict[str, Any], options: dict[str, Any]):
    """Compile through the JIT itself (``JITFunction.warmup``), as a launch would: the reference
    :func:`specialize_launch` + :func:`compile_spec` are checked against. Tensors in ``args`` must
    be :class:`PointerStub`. The JIT asks the driver for the device and target: a stand-in says sm_90.
    """
    from types import SimpleNamespace
    from unittest import mock

    import triton.runtime.jit as jit

    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device=None: 0,
                             get_current_target=lambda: TARGET)  # fmt: skip
    fn = jit_function(kernel)
    with mock.patch.object(jit, "driver", SimpleNamespace(active=active)):
        fn.device_caches.clear()  # binders built for another target must not be reused
        try:
            return fn.warmup(**args, grid=(1,), **options)
        finally:
            fn.device_caches.clear()


def cuobjdump_path() -> Path:
    """The cuobjdump shipped with Triton's NVIDIA backend."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def ptxas_version() -> str | None:
    """The version of the ptxas Triton assembles sm_90 with (e.g. "12.9.86"), None if it cannot be read.

    Recorded in the report beside Triton's version: the same spec assembled by another ptxas
    gives other SASS, so a report can only be recompiled by the toolchain that wrote it.
    """
    from triton.backends.nvidia.compiler import get_ptxas_version

    try:
        text = get_ptxas_version(TARGET.arch)
    except Exception:  # an internal API: a Triton without it just records no version
        return None
    match = re.search(r"\bV(\d+(?:\.\d+)+)", text if isinstance(text, str) else str(text))
    return match.group(1) if match else None


def cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump <flag>`` (``-sass`` or ``-res-usage``) on a cubin held in memory."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        result = subprocess.run([str(cuobjdump_path()), flag, handle.name], capture_output=True, text=True, check=True)
    return result.stdout


_DOT = re.compile(
    r"tt\.dot\b[^:]*:\s*tensor<(\d+)x(\d+)x[^>]*>\s*\*\s*tensor<(\d+)x(\d+)x[^>]*>\s*->\s*tensor<(\d+)x(\d+)x"
)


def dot_shapes(text: str) -> list[tuple[int, int, int]]:
    """(M, N, K) of every ``tt.dot`` in the TTIR, in source order."""
    return [(int(m.group(5)), int(m.group(6)), int(m.group(2))) for m in _DOT.finditer(text)]


def analyse(spec: KernelSpec, sass_dir: str | None = None) -> dict[str, Any]:
    """Compile ``spec`` and read what the cost model needs; JSON-able, with "error" set on failure.

    Runs in worker processes, so it takes and returns plain data.
    """
    start = time.perf_counter()
    try:
        compiled = compile_spec(spec)
    except Exception as exc:  # a kernel that does not compile is a finding, not a crash of the report
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return {
            "error": f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300],
            "compile_s": time.perf_counter() - start,
        }
    compile_s = time.perf_counter() - start
    cubin = compiled.asm["cubin"]
    sass_text = cuobjdump(cubin, "-sass")
    usage = parse_res_usage(cuobjdump(cubin, "-res-usage"))
    summary = summarize(sass_text, spec.num_warps)
    sass_file = None
    if sass_dir:
        name = spec.kernel.rpartition(":")[2].lstrip("_")
        sass_file = os.path.join(sass_dir, f"{name}-{spec.short_hash()}.sass")
        Path(sass_file).write_text(sass_text)
    return {
        "error": None,
        "compile_s": compile_s,
        "regs": usage["REG"],
        "stack_bytes": usage.get("STACK", 0),
        "local_bytes": usage.get("LOCAL", 0),
        "static_smem": usage.get("SHARED", 0),
        "smem": int(compiled.metadata.shared),
        "num_warps": spec.num_warps,
        "sass": asdict(summary),
        "dots": dot_shapes(compiled.asm.get("ttir", "")),
        "loads": asdict(ttir.summarize(compiled.asm.get("ttir", ""))),
        "ptx_fma": compiled.asm["ptx"].count("fma.rn.f32"),
        "sass_file": os.path.basename(sass_file) if sass_file else None,
    }
