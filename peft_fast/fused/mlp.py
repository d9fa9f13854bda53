"""Gated MLPs through ``peft_fast::glu`` (act(gate)·up in one kernel, recomputed in backward), tiled at long context.

Tiling: above ``min_tokens`` tokens the MLP runs over chunks of ``chunk_tokens`` under a
:class:`_TiledMLP` that keeps only its input for backward and recomputes each chunk there (as
Arctic's TiledMLP), so the [tokens × intermediate] activations of one chunk, not of the whole
sequence, are ever alive. It costs one more MLP forward, so it engages only where activation
memory, not time, is what limits training.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.fused.classes import fused_subclass
from peft_fast.models import Mlp

# transformers' activation modules -> the GLU kernel's activation (the same math).
_ACTIVATIONS = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "GELUActivation": "gelu",
}


def activation_name(module: nn.Module, spec: Mlp) -> str | None:
    """The GLU activation of an MLP's activation module, or None when the kernel has no such activation."""
    act = getattr(module, spec.activation_attr, None)
    name = _ACTIVATIONS.get(type(act).__name__)
    if name == "gelu" and getattr(act, "act", None) not in (None, nn.functional.gelu):
        return None  # GELUActivation(use_gelu_python=True): an erf form we would round differently
    return name


def fusable_mlp(module: nn.Module, spec: Mlp) -> bool:
    """An MLP of the family's class, laid out as the table says, with an activation the kernel has."""
    if type(module).__name__ not in spec.classes or activation_name(module, spec) is None:
        return False
    names = ("gate_up_proj", "down_proj") if spec.layout == "packed_gate_up" else ("gate_proj", "up_proj", "down_proj")
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def _glu_mlp(self, x: torch.Tensor) -> torch.Tensor:
    from peft_fast.ops.glu import glu, glu_packed

    activation = self._peft_fast_activation
    if self._peft_fast_mlp.layout == "packed_gate_up":
        return self.down_proj(glu_packed(self.gate_up_proj(x), activation))
    return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), activation))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    tiling = self._peft_fast_tiling
    tokens = x.numel() // max(x.shape[-1], 1)
    if tiling is not None and torch.is_grad_enabled() and tokens >= tiling[0]:
        return tiled_mlp(self._peft_fast_glu_mlp, x, tiling[1])
    return self._peft_fast_glu_mlp(x)


def fuse_mlp(module: nn.Module, spec: Mlp, tiling: tuple[int, int] | None) -> None:
    """Give ``module`` the fused forward; ``tiling`` is (min_tokens, chunk_tokens) or None."""
    activation = activation_name(module, spec)
    members = {
        "forward": _mlp_forward,
        "_peft_fast_glu_mlp": _glu_mlp,
        "_peft_fast_mlp": spec,
        "_peft_fast_activation": activation,
        "_peft_fast_tiling": tiling,
    }
    module.__class__ = fused_subclass(type(module), "glu", members, (spec, activation, tiling))


# -- tiling over tokens ---------------------------------------------------------------------------


class _TiledMLP(torch.autograd.Function):
    """y = mlp(x) chunk by chunk; backward recomputes each chunk under grad and backpropagates it at once.

    The MLP's parameters receive their gradients from the inner backward, as with reentrant
    checkpointing; ``anchor`` (a tensor that requires grad) makes autograd call this backward even
    when x does not require grad. The CPU RNG state is replayed so LoRA dropout draws the same seeds.
    """

    @staticmethod
    def forward(ctx, forward, chunk_tokens, x, anchor):
        ctx.forward, ctx.chunk_tokens = forward, chunk_tokens
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda and torch.cuda.is_available() else None
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        pieces = [forward(part) for part in flat.split(chunk_tokens)]
        return torch.cat(pieces).reshape(*x.shape[:-1], pieces[0].shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = torch.empty_like(flat)
        devices = [x.device] if ctx.device_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, x.device)
            with torch.enable_grad(), torch.autocast(x.device.type, **ctx.autocast):
                for start in range(0, flat.shape[0], ctx.chunk_tokens):
                    part = flat[start : start + ctx.chunk_tokens].requires_grad_(True)
                    out = ctx.forward(part)
                    torch.autograd.backward(out, grad_flat[start : start + ctx.chunk_tokens])
                    grad_x[start : start + ctx.chunk_tokens] = part.grad
        return None, None, grad_x.reshape(x.shape), None


def _autocast_state(device_type: str) -> dict:
    if not torch.amp.is_autocast_available(device_type):
        return {"enabled": False}
    return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type)}


def tiled_mlp(forward, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``forward(x)`` over token chunks of ``chunk_tokens``, keeping only x for backward.

    A custom Function's forward runs without grad, so nothing inside the chunks is recorded.
    """
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _TiledMLP.apply(forward, chunk_tokens, x, anchor)
