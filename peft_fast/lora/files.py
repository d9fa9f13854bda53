"""LoRA adapters in Hugging Face PEFT's files: state dict, save, load, and reloading in place."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from peft_fast.adapter_files import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    check_adapter_tensors,
    module_features,
    output_directory,
    read_adapter_files,
    write_adapter_pair,
)
from peft_fast.config import LoraConfig
from peft_fast.layers import LoraEmbedding, LoraLayer, LoraLinear, LoraParamWrapper
from peft_fast.lora.init import is_base_init
from peft_fast.lora.parameters import find_parameter_targets, parameter_wrapper_names
from peft_fast.lora.patching import (
    _require_state,
    _state,
    _token_targets,
    add_lora_adapter,
    find_targets,
    lora_layers,
    patch_lora,
    set_lora_adapter,
)
from peft_fast.lora.tokens import token_wrappers
from peft_fast.targeting import matches, matches_modules_to_save

__all__ = ["adapter_state_dict", "load_lora", "model_key", "reload_in_place", "save_lora", "write_lora_files"]


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``adapter_name``, under PEFT's key names (no adapter name)."""
    config = _require_state(model).configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for suffix, tensor in layer.adapter_tensors(adapter_name).items():
                out[f"{PEFT_PREFIX}{name}.{suffix}"] = tensor
            if isinstance(layer, LoraEmbedding) and _saves_embedding_base(model, config):
                # PEFT's save_embedding_layers="auto": the base weight of a targeted embedding too.
                out[f"{PEFT_PREFIX}{name}.base_layer.weight"] = layer.base_layer.weight
    for name, wrapper in token_wrappers(model):  # a tied head's rows are its embedding's: not saved, as PEFT
        layer = wrapper.token_adapter
        if not layer.tied and adapter_name in layer.token_indices:
            out[f"{PEFT_PREFIX}{name}.{_TOKENS_DELTA}"] = layer.trainable_tokens_delta[adapter_name]
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


_TOKENS_DELTA = "token_adapter.trainable_tokens_delta"  # PEFT's key of a trainable-tokens wrapper's rows


def _saves_embedding_base(model: nn.Module, config: LoraConfig) -> bool:
    """PEFT's save_embedding_layers="auto" rule: the targets name ``embed_tokens`` / ``lm_head`` (a
    list entry, or a regex matching a module so named), unless the adapter has trainable_token_indices."""
    if config.trainable_token_indices is not None:
        return False
    names = ("embed_tokens", "lm_head")
    if isinstance(config.target_modules, list):
        return any(name in config.target_modules for name in names)
    return any(matches(module, config.target_modules) for module, _ in model.named_modules()
               if any(re.match(rf"(.*\.)?{name}$", module) for name in names))  # fmt: skip


def model_key(peft_key: str, adapter_name: str) -> str:
    """The model's parameter name for a key of a PEFT adapter file."""
    name = peft_key.removeprefix(PEFT_PREFIX)
    for part in (".lora_A.", ".lora_B."):
        name = name.replace(part, f"{part}{adapter_name}.")
    for part in (".lora_embedding_A", ".lora_embedding_B"):  # an embedding's adapter is a bare parameter
        if name.endswith(part):
            name = f"{name}.{adapter_name}"
    if name.endswith("." + _TOKENS_DELTA):  # PEFT's file drops the adapter name
        name = f"{name}.{adapter_name}"
    if name.endswith(".lora_magnitude_vector"):  # DoRA: PEFT's file drops the adapter name and ".weight"
        name = f"{name}.{adapter_name}.weight"
    return name


