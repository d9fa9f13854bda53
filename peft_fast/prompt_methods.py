"""Prompt-based PEFT methods: prompt tuning, prefix tuning, P-tuning and LLaMA-Adapter.

The model keeps its class, as with our LoRA ``patch``: ``model(...)``, ``model.generate(...)``, the HF
Trainer and gradient checkpointing all go through the same object.

- Prompt tuning / P-tuning: a forward pre-hook on the top-level model turns ``input_ids`` into
  ``inputs_embeds`` with the virtual-token embeddings in front, and extends ``attention_mask`` (ones)
  and ``labels`` (-100). Like PEFT, the returned logits cover the virtual positions too.
- Prefix tuning: the same pre-hook fills the model's ``Cache`` (transformers' Cache API) with one
  learned key/value prefix per layer before the first step, and extends the attention mask.
- LLaMA-Adapter: a forward hook on each of the top ``adapter_layers`` self-attention modules adds
  ``o_proj(gate · softmax(q·Pkᵀ/√d)·Pv)``, where Pk, Pv are the k/v projections of the learned
  prompt and ``gate`` starts at zero. The parameters live on the attention module itself, so their
  names are PEFT's (``model.layers.1.self_attn.adaption_prompt``).

Math and file formats follow PEFT 0.21 (``peft/peft_model.py``, ``peft/tuners/{prompt_tuning,
prefix_tuning,p_tuning,adaption_prompt}``). Where we differ on purpose:

- Positions. PEFT drops ``position_ids`` for prompt tuning / P-tuning and lets the model number the
  virtual tokens 0..n-1 and the real tokens after them *including the padding*, so a left-padded
  sequence sees different positions than the same sequence alone. When the caller passes an
  ``attention_mask`` and no ``position_ids`` we derive the positions from the extended mask
  (padding does not advance them), and caller ``position_ids`` are shifted by n instead of dropped.
  Without padding both give the positions PEFT uses, so outputs are equal.
- Generation. PEFT 0.21's ``generate`` looks for ``past_key_values`` / ``cache_position`` in the
  model inputs, which transformers 5.x renamed / removed: with transformers 5.24 its prefix-tuning
  generation ignores the prefix and its prompt-tuning generation re-inserts the virtual tokens at
  every decoding step. We decide "first step or not" from the cache length, so our greedy
  generation equals argmax decoding with PEFT's own (correct) forward.
- Text initialisation longer than ``num_virtual_tokens`` is an error here; PEFT truncates silently.
- Loading a saved adapter gives the saved ``prompt_embeddings`` directly (PEFT's inference mode):
  the prefix MLP / P-tuning encoder are a training-time reparameterisation PEFT does not save.
- Encoder-decoder models (T5) are not supported by prompt / prefix / P-tuning here: ``patch_prompt``
  refuses them with a clear error (GPT-2 and Llama-family decoders are covered).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_fast.config import check_bool, check_probability
from peft_fast.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, atomic_write_files, output_directory

__all__ = [
    "AdaptionPromptConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "adaption_prompt_attention",
    "disable_prompt_adapter",
    "load_prompt_adapter",
    "patch_prompt",
    "prompt_adapter_state_dict",
    "save_prompt_adapter",
    "trainable_prompt_parameters",
    "unpatch_prompt",
]

PEFT_VERSION = "0.21.2"
_STATE_ATTR = "peft_fast_prompt"  # the submodule holding our state (and the prompt parameters)
_PEFT_PREFIX = "base_model.model."
_ADAPTION_MODEL_TYPES = ("llama", "mistral")  # PEFT's Llama-family list for adaption prompts


# -- configs ---------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al.): ``num_virtual_tokens`` learned input embeddings.

    ``init``: ``"random"`` (N(0, 1), as PEFT) or ``"text"``: the embeddings of ``init_text``'s tokens,
    repeated to fill ``num_virtual_tokens``; ``tokenizer`` is a tokenizer object or a local path.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = None
    task_type: str = "CAUSAL_LM"

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        _check_positive("num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.init, str):
            raise ValueError(f"init must be 'random' or 'text', got {self.init!r}")
        self.init = self.init.lower()
        if self.init not in ("random", "text"):
            raise ValueError(f"init must be 'random' or 'text', got {self.init!r}")
        if self.init == "text" and (not self.init_text or self.tokenizer is None):
            raise ValueError("init='text' needs init_text and a tokenizer (object or local path)")

    def peft_fields(self) -> dict[str, Any]:
        tokenizer = self.tokenizer if isinstance(self.tokenizer, str | os.PathLike) else None
        return {
            "prompt_tuning_init": self.init.upper(),
            "prompt_tuning_init_text": self.init_text,
            "tokenizer_name_or_path": None if tokenizer is None else str(tokenizer),
            "tokenizer_kwargs": None,
        }


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


@dataclass
class PromptEncoderConfig:
    """P-tuning (Liu et al.): virtual-token embeddings produced by an MLP or a bidirectional LSTM."""

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    task_type: str = "CAUSAL_LM"

    peft_type: ClassVar[str] = "P_TUNING"

    def __post_init__(self) -> None:
        _check_positive("num_virtual_tokens", self.num_virtual_tokens)
        if isinstance(self.encoder_reparameterization_type, str):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.upper()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(
                f"encoder_reparameterization_type must be MLP or LSTM, got {self.encoder_reparameterization_type!r}"
            )
        _check_positive("encoder_num_layers", self.encoder_num_layers)
        if self.encoder_hidden_size is not None:
            _check_positive("encoder_hidden_size", self.encoder_hidden_size)
        check_probability("encoder_dropout", self.encoder_dropout)

    def peft_fields(self) -> dict[str, Any]:
        return {
            "encoder_reparameterization_type": self.encoder_reparameterization_type,
            "encoder_hidden_size": self.encoder_hidden_size,
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }


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


PromptConfig = PromptTuningConfig | PrefixTuningConfig | PromptEncoderConfig | AdaptionPromptConfig
_CONFIGS = {c.peft_type: c for c in (PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, AdaptionPromptConfig)}


# -- model geometry --------------------------------------------------------------------------


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _geometry(model: nn.Module) -> dict[str, int]:
    """num_layers, hidden (token_dim), heads, and the per-layer KV geometry (GQA aware)."""
    config = _text_config(model)
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", "num_heads")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    if None in (hidden, heads, layers):
        raise ValueError(f"cannot read hidden size / heads / layers from {type(config).__name__}")
    head_dim = get("head_dim") or hidden // heads
    kv_heads = get("num_key_value_heads") or heads
    return {"layers": layers, "hidden": hidden, "heads": heads, "head_dim": head_dim, "kv_heads": kv_heads}


def _forward_parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


# -- prompt encoders (parameter names are PEFT's, so state can be exchanged with PEFT modules) ----


class PromptEncoder(nn.Module):
    """Produces the method's learned tensor, [num_virtual_tokens, dim], from its parameters.

    ``embedding.weight`` alone when ``reparameterization`` is None (prompt tuning, a plain or loaded
    prefix, a loaded P-tuning prompt); otherwise PEFT's ``transform`` (prefix MLP), ``mlp_head`` or
    ``lstm_head`` + ``mlp_head`` (P-tuning).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        reparameterization: str | None = None,
        *,
        token_dim: int = 0,
        hidden: int = 0,
        lstm_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.reparameterization = reparameterization
        if reparameterization is None:
            self.embedding = nn.Embedding(num_tokens, dim)
        elif reparameterization == "prefix_mlp":
            self.embedding = nn.Embedding(num_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        elif reparameterization == "MLP":
            self.embedding = nn.Embedding(num_tokens, dim)
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )
        elif reparameterization == "LSTM":
            self.embedding = nn.Embedding(num_tokens, dim)
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            raise ValueError(f"unknown reparameterization {reparameterization!r}")

    def forward(self) -> torch.Tensor:
        """The [num_virtual_tokens, dim] tensor the model consumes (batch-free: callers expand it)."""
        weight = self.embedding.weight
        if self.reparameterization is None:
            return weight
        if self.reparameterization == "prefix_mlp":
            return self.transform(weight)
        if self.reparameterization == "MLP":
            return self.mlp_head(weight)
        return self.mlp_head(self.lstm_head(weight.unsqueeze(0))[0])[0]


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


