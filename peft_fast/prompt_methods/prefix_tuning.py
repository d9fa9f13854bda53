"""Prefix tuning: its config and the per-layer key/value prefix put into the model's Cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peft_fast.config import check_bool
from peft_fast.prompt_methods.base import _check_positive


@dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang): a learned key/value prefix of ``num_virtual_tokens`` in every layer.

    ``prefix_projection``: train the prefix through a 2-layer tanh MLP of width
    ``encoder_hidden_size`` (default: the model's hidden size); only its output is saved.
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    task_type: str = "CAUSAL_LM"

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    def __post_init__(self) -> None:
        _check_positive("num_virtual_tokens", self.num_virtual_tokens)
        check_bool("prefix_projection", self.prefix_projection)
        if self.encoder_hidden_size is not None:
            _check_positive("encoder_hidden_size", self.encoder_hidden_size)

    def peft_fields(self) -> dict[str, Any]:
        return {
            "prefix_projection": self.prefix_projection,
            "encoder_hidden_size": self.encoder_hidden_size,
            "init_weights": None,
        }


def _read_only_prefix_cache_class():
    import transformers

    class ReadOnlyPrefixCache(transformers.DynamicCache):
        """A DynamicCache holding only the prefix; later ``update`` calls read it and store nothing.

        Used for training steps: under gradient checkpointing transformers recomputes each layer in
        the backward pass, which would append the keys a second time to a normal cache (so it drops
        the cache instead, and the prefix with it). Reads are the same on the replay.
        """

        frozen = False

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if not self.frozen:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    return ReadOnlyPrefixCache


def _prefix_cache(state: nn.Module, batch: int, dtype: torch.dtype, cache, read_only: bool) -> Any:
    """Fill ``cache`` (or a new DynamicCache) with the per-layer key/value prefix.

    ``state`` is the adapter's state (:mod:`peft_fast.prompt_methods.state`, which imports this
    module for its config): its geometry, config, encoder and model config are read.
    """
    import transformers

    g, n = state.geometry, state.config.num_virtual_tokens
    prefix = state.encoder().to(dtype)  # [n, layers * 2 * kv_heads * head_dim]
    # PEFT's layout: view(n, 2·layers, kv_heads, head_dim); entry 2i is layer i's key, 2i+1 its value.
    prefix = prefix.view(n, 2 * g["layers"], g["kv_heads"], g["head_dim"]).permute(1, 2, 0, 3)
    if cache is None:
        cache_class = _read_only_prefix_cache_class() if read_only else transformers.DynamicCache
        cache = cache_class(config=state.model_config)
    for layer in range(g["layers"]):
        key = prefix[2 * layer].unsqueeze(0).expand(batch, -1, -1, -1)
        value = prefix[2 * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(key, value, layer)
    if read_only and hasattr(cache, "frozen"):
        cache.frozen = True
    return cache
