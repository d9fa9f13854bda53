"""A model's geometry from its Hugging Face config, whatever the family calls each size."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Geometry:
    """The sizes every family-aware piece needs (hidden size, heads, layers, MLP width, vocabulary)."""

    layers: int
    hidden: int
    heads: int
    head_dim: int
    kv_heads: int
    intermediate: int | None
    vocab: int | None


def text_config(config):
    """The language model's config (a multimodal config's text part; the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(config, *names: str):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def geometry(model_or_config) -> Geometry:
    """Layers, hidden size, heads (GQA aware), head dim, MLP width and vocabulary of a model or config.

    GPT-2's ``n_embd`` / ``n_head`` / ``n_layer``, T5's ``d_model`` / ``num_heads`` / ``num_layers`` and
    ``d_ff`` map to the same fields. Raises ValueError when the hidden size, heads or layers are missing.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, nn.Module) and config is None:
        raise ValueError(f"{type(model_or_config).__name__} has no config to read its geometry from")
    config = text_config(config)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    if None in (hidden, heads, layers):
        raise ValueError(f"cannot read hidden size / heads / layers from {type(config).__name__}")
    return Geometry(
        layers=layers,
        hidden=hidden,
        heads=heads,
        head_dim=_first(config, "head_dim") or hidden // heads,
        kv_heads=_first(config, "num_key_value_heads") or heads,
        intermediate=_first(config, "intermediate_size", "n_inner", "d_ff", "ffn_dim"),
        vocab=_first(config, "vocab_size"),
    )


def hidden_size(model: nn.Module) -> int:
    """The model's hidden size from ``config.hidden_size`` (what the bottleneck adapters size themselves by)."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: it has no config.hidden_size")
    return size