# -- the forward pre-hook (prompt tuning, P-tuning, prefix tuning) ---------------------------


def _cache_kwarg(parameters: list[str]) -> str:
    return "cache" if "cache" in parameters else "past_key_values"


def _positions_from_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions that padding does not advance (HF generate's rule), for the last ``length`` slots."""
    positions = mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 1)
    return positions[:, -length:]


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


def _prefix_cache(state: _PromptState, batch: int, dtype: torch.dtype, cache, read_only: bool) -> Any:
    """Fill ``cache`` (or a new DynamicCache) with the per-layer key/value prefix."""
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


# -- LLaMA-Adapter -----------------------------------------------------------------------------


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


# -- patch / unpatch ---------------------------------------------------------------------------


def _text_init(config: PromptTuningConfig, embedding: nn.Module, n: int) -> torch.Tensor:
    tokenizer = config.tokenizer
    if isinstance(tokenizer, str | os.PathLike):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = list(tokenizer(config.init_text)["input_ids"])
    if not ids:
        raise ValueError("init_text tokenizes to no tokens")
    if len(ids) > n:
        raise ValueError(f"init_text is {len(ids)} tokens, longer than num_virtual_tokens={n}")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # PEFT repeats a short text to fill the prompt
    weight = embedding.weight
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=weight.device)).detach().float().clone()


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


