"""Recording one training step op by op on fake CUDA tensors: what an H200 would launch, with no GPU here.

What makes a CPU-only torch build trace the GPU's step:

- **Fake CUDA tensors.** ``FakeTensorMode`` fakes ``device="cuda"`` without CUDA: shapes, dtypes and
  strides only, every op answered by its meta kernel or a custom op's ``register_fake``
  implementation (so peft_fast's and bitsandbytes' ops never run their Triton / CUDA launchers;
  their costs come from rules of their CUDA paths). Python sees ``tensor.device == cuda``
  (autocast, peft_fast's backend choice, bitsandbytes and Hugging Face read that). C++ asks the
  tensor for its device through ``prim.device``; while a step runs :class:`_CppSeesMeta` answers
  ``meta``, because a CPU build has no CUDA device guard or accelerator and the autograd engine
  needs both for a CUDA tensor (``InputMetadata`` asks the guard for a stream, ``InputBuffer::add``
  the accelerator; ``torch._C._ensureCUDADeviceGuardSet`` only replaces a guard that exists).
  Tensors C++ creates from such a tensor's options are put back on the fake CUDA device, and
  ``Tensor.to`` / ``.cuda()`` / ``.cpu()`` / ``is_cuda`` / ``get_device`` answer from the fake
  device. The dispatch keys stay CUDA's, so autocast applies CUDA's cast policy.
- **CUDA's kernel choices** where a C++ composite picks by device at run time
  (:class:`CudaKernelChoices`): ``scaled_dot_product_attention`` goes to
  ``aten._scaled_dot_product_flash_attention`` where the CUDA dispatcher takes flash (fp16 / bf16,
  no mask, head dim <= 256 and a multiple of 8; GQA native), else to
  ``_scaled_dot_product_efficient_attention`` (a mask, equal head counts), else the math
  decomposition (counted in ``StepTrace.notes``); ``dropout`` goes to ``aten.native_dropout``
  (``at::dropout`` fuses on CUDA only). Both ops have meta kernels and autograd formulas here. The
  autograd engine does not carry torch-function modes into backward, so a module forward run there
  (checkpoint recompute) enters this mode again (:func:`trace_step`'s module hooks).
- **What a CPU build refuses:** ``torch.autocast("cuda")`` switches itself off without CUDA, and
  ``torch.utils.checkpoint`` saves and restores the CUDA RNG state. :func:`fake_cuda` lets autocast
  on and gives a dummy RNG state (host-side state on a GPU: no kernel either way).
- **What fake tensors cannot answer:** Hugging Face's check for packed sequences reads the
  positions; on fake tensors it assumes packing and builds an explicit causal mask (no flash).
  During a step the check answers as the GPU would for one sequence per row (its ops still run).
- The fake mode's dispatch cache is off while models are built (it puts weakrefs on tensors,
  which ``Module.to`` cannot swap) and on while a step runs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from peft_fast.step_model.costs import cost_op
from peft_fast.step_model.memory import DeviceMemory, SavedBytes, is_device_tensor, on_device
from peft_fast.step_model.roofline import OpCall, kernel_seconds

__all__ = ["CudaKernelChoices", "OpRecord", "StepTrace", "fake_cuda", "is_device_tensor", "trace_step"]

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


_META = torch.device("meta")
_CUDA0 = torch.device("cuda", 0)


class _CppSeesMeta(TorchDispatchMode):
    """C++ asking a fake CUDA tensor for its device gets ``meta``; tensors C++ makes from it land on CUDA.

    The autograd engine makes a node's metadata, and accumulates gradients, on the device the tensor
    reports; a CPU build has no CUDA guard or accelerator for that, but it has the meta device's
    (which runs on the CPU ready queue). Backward formulas and composites that create a tensor from
    another's options (``at::zeros(sizes, grad.options())``) then ask for ``device=meta``; nothing
    else does while a step runs, so such a request is given the fake CUDA device. Active only
    while a step runs: a model is built on the meta device, and parameters made under a dispatch
    mode above the fake mode get memoised by its converter, which ``Module.to`` then cannot swap.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default and isinstance(args[0], FakeTensor):
            if args[0].fake_device.type == "cuda":
                return _META
        elif kwargs.get("device") is not None and torch.device(kwargs["device"]) == _META:
            kwargs = {**kwargs, "device": _CUDA0}
        return func(*args, **kwargs)


