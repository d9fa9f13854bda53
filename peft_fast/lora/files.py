"""LoRA adapters in Hugging Face PEFT's files: state dict, save, load, and reloading in place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from peft_fast.config import LoraConfig
from peft_fast.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    atomic_write_files,
    check_adapter_tensors,
    module_features,
    output_directory,
    read_adapter,
)
from peft_fast.lora.patching import (
    _require_state,
    _state,
    add_lora_adapter,
    find_targets,
    lora_layers,
    patch_lora,
    set_lora_adapter,
)
from peft_fast.targeting import matches_modules_to_save

__all__ = ["adapter_state_dict", "load_lora", "model_key", "reload_in_place", "save_lora", "write_lora_files"]


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``adapter_name``, under PEFT's key names (no adapter name)."""
    config = _require_state(model).configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    if config.bias != "none":
        lora_names = {name for name, _ in lora_layers(model)}
        for name, param in model.named_parameters():
            owner = name.removesuffix(".base_layer.bias")
            if name.endswith(".bias") and (config.bias == "all" or owner in lora_names):
                out[PEFT_PREFIX + name] = param
    for name, module in model.named_modules():
        if matches_modules_to_save(name, config.modules_to_save):
            for param_name, param in module.named_parameters():
                out[f"{PEFT_PREFIX}{name}.{param_name}"] = param
    return {key: value.detach().contiguous().cpu() for key, value in out.items()}


def model_key(peft_key: str, adapter_name: str) -> str:
    """The model's parameter name for a key of a PEFT adapter file."""
    name = peft_key.removeprefix(PEFT_PREFIX)
    for part in (".lora_A.", ".lora_B."):
        name = name.replace(part, f"{part}{adapter_name}.")
    return name


def write_lora_files(model: nn.Module, directory: Path, adapter_name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter ``adapter_name``'s config and ``tensors`` (PEFT key -> tensor) into ``directory``.

    Both files are written to temporaries first and renamed into place only when both are
    complete, so an interrupted save leaves the previous adapter intact.
    """
    from safetensors.torch import save as safetensors_bytes

    config = _require_state(model).configs[adapter_name]
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config_json = json.dumps(config.to_peft_dict(base_name), indent=2, sort_keys=True, default=str) + "\n"
    weights = safetensors_bytes(tensors, metadata={"format": "pt"})
    directory = output_directory(directory)
    # Both temporaries are complete (and fsynced) before either replaces its target.
    with atomic_write_files(directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG) as (weights_file, config_file):
        weights_file.write(weights)
        config_file.write(config_json.encode())
    return directory


def save_lora(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as HF PEFT does."""
    state = _require_state(model)
    directory = output_directory(directory)
    adapter_name = adapter_name or (state.active or list(state.configs))[0]
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(state.configs)}")
    return write_lora_files(model, directory, adapter_name, adapter_state_dict(model, adapter_name))


def _peft_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Fix: with bias="all" PEFT also saves the biases inside its modules_to_save wrappers
    # (`<module>.modules_to_save.bias`, `<module>.original_module.bias`); the trained values are
    # under `<module>.bias` as well, so these copies are dropped instead of refusing the file.
    return {k: v for k, v in tensors.items() if ".modules_to_save." not in k and ".original_module." not in k}


def load_lora(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` (patching it, or adding an adapter).

    Refuses, before touching the model, an adapter whose config PEFT features we cannot run,
    whose target modules are absent, or whose tensors disagree with the model's shapes or the
    config's rank. Returns the model.
    """
    raw_config, tensors = read_adapter(directory)
    tensors = _peft_tensors(tensors)
    config = LoraConfig.from_peft_dict(raw_config)
    state = _state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if state is not None:
        config = config.replace(quantize=next(iter(state.configs.values())).quantize)
    targets = find_targets(model, config, among_lora_layers=state is not None)
    expected = _expected_adapter_shapes(model, config, targets, among_lora_layers=state is not None)
    check_adapter_tensors(tensors, expected, f"adapter at {directory}", model)
    if state is None:
        patch_lora(model, config.replace(init_lora_weights=False), adapter_name)
    else:
        add_lora_adapter(model, config.replace(init_lora_weights=False), adapter_name)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = model_key(key, adapter_name)
            params[name].copy_(tensor.to(params[name].dtype))
    set_lora_adapter(model, adapter_name)
    if not is_trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def reload_in_place(model: nn.Module, directory, adapter_name: str) -> None:
    """Copy an adapter directory's tensors into the model's existing adapter ``adapter_name``."""
    raw_config, tensors = read_adapter(directory)
    file_config = LoraConfig.from_peft_dict(raw_config)  # refuses other methods and unsupported features
    ours = _require_state(model).configs[adapter_name]
    differ = [
        f"{key}: file {getattr(file_config, key)!r}, model {getattr(ours, key)!r}"
        for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias")
        if getattr(file_config, key) != getattr(ours, key)
    ]
    if differ:
        raise ValueError(f"the adapter at {directory} does not match adapter {adapter_name!r}: {'; '.join(differ)}")
    tensors = _peft_tensors(tensors)
    expected = {key: tuple(value.shape) for key, value in adapter_state_dict(model, adapter_name).items()}
    check_adapter_tensors(tensors, expected, f"adapter at {directory}", model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[model_key(key, adapter_name)].copy_(tensor)


def _expected_adapter_shapes(model, config, targets, among_lora_layers: bool) -> dict[str, tuple | None]:
    """PEFT key -> shape for every tensor the adapter must hold (None: shape not checked)."""
    shapes: dict[str, tuple | None] = {}
    for name in targets:
        module = model.get_submodule(name)
        if among_lora_layers:
            module = module.base_layer
        out_features, in_features = module_features(module)
        rank = config.rank_for(name)
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (out_features, rank)
    target_set = set(targets)
    if config.bias != "none":
        for name, param in model.named_parameters():
            if not name.endswith(".bias"):
                continue
            owner = name.removesuffix(".base_layer.bias").removesuffix(".bias")
            if config.bias == "all" or owner in target_set:
                key = name if ".base_layer." in name or owner not in target_set else f"{owner}.base_layer.bias"
                shapes[PEFT_PREFIX + key] = tuple(param.shape)
    for name, module in model.named_modules():
        if matches_modules_to_save(name, config.modules_to_save):
            for param_name, param in module.named_parameters():
                shapes[f"{PEFT_PREFIX}{name}.{param_name}"] = tuple(param.shape)
    return shapes
