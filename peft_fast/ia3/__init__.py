"""(IA)³, the method: :class:`IA3Method` over ``patching`` (layers, adapters, modules_to_save) and ``files``."""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from peft_fast.config import IA3Config
from peft_fast.ia3.files import ia3_state_dict, load_ia3, model_key, reload_ia3, save_ia3, write_ia3_files
from peft_fast.ia3.patching import (
    STATE_ATTR,
    IA3Linear,
    IA3State,
    add_ia3_adapter,
    disabled,
    find_ia3_targets,
    fold_ia3,
    ia3_layers,
    merge_ia3,
    patch_ia3,
    require_state,
    set_ia3_adapter,
    unpatch_ia3,
)
from peft_fast.method import Method

__all__ = [
    "METHOD",
    "IA3Linear",
    "IA3Method",
    "IA3State",
    "add_ia3_adapter",
    "find_ia3_targets",
    "ia3_layers",
    "ia3_state_dict",
    "load_ia3",
    "merge_ia3",
    "patch_ia3",
    "reload_ia3",
    "save_ia3",
    "set_ia3_adapter",
    "unpatch_ia3",
]


class IA3Method(Method):
    """(IA)³ (IA3Config): IA3Linear layers around the targets; several adapters (vectors multiply); merges."""

    name = "(IA)³"
    config_types = (IA3Config,)
    state_attr = STATE_ATTR
    mergeable = True
    stacks = True
    trainer_hooks = True

    def patch(self, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        patch_ia3(model, config, adapter_name)

    def add_adapter(self, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        add_ia3_adapter(model, config, adapter_name)

    def adapter_names(self, model: nn.Module) -> list[str]:
        return list(require_state(model).configs)

    def active_adapters(self, model: nn.Module) -> list[str]:
        return list(require_state(model).active)

    def set_adapter(self, model: nn.Module, adapter_names: list[str]) -> None:
        set_ia3_adapter(model, adapter_names)

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return disabled(model)

    def merge(self, model: nn.Module, dtype) -> None:
        fold_ia3(model, dtype)

    def unpatch(self, model: nn.Module) -> None:
        unpatch_ia3(model)

    def conv1d_names(self, model: nn.Module) -> set[str]:
        return set(require_state(model).conv1d_names)

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict:
        return ia3_state_dict(model, adapter_name)

    def reads(self, adapter_config: dict) -> bool:
        return adapter_config.get("peft_type") == "IA3"

    def save(self, model: nn.Module, directory: Path, adapter_name: str) -> Path:
        return save_ia3(model, directory, adapter_name)

    def load(self, model: nn.Module, directory, adapter_name: str | None, is_trainable: bool):
        return load_ia3(model, directory, adapter_name or "default", is_trainable)

    def model_key(self, model: nn.Module, file_key: str, adapter_name: str) -> str | None:
        return model_key(model, file_key, adapter_name)

    def save_tensors(self, model: nn.Module, directory: Path, adapter_name: str, tensors: dict) -> Path:
        return write_ia3_files(model, directory, adapter_name, tensors)

    def reload(self, model: nn.Module, directory, adapter_name: str) -> None:
        reload_ia3(model, directory, adapter_name)


METHOD = IA3Method()