@dataclass
class FakeCuda:
    """A fake-CUDA session: the fake mode tensors live in and the kernel-choice mode (its counters)."""

    mode: FakeTensorMode
    choices: CudaKernelChoices
    cpp_sees_meta: _CppSeesMeta


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """A ``FakeTensorMode`` in which ``device="cuda"`` tensors, autocast and autograd work without CUDA."""
    import torch.cuda.amp.common as amp_common

    session = FakeCuda(FakeTensorMode(allow_non_fake_inputs=True), CudaKernelChoices(), _CppSeesMeta())
    # The dispatch cache puts weakref finalizers on tensors it hashes by identity; Module.to swaps a
    # fake parameter (swap_tensors), which refuses a tensor with a weakref. Off while models are
    # built, on while a step runs (trace_step): it makes dispatch several times faster.
    session.mode.cache_enabled = False
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(amp_common, "amp_definitely_not_available", lambda: False))
        stack.enter_context(_patched(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True))
        stack.enter_context(
            _patched(torch.cuda, "get_rng_state", lambda *args, **kwargs: torch.zeros(16, dtype=torch.uint8))
        )
        stack.enter_context(_patched(torch.cuda, "set_rng_state", lambda *args, **kwargs: None))
        stack.enter_context(session.mode)
        stack.enter_context(session.choices)
        yield session


def _flash_eligible(q: torch.Tensor, k: torch.Tensor, mask, enable_gqa: bool) -> bool:
    head_dim = q.shape[-1]
    heads_ok = q.shape[-3] == k.shape[-3] or (enable_gqa and q.shape[-3] % k.shape[-3] == 0)
    return mask is None and q.dim() == 4 and head_dim <= 256 and head_dim % 8 == 0 and heads_ok


class CudaKernelChoices(TorchFunctionMode):
    """Route the composites that choose a kernel by device at run time to the kernels CUDA would run."""

    def __init__(self) -> None:
        super().__init__()
        self.math_sdpa_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MOVES and args and isinstance(args[0], FakeTensor):
            return _MOVES[func](*args, **kwargs)
        if func is nn.functional.scaled_dot_product_attention and is_device_tensor(args[0]):
            return self._sdpa(*args, **kwargs)
        if func is nn.functional.dropout and is_device_tensor(args[0]):
            return self._dropout(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        dtype = query.dtype
        if torch.is_autocast_enabled("cuda") and dtype == torch.float32:
            dtype = torch.get_autocast_dtype("cuda")  # SDPA is on autocast's lower-precision list
        if dtype in _FLASH_DTYPES and _flash_eligible(query, key, attn_mask, enable_gqa):
            q, k, v = (t.to(dtype) for t in (query, key, value))
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)
            return out[0]
        if dtype in (*_FLASH_DTYPES, torch.float32) and query.dim() == 4 and query.shape[-3] == key.shape[-3]:
            q, k, v = (t.to(dtype) for t in (query, key, value))
            bias = attn_mask
            if bias is not None and bias.dtype == torch.bool:  # efficient attention takes an additive bias
                bias = torch.zeros(bias.shape, dtype=dtype, device=q.device).masked_fill(~bias, float("-inf"))
            out = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, bias, True, dropout_p, is_causal, scale=scale
            )
            return out[0]
        self.math_sdpa_calls += 1
        return nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )  # fmt: skip

    @staticmethod
    def _dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0 or input.numel() == 0:
            return input
        if p == 1.0:
            return input.mul_(0.0) if inplace else input * 0.0
        out = torch.ops.aten.native_dropout(input, p, True)[0]
        return input.copy_(out) if inplace else out


def _to(tensor: FakeTensor, *args, **kwargs):
    """``Tensor.to`` by the tensor's fake device (C++ sees the host, see :class:`_CppSeesHost`)."""
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    target = tensor.fake_device if device is None else device
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", 0)
    dtype = dtype or tensor.dtype
    if target == tensor.fake_device and dtype == tensor.dtype and not copy:
        return tensor
    options = {"dtype": dtype, "device": target, "non_blocking": non_blocking}
    if memory_format is not None:
        options["memory_format"] = memory_format
    return torch.ops.aten._to_copy.default(tensor, **options)


