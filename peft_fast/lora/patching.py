"""LoRA / QLoRA on a Hugging Face model: targets, LoraLinear layers in and out, active adapters, merging.

``patch_lora`` finds the target modules (names, a regex, or "all-linear"), quantizes the base
weights to NF4 when asked, replaces each target with a :class:`LoraLinear` and freezes everything
else. The model keeps its class, ``generate`` and Trainer compatibility. Everything is validated
before the model is touched, so a failed patch leaves the model as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from peft_fast.config import LoraConfig, check_adapter_name
from peft_fast.host import as_linear, conv1d_names, register_state_attr, restore_base, set_submodule, untie
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.method import flags_set
from peft_fast.quantize import quantize_model
from peft_fast.targeting import (
    check_modules_to_save,
    is_base_linear,
    layer_index_ok,
    matches,
    matches_modules_to_save,
    no_match_error,
    output_head_names,
)

__all__ = [
    "PatchState",
    "add_lora_adapter",
    "disabled",
    "find_targets",
    "lora_layers",
    "merge_lora_layers",
    "patch_lora",
    "set_lora_adapter",
    "unpatch_lora",
]

STATE_ATTR = register_state_attr("peft_fast_state")


@dataclass
class PatchState:
    """What ``patch`` did to a model, kept on it as ``model.peft_fast_state``."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    conv1d_names: set[str] = field(default_factory=set)  # GPT-2 Conv1D layers turned into Linear
    quantized: bool = False


def _state(model: nn.Module) -> PatchState | None:
    return getattr(model, STATE_ATTR, None)


def _require_state(model: nn.Module) -> PatchState:
    state = _state(model)
    if state is None:
        raise ValueError("this model is not patched by peft_fast (call peft_fast.patch first)")
    return state


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every LoraLinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def find_targets(model: nn.Module, config: LoraConfig, among_lora_layers: bool = False) -> list[str]:
    """Names of the modules ``config`` targets; raises with close names when nothing matches.

    With ``among_lora_layers`` the candidates are the model's LoraLinear layers (add_adapter);
    otherwise every module not already inside one.
    """
    heads = output_head_names(model)
    inside = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    names = []
    unsupported = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(module, LoraLinear) != among_lora_layers:
            continue
        if among_lora_layers:
            module = module.base_layer
        if config.target_modules == "all-linear":
            chosen = is_base_linear(module) and name not in heads
        else:
            chosen = matches(name, config.target_modules)
        if (not chosen or matches(name, config.exclude_modules)
                or not layer_index_ok(name, config.layers_to_transform, config.layers_pattern)):  # fmt: skip
            continue
        if not is_base_linear(module):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        names.append(name)
    if unsupported:
        raise ValueError(
            "target_modules selects modules that are not Linear / Conv1D layers: "
            + ", ".join(unsupported[:8])
            + ("" if len(unsupported) <= 8 else f" and {len(unsupported) - 8} more")
        )
    if not names:
        filters = {key: getattr(config, key) for key in ("exclude_modules", "layers_to_transform")}
        raise no_match_error(model, config.target_modules, filters)
    return names


def _new_adapter(layer: LoraLinear, name: str, config: LoraConfig, adapter_name: str) -> None:
    layer.update_layer(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                       config.init_lora_weights, config.use_rslora)  # fmt: skip
    if config.compute_dtype is not None:
        layer.lora_A[adapter_name].to(config.compute_dtype), layer.lora_B[adapter_name].to(config.compute_dtype)


def patch_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Turn ``model`` into a LoRA (or, with ``config.quantize="nf4"``, QLoRA) model in place.

    Every target module becomes a :class:`LoraLinear` with adapter ``adapter_name``; with
    quantization every Linear except the output head is stored in NF4 first, layer by layer.
    All other parameters are frozen (biases and ``modules_to_save`` stay trainable as
    ``config`` says). Returns the same model object.
    """
    check_adapter_name(adapter_name)
    state = _state(model)
    if state is not None:
        raise ValueError(
            f"this model is already patched (adapters {list(state.configs)}); "
            f"use peft_fast.add_adapter(model, config, {adapter_name!r}) for another adapter"
        )
    targets = find_targets(model, config)
    check_modules_to_save(model, config.modules_to_save)
    state = PatchState(configs={adapter_name: config}, active=[adapter_name], quantized=config.quantize == "nf4")
    # Fix: note every GPT-2 Conv1D before NF4 quantization turns it into an NF4Linear (after which
    # the check in the loop below no longer sees it), so that merge gives back Conv1D layers.
    state.conv1d_names = conv1d_names(model)

    if config.quantize == "nf4":
        skip = tuple(output_head_names(model)) + tuple(config.modules_to_save or ())
        # Fix: like transformers + bitsandbytes, leave the model's _keep_in_fp32_modules dense (T5's
        # `wo`: its forward reads `self.wo.weight.dtype`, which an NF4 layer cannot provide).
        skip += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        quantize_model(model, blocksize=config.blocksize, double_quant=config.double_quant, skip_modules=skip)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, NF4Linear)):
            state.conv1d_names.add(name)
        layer = LoraLinear(as_linear(module))
        _new_adapter(layer, name, config, adapter_name)
        set_submodule(model, name, layer)
    _mark_trainable(model, config, adapter_name)
    setattr(model, STATE_ATTR, state)
    return model


def _mark_trainable(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for param in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
                param.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    for name, module in model.named_modules():
        if matches_modules_to_save(name, config.modules_to_save):
            untie(model, module)
            for param in module.parameters():
                param.requires_grad_(True)


def add_lora_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Add another adapter to an already patched model (on the same base; not activated)."""
    state = _require_state(model)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_adapter adds LoRA adapters: config must be a LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} exists already")
    if config.quantize != next(iter(state.configs.values())).quantize:
        raise ValueError("every adapter of a model must agree on quantize")
    # A new adapter lives on the layers the first patch wrapped; it starts inactive and frozen.
    targets = find_targets(model, config, among_lora_layers=True)
    for name in targets:
        layer = model.get_submodule(name)
        _new_adapter(layer, name, config, adapter_name)
        for param in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
            param.requires_grad_(False)
    state.configs[adapter_name] = config
    return model


def set_lora_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Make ``adapter_names`` the active adapter(s); only they are trainable."""
    state = _require_state(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {list(state.configs)}")
    for _, layer in lora_layers(model):
        layer.set_adapter([n for n in names if n in layer.lora_A])
        for adapter in layer.lora_A:
            trainable = adapter in names
            for param in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()):
                param.requires_grad_(trainable)
    state.active = names


def disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block every LoraLinear computes with its base weights only."""
    _require_state(model)
    return flags_set([layer for _, layer in lora_layers(model)], "disable_adapters", True)


def unpatch_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter and put the original modules back (NF4 bases stay NF4Linear)."""
    state = _require_state(model)
    for name, layer in list(lora_layers(model)):
        set_submodule(model, name, restore_base(layer, name in state.conv1d_names, None, None))
    delattr(model, STATE_ATTR)
    return model


def merge_lora_layers(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active adapters into the base weights of every LoraLinear and remove LoRA's state.

    An NF4 base is dequantized to ``dtype`` (default: the weight's original dtype); NF4 layers
    without an adapter are left to the caller (the merge front door dequantizes them once no
    method is left on the model).
    """
    state = _require_state(model)
    for name, layer in list(lora_layers(model)):
        merged = layer.merged_weight(dtype)
        set_submodule(model, name, restore_base(layer, name in state.conv1d_names, dtype, merged))
    delattr(model, STATE_ATTR)
    return model
