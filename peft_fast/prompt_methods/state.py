"""The prompt methods' configs as one type, and the adapter's state kept on the model.

Here rather than in ``base`` because the state names the four configs, whose modules import
``base`` (its checks and the prompt encoder): ``base`` <- the configs <- ``state`` <- ``patching``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peft_fast.host import register_state_attr
from peft_fast.prompt_methods.base import PromptEncoder
from peft_fast.prompt_methods.llama_adapter import AdaptionPromptConfig
from peft_fast.prompt_methods.p_tuning import PromptEncoderConfig
from peft_fast.prompt_methods.prefix_tuning import PrefixTuningConfig
from peft_fast.prompt_methods.prompt_tuning import PromptTuningConfig

PromptConfig = PromptTuningConfig | PrefixTuningConfig | PromptEncoderConfig | AdaptionPromptConfig
# The configs by the peft_type of their adapter_config.json.
_CONFIGS = {c.peft_type: c for c in (PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, AdaptionPromptConfig)}
# The submodule holding our state (and the prompt parameters).
_STATE_ATTR = register_state_attr("peft_fast_prompt")


class _PromptState(nn.Module):
    """Registered on the model as ``peft_fast_prompt``: config, encoder (if any), hooks."""

    def __init__(self, config: PromptConfig, adapter_name: str, encoder: PromptEncoder | None) -> None:
        super().__init__()
        self.config = config
        self.adapter_name = adapter_name
        self.encoder = encoder
        self.hooks: list[Any] = []
        self.requires_grad_before: dict[str, bool] = {}
        self.attention_names: list[str] = []
        self.checkpoint_layers: list[nn.Module] = []
        self.forward_parameters: list[str] = []
        self.geometry: dict[str, int] = {}


def _state(model: nn.Module) -> _PromptState | None:
    return getattr(model, _STATE_ATTR, None)


def _require_state(model: nn.Module) -> _PromptState:
    state = _state(model)
    if state is None:
        raise ValueError("the model has no prompt adapter (call patch_prompt or load_prompt_adapter first)")
    return state
