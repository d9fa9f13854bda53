"""The host model's side of every method: replacing submodules, putting layers back, preparing it.

Shared by every method and importing none of them: swapping a submodule by name, GPT-2's Conv1D
as an equivalent Linear and back, plain layers from merged weights, NF4-quantizing and freezing a
model before its first method, untying a shared parameter, and the per-model marks by which a
method says it is on a model (``register_state_attr`` / ``has_method``).
"""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.layers import NF4Linear
from peft_fast.quantize import is_quantizable_linear, quantize_model
from peft_fast.targeting import output_head_names

__all__ = [
    "as_linear",
    "conv1d_names",
    "dequantize_nf4_layers",
    "has_method",
    "plain_layer",
    "prepare_host_model",
    "put_bases_back",
    "quantize_host_model",
    "register_state_attr",
    "restore_base",
    "set_submodule",
    "untie",
]

# The attributes by which methods mark a model they patched; each method module registers its own.
_STATE_ATTRS: list[str] = []


def register_state_attr(name: str) -> str:
    """Declare ``name`` as the attribute a method keeps its per-model state under; returns it."""
    if name not in _STATE_ATTRS:
        _STATE_ATTRS.append(name)
    return name


def has_method(model: nn.Module) -> bool:
    """Whether any peft_fast method has patched ``model``."""
    return any(getattr(model, attr, None) is not None for attr in _STATE_ATTRS)


def set_submodule(model: nn.Module, name: str, module: nn.Module | None) -> None:
    """Put ``module`` at ``name`` (a dotted path) in ``model``; ``None`` removes the attribute."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if module is None:
        delattr(parent, child)
    else:
        setattr(parent, child, module)


def conv1d_names(model: nn.Module) -> set[str]:
    """Names of the model's GPT-2 Conv1D layers (noted before they become Linear / NF4Linear)."""
    return {n for n, m in model.named_modules() if is_quantizable_linear(m) and not isinstance(m, nn.Linear)}


def as_linear(module: nn.Module) -> nn.Module:
    """GPT-2's Conv1D (weight [in, out]) as an equivalent nn.Linear (weight [out, in])."""
    if isinstance(module, (nn.Linear, NF4Linear)):
        return module
    weight = module.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    # patch() froze the model's parameters before this new Linear was made: its copy of the base
    # weight / bias stays frozen too, as PEFT's Conv1D bases are.
    return linear.requires_grad_(False)


def restore_base(module: nn.Module, was_conv1d: bool, dtype: torch.dtype | None, merged: torch.Tensor | None):
    """The plain module to put back for a wrapper: Linear, Conv1D, or NF4Linear (``merged`` = new weight)."""
    base = module.base_layer
    if merged is None and (not was_conv1d or isinstance(base, NF4Linear)):
        return base
    if merged is None:
        merged = base.weight.detach()
    bias = base.bias.detach() if base.bias is not None else None
    if was_conv1d:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(merged.shape[0], merged.shape[1])
        conv.weight = nn.Parameter(merged.t().contiguous(), requires_grad=False)
        conv.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(merged.shape[0]))
        return conv.to(merged.device)
    linear = nn.Linear(merged.shape[1], merged.shape[0], bias=bias is not None, device=merged.device,
                       dtype=dtype or merged.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(merged)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def put_bases_back(model: nn.Module, wrappers: list[tuple[str, nn.Module]], conv1d: set[str]) -> None:
    """Replace each (name, wrapper) by its base layer: the original Linear, Conv1D (``conv1d`` names) or NF4Linear."""
    for name, wrapper in wrappers:
        set_submodule(model, name, restore_base(wrapper, name in conv1d, None, None))


def plain_layer(weight: torch.Tensor, bias: torch.Tensor | None, as_conv1d: bool) -> nn.Module:
    """A frozen nn.Linear (weight [out, in]) or GPT-2 Conv1D (stored [in, out]) holding ``weight``."""
    if as_conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.t().contiguous())
        layer.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros_like(weight[:, 0]))
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def dequantize_nf4_layers(model: nn.Module, dtype: torch.dtype | None, conv1d: set[str]) -> None:
    """Replace every NF4Linear by a dense layer in ``dtype`` (default: its original dtype).

    A layer that was a GPT-2 Conv1D (``conv1d`` names it) goes back to Conv1D ([in, out] weight).
    The new layers are frozen.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            bias = None if module.bias is None else module.bias.detach()
            set_submodule(model, name, plain_layer(module.dequantized_weight(dtype), bias, name in conv1d))


def quantize_host_model(
    model: nn.Module, blocksize: int, double_quant: bool, skip_modules: tuple[str, ...] = (), progress: bool = True
) -> None:
    """NF4-quantize the model's Linear / Conv1D layers in place, but its output heads, its
    ``_keep_in_fp32_modules`` and ``skip_modules``.

    Like transformers + bitsandbytes, ``_keep_in_fp32_modules`` stay dense: T5's forward reads
    ``self.wo.weight.dtype``, which an NF4 layer cannot provide.
    """
    skip = (*output_head_names(model), *skip_modules, *(getattr(model, "_keep_in_fp32_modules", None) or ()))
    quantize_model(model, blocksize=blocksize, double_quant=double_quant, skip_modules=skip, progress=progress)


def prepare_host_model(
    model: nn.Module, quantize: str | None, blocksize: int, double_quant: bool, skip_modules: tuple[str, ...] = ()
) -> None:
    """Ready a model for a new peft_fast method: NF4-quantize its Linear layers (but ``skip_modules``,
    e.g. modules that train whole) if asked and not done before, and freeze its parameters if no
    peft_fast method has patched it yet (a method added on top leaves the others' trainable
    parameters as they are)."""
    if quantize == "nf4" and not any(isinstance(m, NF4Linear) for m in model.modules()):
        quantize_host_model(model, blocksize, double_quant, skip_modules, progress=False)
    if not has_method(model):
        for param in model.parameters():
            param.requires_grad_(False)


def untie(model: nn.Module, module: nn.Module) -> None:
    """Give ``module`` its own copy of any parameter it shares (a head tied to the embeddings).

    PEFT trains a copy of a module in modules_to_save; training the shared tensor instead would
    change the embeddings too, and the saved adapter would disagree with PEFT's.
    """
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    for owner in module.modules():
        for param_name, param in list(owner.named_parameters(recurse=False)):
            if counts.get(id(param), 0) > 1:
                setattr(owner, param_name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
