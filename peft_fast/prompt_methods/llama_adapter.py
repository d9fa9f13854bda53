"""LLaMA-Adapter: its config, the gated prompt attention and the forward hook on the attention modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_fast.models import FAMILIES
from peft_fast.prompt_methods.base import _check_positive

# PEFT's Llama-family list for adaption prompts (the model table's adaption_prompt rows).
_ADAPTION_MODEL_TYPES = tuple(t for family in FAMILIES if family.adaption_prompt for t in family.model_types)


@dataclass
class AdaptionPromptConfig:
    """LLaMA-Adapter: ``adapter_len`` learned prompt vectors in the top ``adapter_layers`` attentions."""

    adapter_len: int = 10
    adapter_layers: int = 1
    target_modules: str = "self_attn"
    task_type: str = "CAUSAL_LM"

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    def __post_init__(self) -> None:
        _check_positive("adapter_len", self.adapter_len)
        _check_positive("adapter_layers", self.adapter_layers)
        if not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules must be the name of the attention modules, got {self.target_modules!r}")


def adaption_prompt_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``gate · softmax(q·kᵀ/√d) · v`` over the adapter prompt, [batch, heads, q_len, head_dim].

    ``key`` / ``value`` are [1 or batch, kv_heads, adapter_len, head_dim] (grouped-query heads are
    shared as in ``repeat_interleave``). No mask: every query sees the whole prompt. This is one
    ``scaled_dot_product_attention`` call, a fused kernel on GPU (flash / memory-efficient) and a
    single pass on CPU; the gate is applied to the [.., head_dim] output rather than to the
    probabilities, which is the same product and touches head_dim/adapter_len fewer elements.
    """
    batch = query.shape[0]
    key = key.to(query.dtype).expand(batch, -1, -1, -1)
    value = value.to(query.dtype).expand(batch, -1, -1, -1)
    grouped = key.shape[1] != query.shape[1]
    out = F.scaled_dot_product_attention(query, key, value, enable_gqa=grouped)
    return gate.to(query.dtype) * out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _adaption_hook(attention: nn.Module, args: tuple, kwargs: dict, output):
    state = getattr(attention, "_peft_fast_adaption", None)
    if state is None or state.disabled:
        return output
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    attn_out, *rest = output
    batch, q_len, _ = hidden.shape
    g = state.geometry
    head_dim = getattr(attention, "head_dim", g["head_dim"])
    query = attention.q_proj(hidden).view(batch, q_len, -1, head_dim).transpose(1, 2)
    if kwargs.get("position_embeddings") is None:
        raise RuntimeError("LLaMA-Adapter needs the rotary position_embeddings the decoder layer passes")
    cos, sin = kwargs["position_embeddings"]
    # Queries are rotated as in the attention itself; the prompt keys are position-free.
    query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
    prompt = attention.adaption_prompt.to(hidden.dtype)  # [1, adapter_len, hidden]
    adapter_len = prompt.shape[1]
    key = attention.k_proj(prompt).view(1, adapter_len, -1, head_dim).transpose(1, 2)
    value = attention.v_proj(prompt).view(1, adapter_len, -1, head_dim).transpose(1, 2)
    mixed = adaption_prompt_attention(query, key, value, attention.adaption_gate)
    mixed = mixed.transpose(1, 2).reshape(batch, q_len, -1)
    return (attn_out + attention.o_proj(mixed).to(attn_out.dtype), *rest)


def _attention_targets(model: nn.Module, config: AdaptionPromptConfig) -> list[str]:
    modules = [(name, m) for name, m in model.named_modules() if name.split(".")[-1] == config.target_modules]
    if len(modules) < config.adapter_layers:
        raise ValueError(
            f"adapter_layers={config.adapter_layers} but the model has {len(modules)} '{config.target_modules}' modules"
        )
    # The adaption hook runs the module's own q/k/v/o projections: anything else failed in forward.
    modules = modules[-config.adapter_layers :]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    not_attention = [f"{n} ({type(m).__name__})" for n, m in modules if not all(hasattr(m, p) for p in projections)]
    if not_attention:
        raise ValueError(
            f"target_modules={config.target_modules!r} names modules without {'/'.join(projections)}: "
            f"{', '.join(not_attention[:4])}; LLaMA-Adapter goes into the attention modules ('self_attn')"
        )
    return [name for name, _ in modules]
