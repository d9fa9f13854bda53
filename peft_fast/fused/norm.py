"""RMSNorm modules through ``peft_fast::rms_norm``: the family's own rounding, one kernel per call."""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.fused.classes import fused_subclass
from peft_fast.models import Norm


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from peft_fast.ops.rms_norm import rms_norm

    spec: Norm = self._peft_fast_norm
    return rms_norm(hidden_states, self.weight, getattr(self, spec.eps_attr), offset=spec.offset, casting=spec.casting)


def fusable_norm(module: nn.Module, spec: Norm) -> bool:
    """A module of the family's RMSNorm class with its weight and eps, and no hooks."""
    return (
        type(module).__name__ in spec.classes
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 1
        and isinstance(getattr(module, spec.eps_attr, None), float)
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def fuse_norm(module: nn.Module, spec: Norm) -> None:
    """Give ``module`` the fused forward (its class becomes a fused subclass of its own)."""
    members = {"forward": _norm_forward, "_peft_fast_norm": spec}
    module.__class__ = fused_subclass(type(module), "rms_norm", members, (spec,))


def norm_call(module: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):
    """``module(x)``, or with ``residual`` the fused ``(module(residual + x), residual + x)``.

    The fused form reads the norm's parameters directly, so it runs only on a fused norm without
    hooks (a hook added after ``patch`` would otherwise be skipped); anything else takes the plain path.
    """
    spec: Norm | None = getattr(type(module), "_peft_fast_norm", None)
    if residual is None:
        return module(x)
    if spec is None or module._forward_hooks or module._forward_pre_hooks:
        summed = residual + x
        return module(summed), summed
    from peft_fast.ops.rms_norm import rms_norm

    eps = getattr(module, spec.eps_attr)
    return rms_norm(x, module.weight, eps, offset=spec.offset, casting=spec.casting, residual=residual)