_MOVES = {
    torch.Tensor.to: _to,
    torch.Tensor.cuda: lambda t, device=None, non_blocking=False, **kw: _to(
        t, device or "cuda", non_blocking=non_blocking
    ),
    torch.Tensor.cpu: lambda t, **kw: _to(t, "cpu"),
    torch.Tensor.get_device: lambda t: t.fake_device.index if t.fake_device.type == "cuda" else -1,
    torch.Tensor.is_cuda.__get__: lambda t: t.fake_device.type == "cuda",
}


@dataclass
class OpRecord:
    """One dispatched op of the step and what it costs on the model's H200."""

    index: int
    name: str  # the overload packet: ``aten.mm``, ``peft_fast.lora_linear``
    phase: str  # forward, recompute (a module's forward inside backward) or backward
    context: str  # the innermost module (forward) or autograd node (backward)
    shapes: str
    flops: float
    bytes: float
    kernels: int
    roofline_s: float
    seconds: float  # roofline_s scaled by the Hopper report's ratio where it has the op kind
    rule: str
    device: bool  # False for a view / metadata / host-only op: no kernel, no cost
    live_bytes: int  # device bytes live when the op ran (outputs and its scratch included)


@dataclass
class StepTrace:
    """Everything recorded while one step ran."""

    records: list[OpRecord] = field(default_factory=list)
    memory: DeviceMemory | None = None
    saved: SavedBytes | None = None
    notes: list[str] = field(default_factory=list)


def _shapes(args, out) -> str:
    def one(x) -> str:
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
        return ""

    ins = ",".join(s for s in map(one, tree_flatten(args)[0]) if s)
    outs = ",".join(s for s in map(one, tree_flatten(out)[0]) if s)
    return f"({ins})->({outs})"


class _Recorder(TorchDispatchMode):
    """Costs every op as it is dispatched and follows the device storages it allocates and frees."""

    def __init__(self, trace: StepTrace, memory: DeviceMemory, report_ratio: Callable | None, is_device) -> None:
        super().__init__()
        self.trace, self.memory, self.report_ratio, self.is_device = trace, memory, report_ratio, is_device
        self.phase = "forward"
        self.module_stack: list[str] = []
        self.paused = False

    def context(self) -> str:
        if self.module_stack:
            return self.module_stack[-1]
        node = torch._C._current_autograd_node()
        return type(node).__name__ if node is not None else ""

    def host_read(self, t: torch.Tensor) -> None:
        """A value the host reads back (``bool(t)``), which fake tensors cannot answer: recorded as the
        ``_local_scalar_dense`` copy the GPU would make."""
        nbytes = t.element_size()
        self.trace.records.append(
            OpRecord(
                index=len(self.trace.records), name="aten._local_scalar_dense", phase=self.phase,
                context=self.context(), shapes=_shapes((t,), None), flops=0.0, bytes=nbytes, kernels=1,
                roofline_s=kernel_seconds(0.0, nbytes), seconds=kernel_seconds(0.0, nbytes),
                rule="a value the host reads (answered as the GPU would)", device=True,
                live_bytes=self.memory.live_bytes,
            )
        )  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or func is torch.ops.prim.device.default:
            return out
        call = OpCall(func, args, kwargs, out, self.is_device)
        cost = cost_op(call)
        ratio, basis = self.report_ratio(call) if self.report_ratio and cost.device else (1.0, "")
        phase = "recompute" if self.phase == "backward" and self.module_stack else self.phase
        new_bytes = self.memory.allocate(call.output_tensors())
        live = self.memory.observe(
            cost.scratch_bytes, lambda: f"{call.name} ({phase}, {self.context()})", force=new_bytes > 0
        )
        roofline = cost.seconds
        self.trace.records.append(
            OpRecord(
                index=len(self.trace.records), name=call.name, phase=phase, context=self.context(),
                shapes=_shapes(args, out) if cost.device else "", flops=cost.flops, bytes=cost.bytes,
                kernels=cost.kernels, roofline_s=roofline, seconds=roofline * ratio,
                rule=cost.rule + (f"; {basis}" if basis else ""), device=cost.device, live_bytes=live,
            )
        )  # fmt: skip
        return out


