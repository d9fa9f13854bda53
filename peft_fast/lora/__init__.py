"""LoRA / QLoRA, the method: :class:`LoraMethod` over ``patching`` (layers in and out) and ``files`` (PEFT's files)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from peft_fast.config import LoraConfig
from peft_fast.lora.files import (
    adapter_state_dict,
    load_lora,
    model_key,
    reload_in_place,
    save_lora,
    write_lora_files,
)
from peft_fast.lora.patching import (
    STATE_ATTR,
    PatchState,
    _require_state,
    add_lora_adapter,
    disabled,
    find_targets,
    lora_layers,
    merge_lora_layers,
    patch_lora,
    set_lora_adapter,
    unpatch_lora,
)
from peft_fast.method import Method

__all__ = [
    "METHOD",
    "LoraMethod",
    "PatchState",
    "adapter_state_dict",
    "find_targets",
    "load_lora",
    "lora_layers",
    "reload_in_place",
    "save_lora",
]


class LoraMethod(Method):
    """LoRA and QLoRA (LoraConfig): LoraLinear layers around the targets; several adapters; merges."""

    name = "LoRA"
    config_types = (LoraConfig,)
    state_attr = STATE_ATTR
    mergeable = True
    stacks = True
    trainer_hooks = True

    def patch(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        patch_lora(model, config, adapter_name)

    def add_adapter(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        add_lora_adapter(model, config, adapter_name)

    def adapter_names(self, model: nn.Module) -> list[str]:
        return list(_require_state(model).configs)

    def active_adapters(self, model: nn.Module) -> list[str]:
        return list(_require_state(model).active)

    def set_adapter(self, model: nn.Module, adapter_names: list[str]) -> None:
        set_lora_adapter(model, adapter_names)

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return disabled(model)

    def merge(self, model: nn.Module, dtype) -> None:
        merge_lora_layers(model, dtype)

    def unpatch(self, model: nn.Module) -> None:
        unpatch_lora(model)

    def conv1d_names(self, model: nn.Module) -> set[str]:
        return set(_require_state(model).conv1d_names)

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict:
        return adapter_state_dict(model, adapter_name)

    def reads(self, adapter_config: dict) -> bool:
        return adapter_config.get("peft_type") == "LORA"

    def save(self, model: nn.Module, directory: Path, adapter_name: str) -> Path:
        return save_lora(model, directory, adapter_name)

    def load(self, model: nn.Module, directory, adapter_name: str | None, is_trainable: bool):
        return load_lora(model, directory, adapter_name or "default", is_trainable)

    def model_key(self, model: nn.Module, file_key: str, adapter_name: str) -> str:
        return model_key(file_key, adapter_name)

    def save_tensors(self, model: nn.Module, directory: Path, adapter_name: str, tensors: dict) -> Path:
        return write_lora_files(model, directory, adapter_name, tensors)

    def reload(self, model: nn.Module, directory, adapter_name: str) -> None:
        reload_in_place(model, directory, adapter_name)


METHOD = LoraMethod()
