"""Activation offload for gradient checkpointing: each checkpointed layer's input waits in host memory.

With gradient checkpointing a decoder layer keeps only its input for backward, which it then
recomputes from; across L layers those inputs are L × tokens × hidden values on the device (8 KB
per token per layer for Llama-3-8B in bf16). :func:`offloaded_checkpoint` replaces Hugging Face's
checkpoint function on the layers: the forward runs without grad, copies the layer input to
(pinned) host memory on a side stream and lets the device copy go; the backward brings it back —
already prefetched while the next layer's backward ran — recomputes the layer with grad under the
forward's autocast and RNG state, and backpropagates through it (reentrant style, like Unsloth's
offloaded checkpointing). On CPU the same code path runs with plain copies.

A layer is switched by giving it a subclass whose ``_gradient_checkpointing_func`` is a property:
whatever Hugging Face assigns there (``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``,
also as Trainer calls them) is kept but our offloading function is what the layer calls.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from peft_fast.fused.classes import fused_subclass


def _is_fake(t: torch.Tensor) -> bool:
    return type(t).__name__ == "FakeTensor"


def _real_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and not _is_fake(t) and torch.cuda.is_available()


_SIDE_STREAMS: dict[int, object] = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class _HostCopy:
    """A device tensor moved to host memory; ``fetch`` brings it back (waiting for a prefetch if one ran)."""

    def __init__(self, tensor: torch.Tensor, previous: _HostCopy | None) -> None:
        self.device, self.shape, self.dtype = tensor.device, tensor.shape, tensor.dtype
        self.previous = None if previous is None else weakref.ref(previous)
        self.back: torch.Tensor | None = None
        self.event = None
        if _real_cuda(tensor):
            stream = _side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(tensor, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(stream)
            tensor.record_stream(stream)  # the allocator must not reuse it before the copy is done
        else:
            self.host = tensor.detach().to("cpu", copy=True)

    def prefetch(self) -> None:
        """Start the copy back on the side stream (a no-op off CUDA or when already back)."""
        if self.back is not None or self.event is None:
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.event)
            self.back = self.host.to(self.device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def fetch(self) -> torch.Tensor:
        """The tensor on its device again."""
        if self.back is None:
            if self.event is not None:
                self.prefetch()
            else:
                self.back = self.host.to(self.device)
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)
            self.back.record_stream(torch.cuda.current_stream(self.device))
        back, self.back, self.host = self.back, None, None
        return back

    def prefetch_previous(self) -> None:
        previous = None if self.previous is None else self.previous()
        if previous is not None and previous.host is not None:
            previous.prefetch()


class _Chain:
    """The last layer input offloaded on this thread: each copy knows the one before it (its layer's predecessor)."""

    last: _HostCopy | None = None


_CHAIN = _Chain()


def _autocast_states(device_type: str) -> list[tuple[str, bool, torch.dtype]]:
    states = []
    for kind in dict.fromkeys((device_type, "cpu")):
        if torch.amp.is_autocast_available(kind):
            states.append((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)))
    return states


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, anchor, hidden_states, *args):
        ctx.function, ctx.args = function, args
        ctx.input_requires_grad = hidden_states.requires_grad
        ctx.autocast = _autocast_states(hidden_states.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(hidden_states.device) if _real_cuda(hidden_states) else None
        out = function(hidden_states, *args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"activation offload needs a layer that returns a tensor, got {type(out).__name__}")
        ctx.saved_input = _HostCopy(hidden_states, _CHAIN.last)
        _CHAIN.last = ctx.saved_input
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_input
        x = saved.fetch().detach().requires_grad_(True)
        saved.prefetch_previous()  # the layer before runs its backward next
        devices = [x.device] if ctx.device_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, x.device)
            with torch.enable_grad(), _autocast_contexts(ctx.autocast):
                out = ctx.function(x, *ctx.args)
        torch.autograd.backward(out, grad_out)
        grad_x = x.grad if ctx.input_requires_grad else None
        return (None, None, grad_x, *(None for _ in ctx.args))


