"""PEFT-format files of the prompt methods: state dict, adapter_config.json, save and load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_fast.adapter_files import ADAPTER_WEIGHTS, output_directory, write_adapter_pair
from peft_fast.prompt_methods.base import _PEFT_PREFIX, PEFT_VERSION, _geometry
from peft_fast.prompt_methods.llama_adapter import AdaptionPromptConfig, _attention_targets
from peft_fast.prompt_methods.p_tuning import PromptEncoderConfig
from peft_fast.prompt_methods.patching import _check_supported, patch_prompt
from peft_fast.prompt_methods.prefix_tuning import PrefixTuningConfig
from peft_fast.prompt_methods.prompt_tuning import PromptTuningConfig
from peft_fast.prompt_methods.state import _CONFIGS, PromptConfig, _require_state


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

    One pair (:func:`peft_fast.adapter_files.write_adapter_pair`): both complete before either is renamed,
    the config's digest in the weights' metadata, under the directory's lock; PEFT's
    ``from_pretrained`` loads them.
    """
    return write_prompt_files(model, directory, prompt_adapter_state_dict(model))


def write_prompt_files(model: nn.Module, directory: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the adapter's config and ``tensors`` (PEFT key -> tensor) as one pair (see :func:`save_prompt_adapter`)."""
    state = _require_state(model)
    config_bytes = (json.dumps(_peft_config_dict(model, state.config), indent=2, sort_keys=True) + "\n").encode()
    return write_adapter_pair(output_directory(directory), ADAPTER_WEIGHTS, tensors, config_bytes)


def prompt_model_key(file_key: str) -> str | None:
    """The model's parameter name for a key of the adapter file; None for ``prompt_embeddings`` (the
    encoder's output, computed from its parameters)."""
    return None if file_key == "prompt_embeddings" else file_key.removeprefix(_PEFT_PREFIX)


def reload_prompt_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the adapter file's tensors into the model's prompt adapter, in place (a resume, a best checkpoint).

    The file must be of the same method and shapes. A reparameterised encoder (prefix MLP, P-tuning)
    is not set from the file, which holds its output only: the Trainer hooks restore its parameters
    from the training tensors saved beside it (:func:`encoder_training_tensors`).
    """
    from peft_fast.adapter_files import check_adapter_tensors, read_adapter_files

    state = _require_state(model)
    files = read_adapter_files(directory)
    theirs = _config_from_peft(files.config)
    if type(theirs) is not type(state.config):
        raise ValueError(
            f"the adapter at {directory} is a {theirs.peft_type} adapter; the model's is {state.config.peft_type}"
        )
    expected = {key: tuple(value.shape) for key, value in prompt_adapter_state_dict(model).items()}
    check_adapter_tensors(files.tensors, expected, f"adapter at {directory}", model)
    files.check_written_together()
    with torch.no_grad():
        if isinstance(state.config, AdaptionPromptConfig):
            params = dict(model.named_parameters())
            for key, tensor in files.tensors.items():
                param = params[key.removeprefix(_PEFT_PREFIX)]
                param.copy_(tensor.to(param.dtype))
        elif state.encoder.reparameterization is None:
            weight = state.encoder.embedding.weight
            weight.copy_(files.tensors["prompt_embeddings"].to(weight.dtype))


def encoder_training_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A reparameterised encoder's parameters (``embedding``, ``transform`` / ``mlp_head`` / ``lstm_head``),
    which PEFT's file evaluates away; empty when the file holds what trains."""
    state = _require_state(model)
    encoder = state.encoder
    if encoder is None or encoder.reparameterization is None:
        return {}
    return {key: value.detach().contiguous().cpu() for key, value in encoder.state_dict().items()}


def reload_encoder_training_tensors(model: nn.Module, directory: str | os.PathLike, tensors: dict) -> None:
    """Put a reparameterised encoder's saved parameters back; they must reproduce the adapter file's prompt."""
    from peft_fast.adapter_files import read_adapter_files

    encoder = _require_state(model).encoder
    own = encoder_training_tensors(model)
    wrong = sorted(set(own) ^ set(tensors)) + [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if wrong:
        raise ValueError(f"the training tensors at {directory} do not fit this prompt encoder: {wrong[:5]}")
    saved = read_adapter_files(directory).tensors["prompt_embeddings"]
    with torch.no_grad():
        before = {key: value.detach().clone() for key, value in encoder.state_dict().items()}
        encoder.load_state_dict({key: tensors[key] for key in own})
        was_training = encoder.training
        encoder.eval()
        prompt = encoder().float().cpu()
        encoder.train(was_training)
        if not torch.allclose(prompt, saved, rtol=1e-5, atol=1e-6):
            encoder.load_state_dict(before)
            raise ValueError(
                f"the training tensors at {directory} do not reproduce its adapter file's prompt_embeddings "
                "(files from two saves?); save the adapter again"
            )


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
    from peft_fast.adapter_files import read_adapter_files

    files = read_adapter_files(directory)
    raw, tensors = files.config, files.tensors
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
    files.check_written_together()  # an interrupted or concurrent save: refused before the model changes
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