# -- PEFT-format files -------------------------------------------------------------------------


def prompt_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves: ``prompt_embeddings`` (the encoder's output) or the adaption prompts."""
    state = _require_state(model)
    if isinstance(state.config, AdaptionPromptConfig):
        out = {}
        for name in state.attention_names:
            attention = model.get_submodule(name)
            out[f"{_PEFT_PREFIX}{name}.adaption_prompt"] = attention.adaption_prompt
            out[f"{_PEFT_PREFIX}{name}.adaption_gate"] = attention.adaption_gate
    else:
        with torch.no_grad():
            # The reparameterisation (prefix MLP, P-tuning encoder) is evaluated and dropped, as PEFT does.
            was_training = state.encoder.training
            state.encoder.eval()
            out = {"prompt_embeddings": state.encoder()}
            state.encoder.train(was_training)
    return {key: value.detach().float().contiguous().cpu() for key, value in out.items()}


def _peft_config_dict(model: nn.Module, config: PromptConfig) -> dict[str, Any]:
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    out: dict[str, Any] = {
        "peft_type": config.peft_type,
        "task_type": config.task_type,
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "revision": None,
        "inference_mode": True,
        "peft_version": PEFT_VERSION,
    }
    if isinstance(config, AdaptionPromptConfig):
        out.update(
            adapter_len=config.adapter_len, adapter_layers=config.adapter_layers, target_modules=config.target_modules
        )
        return out
    g = _geometry(model)
    out.update(
        num_virtual_tokens=config.num_virtual_tokens,
        num_transformer_submodules=1,
        num_layers=g["layers"],
        token_dim=g["hidden"],
        num_attention_heads=g["heads"],
        modules_to_save=None,
    )
    if isinstance(config, PrefixTuningConfig):  # PEFT stores the KV geometry for grouped-query attention
        out.update(token_dim=g["kv_heads"] * g["head_dim"], num_attention_heads=g["kv_heads"])
    out.update(config.peft_fields())
    if out.get("encoder_hidden_size", 0) is None:  # PEFT writes the default width it used: token_dim
        out["encoder_hidden_size"] = out["token_dim"]
    return out


def save_prompt_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in HF PEFT's format.

    Each file is written atomically (temporary + rename); PEFT's ``from_pretrained`` loads them.
    """
    from safetensors.torch import save as safetensors_bytes

    state = _require_state(model)
    directory = output_directory(directory)
    weights = safetensors_bytes(prompt_adapter_state_dict(model), metadata={"format": "pt"})
    config_json = json.dumps(_peft_config_dict(model, state.config), indent=2, sort_keys=True) + "\n"
    # Fix: the two files were renamed one after the other, so a failure writing the config left new
    # weights beside the old config. Both temporaries are now complete before either is renamed.
    with atomic_write_files(directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG) as (weights_file, config_file):
        weights_file.write(weights)
        config_file.write(config_json.encode())
    return directory


def _config_from_peft(raw: dict[str, Any]) -> PromptConfig:
    peft_type = raw.get("peft_type")
    if peft_type not in _CONFIGS:
        raise ValueError(f"not a prompt-method adapter (peft_type={peft_type!r}); supported: {', '.join(_CONFIGS)}")
    if raw.get("num_transformer_submodules", 1) not in (1, None):
        raise ValueError("adapters for encoder-decoder models (num_transformer_submodules=2) are not supported")
    task = raw.get("task_type") or "CAUSAL_LM"
    required = ("adapter_len", "adapter_layers") if peft_type == "ADAPTION_PROMPT" else ("num_virtual_tokens",)
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"this {peft_type} adapter_config.json lacks {', '.join(missing)}")
    if peft_type == "ADAPTION_PROMPT":
        return AdaptionPromptConfig(
            raw["adapter_len"], raw["adapter_layers"], raw.get("target_modules") or "self_attn", task
        )
    n = raw["num_virtual_tokens"]
    if peft_type == "PROMPT_TUNING":
        return PromptTuningConfig(n, task_type=task)  # the saved embeddings replace any init
    if peft_type == "PREFIX_TUNING":
        return PrefixTuningConfig(n, bool(raw.get("prefix_projection")), raw.get("encoder_hidden_size"), task)
    return PromptEncoderConfig(
        n,
        raw.get("encoder_reparameterization_type") or "MLP",
        raw.get("encoder_hidden_size"),
        raw.get("encoder_num_layers") or 2,
        raw.get("encoder_dropout") or 0.0,
        task,
    )


def load_prompt_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load a PEFT-format prompt-method adapter (ours or PEFT's) into ``model`` and return it.

    Shapes are checked against the model before it is touched. The saved tensors are used as they
    are (PEFT's inference mode); with ``is_trainable`` they train directly, without the
    reparameterisation (which the file does not hold).
    """
    from peft_fast.io import read_adapter

    raw, tensors = read_adapter(directory)
    config = _config_from_peft(raw)
    _check_supported(model, config)
    g = _geometry(model)
    if isinstance(config, AdaptionPromptConfig):
        names = _attention_targets(model, config)
        expected = {}
        for name in names:
            expected[f"{_PEFT_PREFIX}{name}.adaption_prompt"] = (1, config.adapter_len, g["hidden"])
            expected[f"{_PEFT_PREFIX}{name}.adaption_gate"] = (1,)
    elif isinstance(config, PrefixTuningConfig):
        expected = {"prompt_embeddings": (config.num_virtual_tokens, g["layers"] * 2 * g["kv_heads"] * g["head_dim"])}
    else:
        expected = {"prompt_embeddings": (config.num_virtual_tokens, g["hidden"])}
    problems = [f"missing {key}" for key in expected if key not in tensors]
    problems += [
        f"{key}: file has {tuple(tensors[key].shape)}, model needs {shape}"
        for key, shape in expected.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    ]
    problems += [f"unexpected {key}" for key in sorted(set(tensors) - set(expected))[:5]]
    if problems:
        raise ValueError(f"adapter at {directory} does not fit this {type(model).__name__}: " + "; ".join(problems[:8]))
    patch_prompt(model, config, adapter_name, _loaded=True)
    state = _require_state(model)
    with torch.no_grad():
        if isinstance(config, AdaptionPromptConfig):
            for name in state.attention_names:
                attention = model.get_submodule(name)
                for attr in ("adaption_prompt", "adaption_gate"):
                    param = getattr(attention, attr)
                    param.copy_(tensors[f"{_PEFT_PREFIX}{name}.{attr}"].to(param.dtype))
        else:
            weight = state.encoder.embedding.weight
            weight.copy_(tensors["prompt_embeddings"].to(weight.dtype))
    if not is_trainable:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def trainable_prompt_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for the prompt adapter's parameters (what an optimizer should see)."""
    _require_state(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