def write_lora_files(model: nn.Module, directory: Path, adapter_name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter ``adapter_name``'s config and ``tensors`` (PEFT key -> tensor) into ``directory``.

    One pair (:func:`peft_fast.adapter_files.write_adapter_pair`): both complete before either is renamed,
    the config's digest in the weights' metadata, under the directory's lock.
    """
    state = _require_state(model)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    document = state.configs[adapter_name].to_peft_dict(base_name)
    # PEFT rewrites fan_in_fan_out as it wraps each layer (True for a Conv1D, False for a Linear) and
    # writes the config as the last wrapped layer left it.
    for name, layer in lora_layers(model):
        if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
            document["fan_in_fan_out"] = name in state.conv1d_names
    return write_adapter_pair(output_directory(directory), ADAPTER_WEIGHTS, tensors, document)


def save_lora(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as HF PEFT does."""
    state = _require_state(model)
    directory = output_directory(directory)
    adapter_name = adapter_name or (state.active or list(state.configs))[0]
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(state.configs)}")
    return write_lora_files(model, directory, adapter_name, adapter_state_dict(model, adapter_name))


def _peft_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT file's tensors without the copies inside its modules_to_save wrappers.

    With bias="all" PEFT also saves the biases inside those wrappers (``<module>.modules_to_save.bias``,
    ``<module>.original_module.bias``); the trained values are under ``<module>.bias`` as well, so the
    copies are dropped rather than refusing the file.
    """
    return {k: v for k, v in tensors.items() if ".modules_to_save." not in k and ".original_module." not in k}


def load_lora(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format LoRA adapter into ``model`` (patching it, or adding an adapter).

    Refuses, before touching the model, an adapter whose config PEFT features we cannot run,
    whose target modules are absent, or whose tensors disagree with the model's shapes or the
    config's rank. Returns the model.
    """
    files = read_adapter_files(directory)
    raw_config, tensors = files.config, _peft_tensors(files.tensors)
    config = LoraConfig.from_peft_dict(raw_config)
    state = _state(model)
    if state is not None and adapter_name in state.configs:
        # PEFT's load_adapter into an existing name loads the weights into it (a resume does this);
        # the file must match the adapter's rank and scaling. Active adapters stay as they are.
        reload_in_place(model, directory, adapter_name)
        if not is_trainable:
            for param in model.parameters():
                param.requires_grad_(False)
        return model
    if state is not None:
        config = config.replace(quantize=next(iter(state.configs.values())).quantize)
    targets = find_targets(model, config)
    expected = _expected_adapter_shapes(model, config, targets)
    expected.update(_expected_parameter_shapes(model, config, targets))
    tensors, embedding_bases = _split_embedding_bases(tensors, _embedding_base_shapes(model, targets), directory)
    check_adapter_tensors(tensors, expected, f"adapter at {directory}", model)
    files.check_written_together()  # an interrupted or concurrent save: refused before the model changes
    tensors = {**tensors, **embedding_bases}
    # The file's A and B overwrite the initialisation, so it is skipped; except PiSSA / OLoRA / LoftQ,
    # whose initialisation also makes the base its residual: PEFT runs it again when it loads such
    # an adapter onto the original base, and so does this.
    init = config.init_lora_weights if is_base_init(config.init_lora_weights) else False
    if state is None:
        patch_lora(model, config.replace(init_lora_weights=init), adapter_name)
    else:
        add_lora_adapter(model, config.replace(init_lora_weights=init), adapter_name)
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


# What a file reloaded into an existing adapter must agree on with it.
_MUST_AGREE = ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "bias",
               "trainable_token_indices")  # fmt: skip