class _autocast_contexts:
    def __init__(self, states) -> None:
        self.contexts = [torch.autocast(kind, enabled=enabled, dtype=dtype) for kind, enabled, dtype in states]

    def __enter__(self):
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc):
        for context in reversed(self.contexts):
            context.__exit__(*exc)


def offloaded_checkpoint(function, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Hugging Face's checkpoint-function contract (``func(run, *args)``) with the input offloaded to the host.

    Keyword arguments of ``torch.utils.checkpoint`` (``use_reentrant``, ...) are accepted and ignored.
    """
    del kwargs
    anchor = torch.empty(0, device=hidden_states.device, requires_grad=True)  # makes autograd call backward
    return _OffloadedCheckpoint.apply(function, anchor, hidden_states, *args)


def _get_checkpoint_func(self):
    return offloaded_checkpoint


def _set_checkpoint_func(self, func) -> None:
    self.__dict__["_hf_ckpt"] = func


def offload_layer(layer: nn.Module) -> None:
    """Make ``layer`` (a GradientCheckpointingLayer) offload its input whenever it is checkpointed."""
    current = layer.__dict__.pop("_gradient_checkpointing_func", None)
    members = {"_gradient_checkpointing_func": property(_get_checkpoint_func, _set_checkpoint_func)}
    layer.__class__ = fused_subclass(type(layer), "offload", members)
    if current is not None:
        layer.__dict__["_hf_ckpt"] = current


def restore_layer(layer: nn.Module) -> None:
    """Undo :func:`offload_layer` (called with the class given back): keep what Hugging Face assigned."""
    current = layer.__dict__.pop("_hf_ckpt", None)
    if current is not None:
        layer.__dict__["_gradient_checkpointing_func"] = current


# -- the last layer, never recomputed -------------------------------------------------------------


# From this many tokens in one forward the last layer is checkpointed as the others: its kept
# activations (~70 KB a token on Llama-3-8B, against 8 KB for a checkpointed input) would then set
# the longest context that fits, while the recompute they save is one layer's forward in 32.
KEEP_LAST_LAYER_MAX_TOKENS = 8192


def _checkpointed_unless_kept(self) -> bool:
    if self.__dict__.get("_peft_fast_keep_now", True):
        return False
    return self.__dict__.get("_hf_gradient_checkpointing", False)


def _keep_flag(self, enabled: bool) -> None:
    self.__dict__["_hf_gradient_checkpointing"] = enabled


def _call_keeping_short_inputs(self, *args, **kwargs):
    # Decided in eager mode only: under torch.compile the layer keeps what the last eager call
    # decided (kept, by default), and Dynamo traces the plain call with no graph break.
    if not torch.compiler.is_compiling():
        hidden = args[0] if args else kwargs.get("hidden_states")
        tokens = hidden.shape[:-1].numel() if isinstance(hidden, torch.Tensor) else 0
        self.__dict__["_peft_fast_keep_now"] = tokens < KEEP_LAST_LAYER_MAX_TOKENS
    return self._peft_fast_keep_base.__call__(self, *args, **kwargs)


def keep_activations(layer: nn.Module) -> None:
    """Make ``layer`` run without checkpointing whatever Hugging Face sets, below
    :data:`KEEP_LAST_LAYER_MAX_TOKENS` tokens a forward (its ``gradient_checkpointing`` reads False;
    what is assigned is kept for :func:`restore_kept` and used from that many tokens on)."""
    current = layer.__dict__.pop("gradient_checkpointing", None)
    members = {"gradient_checkpointing": property(_checkpointed_unless_kept, _keep_flag),
               "__call__": _call_keeping_short_inputs, "_peft_fast_keep_base": type(layer)}  # fmt: skip
    layer.__class__ = fused_subclass(type(layer), "keep_last_layer", members)
    if current is not None:
        layer.__dict__["_hf_gradient_checkpointing"] = current


def restore_kept(layer: nn.Module) -> None:
    """Undo :func:`keep_activations` (called with the class given back)."""
    layer.__dict__.pop("_peft_fast_keep_now", None)
    current = layer.__dict__.pop("_hf_gradient_checkpointing", None)
    if current is not None:
        layer.__dict__["gradient_checkpointing"] = current
