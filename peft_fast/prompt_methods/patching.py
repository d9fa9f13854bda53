"""Inserting a prompt method into a model: the forward pre-hook, patch / unpatch / disable."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from peft_fast.prompt_methods.base import (
    PromptEncoder,
    _cache_kwarg,
    _forward_parameters,
    _geometry,
    _positions_from_mask,
)
from peft_fast.prompt_methods.llama_adapter import (
    _ADAPTION_MODEL_TYPES,
    AdaptionPromptConfig,
    _adaption_hook,
    _attention_targets,
)
from peft_fast.prompt_methods.p_tuning import PromptEncoderConfig
from peft_fast.prompt_methods.prefix_tuning import PrefixTuningConfig, _prefix_cache
from peft_fast.prompt_methods.prompt_tuning import PromptTuningConfig, _text_init
from peft_fast.prompt_methods.state import _CONFIGS, _STATE_ATTR, PromptConfig, _PromptState, _require_state, _state


def _pre_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state = _state(model)
    if state is None or state.disabled:
        return args, kwargs
    kwargs = dict(kwargs)
    for name, value in zip(state.forward_parameters, args, strict=False):
        if name in kwargs:
            raise TypeError(f"{name} given positionally and by keyword")
        kwargs[name] = value
    config = state.config
    n = 0 if isinstance(config, AdaptionPromptConfig) else config.num_virtual_tokens
    cache_key = _cache_kwarg(state.forward_parameters)
    cache = kwargs.pop("past_key_values", None) if cache_key == "cache" else None
    cache = kwargs.get(cache_key) if kwargs.get(cache_key) is not None else cache
    first = cache is None or cache.get_seq_length() == 0
    input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if input_ids is None and embeds is None:
        raise ValueError("prompt methods need input_ids or inputs_embeds")
    batch, length = (input_ids if embeds is None else embeds).shape[:2]
    device = (input_ids if embeds is None else embeds).device
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    prompt_style = config.peft_type in ("PROMPT_TUNING", "P_TUNING")
    prefix_style = config.peft_type == "PREFIX_TUNING"

    if prompt_style and first:
        if embeds is None:
            embeds = model.get_input_embeddings()(input_ids)
        prompts = state.encoder().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        kwargs["input_ids"] = None
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        length += n
    if prefix_style and first:
        dtype = embeds.dtype if embeds is not None else model.get_input_embeddings().weight.dtype
        # A training step without a caller cache gets a read-only prefix (safe to recompute).
        read_only = cache is None and model.training and torch.is_grad_enabled()
        kwargs[cache_key] = _prefix_cache(state, batch, dtype, cache, read_only)
    elif cache is not None:
        kwargs[cache_key] = cache

    if mask is not None and mask.dim() == 2 and n:
        mask = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        kwargs["attention_mask"] = mask
    if "position_ids" in state.forward_parameters:
        if positions is not None:
            positions = positions + n
            if prompt_style and first:
                virtual = torch.arange(n, device=positions.device, dtype=positions.dtype)
                positions = torch.cat([virtual.expand(positions.shape[0], -1), positions], dim=-1)
            kwargs["position_ids"] = positions
        elif mask is not None and mask.dim() == 2:
            kwargs["position_ids"] = _positions_from_mask(mask, length).to(device)
    return (), kwargs


# -- patch / unpatch ---------------------------------------------------------------------------


def _build_encoder(model: nn.Module, config: PromptConfig, geometry: dict[str, int], loaded: bool) -> PromptEncoder:
    n, hidden = config.num_virtual_tokens, geometry["hidden"]
    if isinstance(config, PrefixTuningConfig):
        # PEFT's prefix geometry: token_dim is the per-layer KV width (kv_heads · head_dim under GQA).
        token_dim = geometry["kv_heads"] * geometry["head_dim"]
        dim = geometry["layers"] * 2 * token_dim
        if config.prefix_projection and not loaded:
            width = config.encoder_hidden_size or token_dim  # PEFT's default width
            return PromptEncoder(n, dim, "prefix_mlp", token_dim=token_dim, hidden=width)
        return PromptEncoder(n, dim)
    if isinstance(config, PromptEncoderConfig) and not loaded:
        width = config.encoder_hidden_size or hidden
        return PromptEncoder(
            n,
            hidden,
            config.encoder_reparameterization_type,
            hidden=width,
            lstm_layers=config.encoder_num_layers,
            dropout=config.encoder_dropout,
        )
    encoder = PromptEncoder(n, hidden)
    if isinstance(config, PromptTuningConfig) and config.init == "text" and not loaded:
        encoder.embedding.weight.data.copy_(_text_init(config, model.get_input_embeddings(), n))
    return encoder


def _check_supported(model: nn.Module, config: PromptConfig) -> None:
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model (no .config)")
    model_type = getattr(model_config, "model_type", "")
    if isinstance(config, AdaptionPromptConfig):
        if model_type not in _ADAPTION_MODEL_TYPES:
            raise ValueError(
                f"LLaMA-Adapter supports Llama-family attention ({', '.join(_ADAPTION_MODEL_TYPES)}); "
                f"got model_type {model_type!r}"
            )
        return
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(f"{config.peft_type} on encoder-decoder models ({model_type}) is not supported by peft_fast")
    if model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings")
    if isinstance(config, PrefixTuningConfig):
        parameters = _forward_parameters(model)
        supports_cache = "cache" in parameters or "past_key_values" in parameters
        if not supports_cache:
            raise ValueError(
                f"prefix tuning needs a decoder with a key/value cache; {type(model).__name__} "
                f"({model_type}) has no supported cache"
            )
        if model_type in ("bloom", "gpt_bigcode", "chatglm", "gemma2", "gemma3_text", "gemma4"):
            raise ValueError(f"prefix tuning on {model_type} needs a special cache layout not supported by peft_fast")


def patch_prompt(
    model: nn.Module, config: PromptConfig, adapter_name: str = "default", *, _loaded: bool = False
) -> nn.Module:
    """Add a prompt-based adapter to ``model`` in place and return it (its class is unchanged).

    Freezes every base parameter; only the method's parameters train. One prompt adapter per
    model (as in PEFT, prompt-learning methods do not stack).
    """
    if not isinstance(config, tuple(_CONFIGS.values())):
        raise TypeError(f"expected a prompt-method config, got {type(config).__name__}")
    if _state(model) is not None:
        raise ValueError("the model already has a prompt adapter; unpatch_prompt it first")
    _check_supported(model, config)
    geometry = _geometry(model)
    reference = next(model.parameters())
    state = _PromptState(config, adapter_name, None)
    if isinstance(config, AdaptionPromptConfig):  # validated before the model is touched
        if geometry["layers"] < config.adapter_layers:
            raise ValueError(f"adapter_layers={config.adapter_layers} exceeds the model's {geometry['layers']} layers")
        state.attention_names = _attention_targets(model, config)
    state.requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    state.geometry = geometry
    state.disabled = False
    state.model_config = model.config
    state.forward_parameters = [p for p in _forward_parameters(model) if p not in ("args", "kwargs")]
    for param in model.parameters():
        param.requires_grad_(False)
    if isinstance(config, AdaptionPromptConfig):
        dtype = reference.dtype if reference.is_floating_point() else torch.float32
        for name in state.attention_names:
            attention = model.get_submodule(name)
            # N(0, 1) prompt as PEFT (after the official repo); the zero gate makes the start a no-op.
            attention.adaption_prompt = nn.Parameter(
                torch.randn(1, config.adapter_len, geometry["hidden"], device=reference.device, dtype=dtype)
            )
            attention.adaption_gate = nn.Parameter(torch.zeros(1, device=reference.device, dtype=dtype))
            attention._peft_fast_adaption = state
            state.hooks.append(attention.register_forward_hook(_adaption_hook, with_kwargs=True))
    else:
        state.encoder = _build_encoder(model, config, geometry, _loaded).to(reference.device)
    if isinstance(config, PrefixTuningConfig):
        # Our training-step prefix cache is read-only, so layers may keep it under gradient
        # checkpointing (transformers otherwise drops the cache, and the prefix with it).
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True
                state.checkpoint_layers.append(module)
    # The pre-hook adds the prompt / prefix and derives positions from the mask (padding-safe).
    state.hooks.append(model.register_forward_pre_hook(_pre_forward, with_kwargs=True))
    setattr(model, _STATE_ATTR, state)
    return model


def unpatch_prompt(model: nn.Module) -> nn.Module:
    """Remove the prompt adapter: hooks, parameters, and the base parameters' ``requires_grad``."""
    state = _require_state(model)
    for hook in state.hooks:
        hook.remove()
    for name in state.attention_names:
        attention = model.get_submodule(name)
        for attr in ("adaption_prompt", "adaption_gate", "_peft_fast_adaption"):
            delattr(attention, attr)
    for module in state.checkpoint_layers:
        del module._can_checkpoint_with_cache  # back to the class default
    delattr(model, _STATE_ATTR)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad_before.get(name, param.requires_grad))
    return model


@contextlib.contextmanager
def disable_prompt_adapter(model: nn.Module):
    """Run the base model without the prompt adapter inside the ``with`` block."""
    state = _require_state(model)
    state.disabled = True
    try:
        yield model
    finally:
        state.disabled = False


def trainable_prompt_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for the prompt adapter's parameters (what an optimizer should see)."""
    _require_state(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