def _unpacked_sequences(recorder: _Recorder, position_ids: torch.Tensor) -> None:
    """transformers' ``find_packed_sequence_indices`` for rows that each hold one sequence.

    On fake tensors Hugging Face cannot read the positions, so it assumes packing and builds an
    explicit causal mask, which would take SDPA off FlashAttention. On the GPU, with one unpacked
    sequence per row, it finds none and lets SDPA apply ``is_causal``. The same ops are issued here
    (diff, compare, cumsum, the check read back); the answer is the GPU's.
    """
    first = position_ids[:, :1] - 1
    packed = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    recorder.host_read((packed[:, -1] == 0).all())
    return None


@contextlib.contextmanager
def _single_sequences(recorder: _Recorder) -> Iterator[None]:
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        yield
        return
    with _patched(masking_utils, "find_packed_sequence_indices", functools.partial(_unpacked_sequences, recorder)):
        yield


def _live_device_tensors(mode: FakeTensorMode | None, is_device) -> list[torch.Tensor]:
    """Every device tensor alive now (parameters, buffers, quantization states, inputs): the step's baseline."""
    found = []
    for obj in gc.get_objects():
        # type(), not isinstance(): a deprecated torch.distributed alias warns when asked for __class__
        if issubclass(type(obj), torch.Tensor) and is_device(obj):
            if mode is None or (isinstance(obj, FakeTensor) and obj.fake_mode is mode):
                found.append(obj)
    return found


def trace_step(
    step: Callable[[_Recorder], None],
    model: nn.Module,
    session: FakeCuda | None,
    report_ratio: Callable | None = None,
    device_type: str = "cuda",
) -> StepTrace:
    """Run ``step(recorder)`` under the recorder; ``step`` sets ``recorder.phase`` to "backward" before backward.

    ``session`` is the fake-CUDA session the model lives in (None for real tensors). Module forwards
    are followed by global hooks so ops carry their module and recompute is told from backward.
    ``device_type`` is the device whose tensors are priced and counted ("cpu" for the real-tensor checks).
    """
    is_device = on_device(device_type)
    trace = StepTrace()
    memory = DeviceMemory()
    memory.add_static(_live_device_tensors(session.mode if session else None, is_device))
    saved = SavedBytes(memory, is_device)
    trace.memory, trace.saved = memory, saved
    recorder = _Recorder(trace, memory, report_ratio, is_device)
    names = {id(module): name or type(module).__name__ for name, module in model.named_modules()}

    # The autograd engine does not carry torch-function modes into backward (dispatch modes it does):
    # a module forward run there (checkpoint recompute) enters the kernel-choice mode again.
    reentered: list[int] = []

    def pre_hook(module, args):
        recorder.module_stack.append(names.get(id(module), type(module).__name__))
        if session and session.choices not in torch.overrides._get_current_function_mode_stack():
            session.choices.__enter__()
            reentered.append(len(recorder.module_stack))

    def post_hook(module, args, output):
        if reentered and reentered[-1] == len(recorder.module_stack):
            reentered.pop()
            session.choices.__exit__(None, None, None)
        if recorder.module_stack:
            recorder.module_stack.pop()

    def pack(tensor: torch.Tensor):
        recorder.paused = True
        try:
            saved.pack(tensor, recorder.phase == "forward")
            return tensor.detach()  # not the tensor itself: an output saved by its own node would make a cycle
        finally:
            recorder.paused = False

    handles = [
        nn.modules.module.register_module_forward_pre_hook(pre_hook),
        nn.modules.module.register_module_forward_hook(post_hook, always_call=True),
    ]
    math_sdpa = session.choices.math_sdpa_calls if session else 0
    try:
        with contextlib.ExitStack() as stack:
            if session:
                stack.enter_context(_single_sequences(recorder))
                stack.enter_context(session.cpp_sees_meta)
                stack.enter_context(_patched(session.mode, "cache_enabled", True))
            stack.enter_context(recorder)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            step(recorder)
    finally:
        for handle in handles:
            handle.remove()
    if session and session.choices.math_sdpa_calls > math_sdpa:
        trace.notes.append(f"{session.choices.math_sdpa_calls - math_sdpa} SDPA call(s) took the math path")
    return trace
