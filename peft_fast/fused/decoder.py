"""Decoder layers whose residual add is fused into the RMSNorm that follows it (``rms_norm(..., residual=)``).

``pre_norm`` (Llama, Mistral, Qwen, Gemma, Phi-3)::

    h = h + attn(input_norm(h));  x = post_attention_norm(h)      <- one kernel: the add and the norm
    return h + mlp(x)

``sandwich`` (Gemma 2 / 3, a norm on each sublayer's output as well)::

    h = h + post_attention_norm(attn(input_norm(h)));  x = pre_feedforward_norm(h)   <- one kernel
    return h + post_feedforward_norm(mlp(x))

The layer's other modules are called as Hugging Face's forward calls them, with its keyword
arguments passed through, so their hooks (adapters, LLaMA-Adapter) run. The subclass keeps
Hugging Face's gradient checkpointing (``GradientCheckpointingLayer`` wraps its forward).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from peft_fast.fused.classes import fused_subclass
from peft_fast.fused.norm import norm_call
from peft_fast.models import Decoder

_NORMS = {
    "pre_norm": ("input_layernorm", "post_attention_layernorm"),
    "sandwich": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
}


def _keywords(self, args: tuple, kwargs: dict) -> dict:
    """Positional arguments after hidden_states as keywords, by the original forward's parameter names."""
    if not args:
        return kwargs
    names = self._peft_fast_parameters[: len(args)]
    return {**dict(zip(names, args, strict=True)), **kwargs}


def _pre_norm_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    kwargs = _keywords(self, args, kwargs)
    dropouts = self._peft_fast_decoder.residual_dropouts
    normed = self.input_layernorm(hidden_states)
    attended = self.self_attn(hidden_states=normed, **kwargs)[0]
    if dropouts:
        attended = getattr(self, dropouts[0])(attended)
    normed, hidden_states = norm_call(self.post_attention_layernorm, attended, residual=hidden_states)
    out = self.mlp(normed)
    if dropouts:
        out = getattr(self, dropouts[1])(out)
    return hidden_states + out


def _sandwich_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    kwargs = _keywords(self, args, kwargs)
    normed = self.input_layernorm(hidden_states)
    attended = self.post_attention_layernorm(self.self_attn(hidden_states=normed, **kwargs)[0])
    normed, hidden_states = norm_call(self.pre_feedforward_layernorm, attended, residual=hidden_states)
    return hidden_states + self.post_feedforward_layernorm(self.mlp(normed))


def fusable_decoder(module: nn.Module, spec: Decoder) -> bool:
    """A decoder layer of the family with the modules its layout names (the norms fused already)."""
    if type(module).__name__ not in spec.classes or spec.layout not in _NORMS:
        return False
    names = ("self_attn", "mlp", *_NORMS[spec.layout], *(spec.residual_dropouts or ()))
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in names):
        return False
    # The norm that takes the residual must be one of ours (it reads its weight directly).
    takes_residual = "post_attention_layernorm" if spec.layout == "pre_norm" else "pre_feedforward_layernorm"
    residual_norm = getattr(module, takes_residual)
    return hasattr(type(residual_norm), "_peft_fast_norm")


def fuse_decoder(module: nn.Module, spec: Decoder) -> None:
    """Give the layer the forward that fuses its residual add (Hugging Face's checkpointing kept)."""
    cls = type(module)
    parameters = [
        name
        for name, p in inspect.signature(cls.forward).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)
    ][2:]  # after self and hidden_states
    forward = _pre_norm_forward if spec.layout == "pre_norm" else _sandwich_forward
    members = {"forward": forward, "_peft_fast_decoder": spec, "_peft_fast_parameters": parameters}
    module.__class__ = fused_subclass(cls, "residual_add", members, (spec,))
