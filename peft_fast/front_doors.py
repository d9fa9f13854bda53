"""The front doors: patch, unpatch, merge, disable_adapters, set_adapter, add_adapter, save / load.

Each one finds the method(s) on a model (or the one a config or adapter file selects) in
:mod:`peft_fast.registry` and calls the :class:`peft_fast.method.Method` operations; there is no
per-method code here. A model may carry several methods on different modules (LoRA, then (IA)³
or bottleneck adapters on top): the front doors act on all of them, in registry order
(``unpatch`` in reverse).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from peft_fast import fused as fused_step
from peft_fast import hf_integration
from peft_fast.adapter_files import ADAPTER_CONFIG, adapter_directory, output_directory
from peft_fast.config import check_adapter_name
from peft_fast.host import dequantize_nf4_layers, has_method
from peft_fast.io import read_json
from peft_fast.layers import NF4Linear
from peft_fast.method import Method
from peft_fast.registry import METHODS, method_for_config, method_for_file, methods_on

__all__ = [
    "add_adapter",
    "disable_adapters",
    "load_adapter",
    "merge",
    "patch",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unpatch",
]

_NOT_PATCHED = "this model is not patched by peft_fast (call peft_fast.patch first)"


def _methods(model: nn.Module) -> list[Method]:
    """The methods on ``model``; a ValueError when there is none."""
    found = methods_on(model)
    if not found:
        raise ValueError(_NOT_PATCHED)
    return found


def _peft_interop():
    """peft_fast.peft_interop when PEFT is loaded (only then can a model be a PEFT model), else None."""
    if "peft" not in sys.modules:
        return None
    from peft_fast import peft_interop

    return peft_interop


def _sync_trainer_hooks(model: nn.Module) -> None:
    """Hugging Face save / load hooks on the model iff one method is on it (several: no PEFT layout, saved whole)."""
    if hf_integration.hooked_method(model) is not None:
        hf_integration.attach(model)
    else:
        hf_integration.detach(model)


def patch(
    model: nn.Module,
    config=None,
    adapter_name: str = "default",
    *,
    fused: bool | Iterable[str] | Mapping[str, bool] = True,
    offload_activations: bool = False,
) -> nn.Module:
    """Give ``model`` adapter ``adapter_name`` of the method ``config`` selects, in place; returns it.

    ``LoraConfig`` (LoRA, or QLoRA with ``quantize="nf4"``), ``IA3Config``, ``AdapterConfig``
    (bottleneck adapters) or a prompt-method config. Base parameters are frozen; the method's
    parameters train. Everything is validated before the model is touched. The model gets Hugging
    Face's ``save_pretrained`` / ``load_adapter`` (adapter files only; Trainer uses them) while one
    method is on it.

    ``fused``: the fused training step for the families of the model table (Llama, Mistral, Qwen2,
    Qwen3, Gemma, Gemma 2 / 3, Phi-3): RMSNorm, the residual add, RoPE, the gated MLP, the MLP tiled
    at long context and a loss that never builds the logits (in training with labels no logits are
    returned). True (default) for all, False for none, or pieces by name (a list, or a dict mapping a
    piece to False to leave it out): see :mod:`peft_fast.fused`. What was fused is printed once.
    ``offload_activations``: under gradient checkpointing, keep each layer's checkpointed input in
    host memory until its backward (any transformers >= 5 model).

    ``patch(peft_model)`` (no config) instead makes an existing PEFT LoRA / QLoRA model run our
    fused op, keeping PEFT's modules and parameters: see :mod:`peft_fast.peft_interop`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    fused_step.resolve_pieces(fused)  # a bad value is refused before anything changes
    if not isinstance(offload_activations, bool):
        raise TypeError(f"offload_activations must be True or False, got {offload_activations!r}")
    interop = _peft_interop()
    if interop is not None and interop.is_peft_model(model, config):
        interop.patch_peft_model(model, config)
        fused_step.fuse(model.get_base_model(), fused, offload_activations=offload_activations)
        return model
    if config is None:
        raise TypeError("config is required (a peft_fast.LoraConfig, IA3Config, ...) unless model is a PEFT model")
    check_adapter_name(adapter_name)
    method_for_config(config).patch(model, config, adapter_name)
    _sync_trainer_hooks(model)
    fused_step.fuse(model, fused, offload_activations=offload_activations)
    return model


