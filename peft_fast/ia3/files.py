"""(IA)³ adapters in Hugging Face PEFT's files: state dict, save, load (a new or an added adapter), reload in place.

Key names are PEFT 0.21's: ``base_model.model.<layer>.ia3_l`` for a vector (no adapter name), and
a module of ``modules_to_save`` under its own names, ``base_model.model.<module>.<param>`` (PEFT's
``ModulesToSaveWrapper`` drops its ``modules_to_save.<adapter>.`` part when saving and puts it
back when loading).
"""

from __future__ import annotations

import os
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
from peft_fast.config import IA3Config
from peft_fast.ia3.patching import (
    STATE_ATTR,
    IA3Linear,
    add_ia3_adapter,
    find_ia3_targets,
    ia3_layers,
    patch_ia3,
    require_state,
    resolved,
)
from peft_fast.targeting import modules_to_save_names

__all__ = ["ia3_state_dict", "load_ia3", "model_key", "reload_ia3", "save_ia3", "write_ia3_files"]

# Settings a file must share with the adapter it is reloaded into (a resume restores, it does not re-target).
_RELOAD_FIELDS = ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save")


def _adapter(model: nn.Module, adapter_name: str | None) -> str:
    state = require_state(model)
    adapter_name = adapter_name or (state.active or list(state.configs))[0]
    if adapter_name not in state.configs:
        raise ValueError(f"unknown (IA)³ adapter {adapter_name!r}; the model has {list(state.configs)}")
    return adapter_name


