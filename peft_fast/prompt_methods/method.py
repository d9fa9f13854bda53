"""The prompt methods behind the front doors: one :class:`PromptMethod` for all four configs."""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from peft_fast.method import Method, flags_set
from peft_fast.prompt_methods.files import (
    encoder_training_tensors,
    load_prompt_adapter,
    prompt_adapter_state_dict,
    prompt_model_key,
    reload_encoder_training_tensors,
    reload_prompt_adapter,
    save_prompt_adapter,
    write_prompt_files,
)
from peft_fast.prompt_methods.patching import patch_prompt, unpatch_prompt
from peft_fast.prompt_methods.state import _CONFIGS, _STATE_ATTR, _require_state

__all__ = ["METHOD", "PromptMethod"]


class PromptMethod(Method):
    """Prompt tuning, prefix tuning, P-tuning, LLaMA-Adapter: hooks and learned prompts; one adapter; no merge."""

    name = "prompt methods"
    config_types = tuple(_CONFIGS.values())
    state_attr = _STATE_ATTR
    trainer_hooks = True

    def patch(self, model: nn.Module, config, adapter_name: str) -> None:
        patch_prompt(model, config, adapter_name)

    def adapter_names(self, model: nn.Module) -> list[str]:
        return [_require_state(model).adapter_name]

    def active_adapters(self, model: nn.Module) -> list[str]:
        state = _require_state(model)
        return [] if state.disabled else [state.adapter_name]

    def set_adapter(self, model: nn.Module, adapter_names: list[str]) -> None:
        state = _require_state(model)
        state.disabled = state.adapter_name not in adapter_names

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return flags_set([_require_state(model)], "disabled", True)

    def merge(self, model: nn.Module, dtype) -> None:
        raise ValueError(
            f"{_require_state(model).config.peft_type} adapters cannot be merged into the base weights "
            "(a prompt method adds inputs, not weights)"
        )

    def unpatch(self, model: nn.Module) -> None:
        unpatch_prompt(model)

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict:
        return prompt_adapter_state_dict(model)

    def reads(self, adapter_config: dict) -> bool:
        return adapter_config.get("peft_type") in _CONFIGS

    def save(self, model: nn.Module, directory: Path, adapter_name: str) -> Path:
        return save_prompt_adapter(model, directory)

    def load(self, model: nn.Module, directory, adapter_name: str | None, is_trainable: bool):
        return load_prompt_adapter(model, directory, adapter_name or "default", is_trainable)

    def model_key(self, model: nn.Module, file_key: str, adapter_name: str) -> str | None:
        return prompt_model_key(file_key)

    def save_tensors(self, model: nn.Module, directory: Path, adapter_name: str, tensors: dict) -> Path:
        return write_prompt_files(model, directory, tensors)

    def reload(self, model: nn.Module, directory, adapter_name: str) -> None:
        reload_prompt_adapter(model, directory)

    def training_tensors(self, model: nn.Module, adapter_name: str) -> dict:
        return encoder_training_tensors(model)

    def reload_training_tensors(self, model: nn.Module, directory, adapter_name: str, tensors: dict) -> None:
        reload_encoder_training_tensors(model, directory, tensors)


METHOD = PromptMethod()