def reload_in_place(model: nn.Module, directory, adapter_name: str) -> None:
    """Copy an adapter directory's tensors into the model's existing adapter ``adapter_name``."""
    files = read_adapter_files(directory)
    raw_config, tensors = files.config, files.tensors
    file_config = LoraConfig.from_peft_dict(raw_config)  # refuses other methods and unsupported features
    ours = _require_state(model).configs[adapter_name]
    differ = [
        f"{key}: file {getattr(file_config, key)!r}, model {getattr(ours, key)!r}"
        for key in _MUST_AGREE
        if getattr(file_config, key) != getattr(ours, key)
    ]
    if set(file_config.target_parameters or ()) != set(ours.target_parameters or ()):
        differ.append(f"target_parameters: file {file_config.target_parameters!r}, model {ours.target_parameters!r}")
    if differ:
        raise ValueError(f"the adapter at {directory} does not match adapter {adapter_name!r}: {'; '.join(differ)}")
    tensors = _peft_tensors(tensors)
    expected = {key: tuple(value.shape) for key, value in adapter_state_dict(model, adapter_name).items()}
    optional = {key: expected.pop(key) for key in list(expected) if key.endswith(".base_layer.weight")
                and isinstance(model.get_submodule(key.removeprefix(PEFT_PREFIX).removesuffix(".base_layer.weight")),
                               LoraEmbedding)}  # fmt: skip
    tensors, embedding_bases = _split_embedding_bases(tensors, optional, directory)
    check_adapter_tensors(tensors, expected, f"adapter at {directory}", model)
    files.check_written_together()
    tensors = {**tensors, **embedding_bases}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[model_key(key, adapter_name)].copy_(tensor)


def _embedding_base_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple]:
    """PEFT key -> shape of each targeted embedding's base weight (a PEFT file may hold it, or not)."""
    shapes = {}
    for name in targets:
        module = model.get_submodule(name)
        module = module.base_layer if isinstance(module, LoraEmbedding) else module
        if isinstance(module, nn.Embedding):
            shapes[f"{PEFT_PREFIX}{name}.base_layer.weight"] = tuple(module.weight.shape)
    return shapes


def _split_embedding_bases(tensors: dict, shapes: dict, directory) -> tuple[dict, dict]:
    """(the other tensors, the embedding base weights present), the latter checked against ``shapes``."""
    bases = {key: tensors[key] for key in shapes if key in tensors}
    wrong = [f"{key}: file has {tuple(t.shape)}, model needs {shapes[key]}" for key, t in bases.items()
             if tuple(t.shape) != shapes[key]]  # fmt: skip
    if wrong:
        raise ValueError(f"adapter at {directory}: {'; '.join(wrong[:4])}")
    return {key: t for key, t in tensors.items() if key not in bases}, bases


def _expected_parameter_shapes(model, config, targets) -> dict[str, tuple]:
    """PEFT key -> shape of each targeted parameter's A [E·r, in] and B [out, E·r], under its wrapper's name."""
    param_targets = find_parameter_targets(model, config, targets)
    shapes = {}
    for (owner, param_name), name in parameter_wrapper_names(model, param_targets).items():
        module = model.get_submodule(owner)
        module = module.owner if isinstance(module, LoraParamWrapper) else module
        # The wrapper's own arithmetic for in / out / experts, on a throw-away instance (no adapter, nothing set).
        probe = LoraParamWrapper(module, param_name)
        width = config.rank_for(f"{owner}.{param_name}") * probe.num_experts
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (width, probe.in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (probe.out_features, width)
    return shapes


def _expected_adapter_shapes(model, config, targets) -> dict[str, tuple | None]:
    """PEFT key -> shape for every tensor the adapter must hold (None: shape not checked)."""
    shapes: dict[str, tuple | None] = {}
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoraLayer):
            module = module.base_layer
        rank = config.rank_for(name)
        if isinstance(module, nn.Embedding):
            shapes[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = (rank, module.num_embeddings)
            shapes[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = (module.embedding_dim, rank)
            continue
        out_features, in_features = module_features(module)
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (out_features, rank)
        if config.lora_bias:
            shapes[f"{PEFT_PREFIX}{name}.lora_B.bias"] = (out_features,)
        if config.use_dora:
            shapes[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = (out_features,)
    for name, indices in _token_targets(model, config, targets)[0].items():
        module = model.get_submodule(name)
        weight = getattr(module, "base_layer", module).weight
        shapes[f"{PEFT_PREFIX}{name}.{_TOKENS_DELTA}"] = (len(indices), weight.shape[1])
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