def _module_tensors(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """PEFT key -> parameter of each modules_to_save copy of ``adapter_name`` (in place or not)."""
    state = require_state(model)
    out = {}
    for name, copies in state.trained_modules.items():
        if adapter_name in copies:
            for param_name, param in copies[adapter_name].named_parameters():
                out[f"{PEFT_PREFIX}{name}.{param_name}"] = param
    return out


def ia3_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for (IA)³ adapter ``adapter_name`` (default: the first active), under PEFT's keys."""
    adapter_name = _adapter(model, adapter_name)
    out = {
        f"{PEFT_PREFIX}{name}.ia3_l": layer.ia3_l[adapter_name]
        for name, layer in ia3_layers(model)
        if adapter_name in layer.ia3_l
    }
    out.update(_module_tensors(model, adapter_name))
    return {key: value.detach().contiguous().cpu() for key, value in out.items()}


def model_key(model: nn.Module, file_key: str, adapter_name: str) -> str | None:
    """The model's parameter name for ``file_key`` of adapter ``adapter_name``'s file; None for a
    modules_to_save copy that is not in the model now (another adapter's copy is in place)."""
    name = file_key.removeprefix(PEFT_PREFIX)
    if name.endswith(".ia3_l"):
        return f"{name}.{adapter_name}"
    state = require_state(model)
    for module_name, copies in state.trained_modules.items():
        if name.startswith(module_name + "."):
            in_place = copies.get(adapter_name) is model.get_submodule(module_name)
            return name if in_place else None
    return name


def write_ia3_files(model: nn.Module, directory: Path, adapter_name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write adapter ``adapter_name``'s config and ``tensors`` (PEFT key -> tensor) as one pair, as PEFT does.

    :func:`peft_fast.adapter_files.write_adapter_pair`: both complete before either is renamed, the
    config's digest in the weights' metadata, under the directory's lock.
    """
    state = require_state(model)
    model_config = getattr(model, "config", None)
    document = state.configs[adapter_name].to_peft_dict(getattr(model_config, "_name_or_path", None) or None)
    # PEFT sets fan_in_fan_out when it wraps a Conv1D (GPT-2), and writes the config as it left it
    # (True for a Conv1D, False for a Linear: the last wrapped layer's).
    for name, layer in ia3_layers(model):
        if adapter_name in layer.ia3_l:
            document["fan_in_fan_out"] = name in state.conv1d_names
    return write_adapter_pair(output_directory(directory), ADAPTER_WEIGHTS, tensors, document)


def save_ia3(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of an (IA)³ adapter as PEFT 0.21 does.

    ``adapter_name`` defaults to the first active adapter. Into ``directory`` itself (PEFT's
    ``save_pretrained`` puts a non-default adapter in ``directory/<name>/``: ``model.save_pretrained``
    does that here too).
    """
    adapter_name = _adapter(model, adapter_name)
    return write_ia3_files(model, Path(directory), adapter_name, ia3_state_dict(model, adapter_name))


def _expected_shapes(model: nn.Module, config: IA3Config, adding: bool) -> dict[str, tuple]:
    expected = {}
    for name, is_feedforward in find_ia3_targets(model, config, adding):
        module = model.get_submodule(name)
        out_features, in_features = module_features(module.base_layer if isinstance(module, IA3Linear) else module)
        expected[f"{PEFT_PREFIX}{name}.ia3_l"] = (1, in_features) if is_feedforward else (out_features, 1)
    for name in modules_to_save_names(model, config.modules_to_save):
        state = getattr(model, STATE_ATTR, None)
        module = state.original_modules[name] if state is not None and name in state.original_modules else None
        for param_name, param in (module or model.get_submodule(name)).named_parameters():
            expected[f"{PEFT_PREFIX}{name}.{param_name}"] = tuple(param.shape)
    return expected


def load_ia3(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load an (IA)³ adapter saved by PEFT (or by :func:`save_ia3`) into ``model``.

    On a model without (IA)³ this patches it (the adapter active); on one with (IA)³ adapters it
    adds ``adapter_name`` (inactive, as PEFT's ``load_adapter``); an existing name is reloaded in
    place (:func:`reload_ia3`). Refuses, before touching the model, a config we cannot run, targets
    the model lacks, and tensors that are missing, unexpected or of the wrong shape. The adapter's
    tensors train only with ``is_trainable`` (and while it is active). Returns the model.
    """
    state = getattr(model, STATE_ATTR, None)
    if state is not None and adapter_name in state.configs:
        reload_ia3(model, directory, adapter_name)
        return model
    files = read_adapter_files(directory)
    config = resolved(model, IA3Config.from_peft_dict(files.config))
    if state is not None:
        first = next(iter(state.configs.values()))
        config = config.replace(quantize=first.quantize, blocksize=first.blocksize, double_quant=first.double_quant)
    check_adapter_tensors(files.tensors, _expected_shapes(model, config, state is not None),
                          f"(IA)³ adapter at {directory}", model)  # fmt: skip
    files.check_written_together()  # an interrupted or concurrent save: refused before the model changes
    if state is None:
        patch_ia3(model, config, adapter_name)
    else:
        add_ia3_adapter(model, config, adapter_name)
    _copy_in(model, files.tensors, adapter_name)
    if not is_trainable:
        for param in _adapter_parameters(model, adapter_name):
            param.requires_grad_(False)
    return model


def _adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    vectors = [layer.ia3_l[adapter_name] for _, layer in ia3_layers(model) if adapter_name in layer.ia3_l]
    return vectors + list(_module_tensors(model, adapter_name).values())


def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    targets = {f"{PEFT_PREFIX}{name}.ia3_l": layer.ia3_l[adapter_name]
               for name, layer in ia3_layers(model) if adapter_name in layer.ia3_l}  # fmt: skip
    targets.update(_module_tensors(model, adapter_name))
    with torch.no_grad():
        for key, tensor in tensors.items():
            targets[key].copy_(tensor.to(targets[key].dtype))


def reload_ia3(model: nn.Module, directory: str | os.PathLike, adapter_name: str) -> None:
    """Copy an (IA)³ directory's tensors into the model's existing adapter ``adapter_name``, in place.

    The file must be this adapter's (same targets, feed-forward modules and modules_to_save, same
    shapes); which adapters are active and trainable stays as it was (what a resume needs).
    """
    files = read_adapter_files(directory)
    ours = require_state(model).configs[adapter_name]
    theirs = resolved(model, IA3Config.from_peft_dict(files.config))
    differ = [
        f"{key}: file {getattr(theirs, key)!r}, model {getattr(ours, key)!r}"
        for key in _RELOAD_FIELDS
        if getattr(theirs, key) != getattr(ours, key)
    ]
    if differ:
        raise ValueError(f"the adapter at {directory} does not match adapter {adapter_name!r}: {'; '.join(differ)}")
    expected = {key: tuple(value.shape) for key, value in ia3_state_dict(model, adapter_name).items()}
    check_adapter_tensors(files.tensors, expected, f"(IA)³ adapter at {directory}", model)
    files.check_written_together()
    _copy_in(model, files.tensors, adapter_name)