def add_adapter(model: nn.Module, config, adapter_name: str) -> nn.Module:
    """Add another adapter to a model its method is on already (inactive where the method has active adapters)."""
    methods = _methods(model)
    method = method_for_config(config)
    if not method.stacks:
        stacking = [m for m in METHODS if m.stacks]
        others = ", ".join(m.name for m in stacking[1:])
        raise TypeError(
            f"add_adapter adds {stacking[0].name} adapters: config must be a {stacking[0].config_types[0].__name__}, "
            f"got {type(config).__name__} ({others} stack too; {method.name}: one adapter per model)"
        )
    check_adapter_name(adapter_name)
    if method not in methods:
        raise ValueError(f"this model has no {method.name} adapter to add to; use peft_fast.patch(model, config, name)")
    method.add_adapter(model, config, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Make ``adapter_names`` the active adapter(s) of their method(s); only active adapters train.

    A method none of whose adapters is named keeps its active adapters.
    """
    methods = _methods(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = {method: method.adapter_names(model) for method in methods}
    unknown = [n for n in names if not any(n in owned for owned in known.values())]
    if unknown:
        every = [n for owned in known.values() for n in owned]
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {every}")
    for method, owned in known.items():
        if any(n in owned for n in names) or not names:
            method.set_adapter(model, [n for n in names if n in owned])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as its base model (every method's adapters off)."""
    methods = _methods(model)
    with contextlib.ExitStack() as stack:
        for method in methods:
            stack.enter_context(method.disabled(model))
        yield


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every adapter of every method and restore the original modules (NF4 bases stay NF4Linear).

    On a PEFT model ``patch`` took over, gives its LoRA layers PEFT's own forward back.
    """
    interop = _peft_interop()
    if interop is not None and not has_method(model) and interop.is_peft_model(model, None):
        interop.unpatch_peft_model(model)
        fused_step.unfuse(model.get_base_model())
        return model
    for method in reversed(_methods(model)):
        method.unpatch(model)
    _sync_trainer_hooks(model)
    fused_step.unfuse(model)
    return model


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active adapters into the base weights; returns a plain HF model (in place).

    An NF4 base is dequantized to ``dtype`` (default: the weight's original dtype), so the
    result needs neither peft_fast nor bitsandbytes at inference. NF4 layers that carry no
    adapter are dequantized too. A method that cannot merge (bottleneck adapters, prompt
    methods) is refused before anything changes.
    """
    methods = _methods(model)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    for method in methods:
        if not method.mergeable:
            method.merge(model, dtype)  # raises, naming the method
            raise ValueError(f"{method.name} cannot be merged into the base weights")
    conv1d = set().union(*(method.conv1d_names(model) for method in methods))
    for method in methods:
        method.merge(model, dtype)
    dequantize_nf4_layers(model, dtype, conv1d)
    hf_integration.detach(model)  # a merged model saves in full again
    fused_step.unfuse(model)  # a plain Hugging Face model: its own classes
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the first method's active one) into ``directory``.

    In the method's format (HF PEFT's for LoRA, (IA)³ and the prompt methods); the config and
    the weights are written to temporaries and renamed into place only when both are complete.
    """
    directory = output_directory(directory)
    methods = _methods(model)
    if adapter_name is None:
        method = methods[0]
        adapter_name = (method.active_adapters(model) or method.adapter_names(model))[0]
    else:
        method = next((m for m in methods if adapter_name in m.adapter_names(model)), None)
        if method is None:
            every = [n for m in methods for n in m.adapter_names(model)]
            raise ValueError(f"unknown adapter {adapter_name!r}; the model has {every}")
    return method.save(model, directory, adapter_name)


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    fused: bool | Iterable[str] | Mapping[str, bool] = True,
) -> nn.Module:
    """Load an adapter directory into ``model`` (patching it, or adding the adapter); returns the model.

    ``fused`` as for :func:`patch` (a model patched already keeps what it has).

    The method comes from the directory's config file (LoRA, (IA)³, a prompt method, or
    bottleneck adapters). Refuses, before touching the model, an adapter whose config asks for
    what we cannot run, whose targets the model lacks, or whose tensors do not fit the model.
    """
    directory = adapter_directory(directory)
    config_path = directory / ADAPTER_CONFIG
    method = method_for_file(read_json(config_path) if config_path.is_file() else {})
    fused_step.resolve_pieces(fused)
    method.load(model, directory, adapter_name, is_trainable)
    _sync_trainer_hooks(model)
    fused_step.fuse(model, fused)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; NF4 weights count as their element count, like PEFT."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: trainable params, all params and the trainable percentage."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
