"""Turning a Hugging Face model into a LoRA / QLoRA model in place, and back.

``patch`` finds the target modules (names, a regex, or "all-linear"), quantizes the base weights
to NF4 when asked, replaces each target with a :class:`LoraLinear` and freezes everything else.
The model keeps its class, ``generate`` and Trainer compatibility. Everything is validated
before the model is touched, so a failed ``patch`` leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from peft_fast import hf_integration
from peft_fast.config import LoraConfig, check_adapter_name
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.quantize import is_quantizable_linear, quantize_model

__all__ = [
    "add_adapter",
    "disable_adapters",
    "lora_layers",
    "merge",
    "patch",
    "print_trainable_parameters",
    "set_adapter",
    "trainable_parameters",
    "unpatch",
]

_STATE_ATTR = "peft_fast_state"
_LAYER_INDEX = re.compile(r".*\.(?:layers|h|layer|block|blocks|decoder\.layers|encoder\.layers)\.(\d+)\.")


@dataclass
class PatchState:
    """What ``patch`` did to a model, kept on it as ``model.peft_fast_state``."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    conv1d_names: set[str] = field(default_factory=set)  # GPT-2 Conv1D layers turned into Linear
    quantized: bool = False


def _state(model: nn.Module) -> PatchState | None:
    return getattr(model, _STATE_ATTR, None)


def _require_state(model: nn.Module) -> PatchState:
    state = _state(model)
    if state is None:
        raise ValueError("this model is not patched by peft_fast (call peft_fast.patch first)")
    return state


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every LoraLinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head(s), which "all-linear" leaves alone (as PEFT does)."""
    names = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        elif name.rsplit(".", 1)[-1] in ("lm_head", "embed_out", "output_layer", "score", "classifier"):
            names.add(name)
    return names


def _matches(name: str, patterns: list[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _matches_modules_to_save(name: str, patterns: list[str] | None) -> bool:
    """PEFT's modules_to_save rule: the module name ends with a pattern, no dot boundary needed.

    Fix: with the target_modules rule (``_matches``) ``["norm"]`` missed Llama's
    ``input_layernorm`` that PEFT trains and saves, so counts and adapter files disagreed.
    """
    return bool(name) and any(name.endswith(pattern) for pattern in patterns or ())


def _layer_index_ok(name: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    pattern = config.layers_pattern
    if pattern:
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        match = next((m for p in patterns if (m := re.match(rf".*\.{p}\.(\d+)\.", name))), None)
    else:
        match = _LAYER_INDEX.match(name)
    return match is not None and int(match.group(1)) in config.layers_to_transform


def find_targets(model: nn.Module, config: LoraConfig, among_lora_layers: bool = False) -> list[str]:
    """Names of the modules ``config`` targets; raises with close names when nothing matches.

    With ``among_lora_layers`` the candidates are the model's LoraLinear layers (add_adapter);
    otherwise every module not already inside one.
    """
    heads = output_head_names(model)
    names = []
    unsupported = []
    for name, module in model.named_modules():
        if not name or _is_inside_lora(name, model) or isinstance(module, LoraLinear) != among_lora_layers:
            continue
        if among_lora_layers:
            module = module.base_layer
        if config.target_modules == "all-linear":
            chosen = is_quantizable_linear(module) or isinstance(module, NF4Linear)
            chosen = chosen and name not in heads
        else:
            chosen = _matches(name, config.target_modules)
        if not chosen or _matches(name, config.exclude_modules) or not _layer_index_ok(name, config):
            continue
        if not (is_quantizable_linear(module) or isinstance(module, NF4Linear)):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        names.append(name)
    if unsupported:
        raise ValueError(
            "target_modules selects modules that are not Linear / Conv1D layers: "
            + ", ".join(unsupported[:8])
            + ("" if len(unsupported) <= 8 else f" and {len(unsupported) - 8} more")
        )
    if not names:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_quantizable_linear(m)})
        wanted = config.target_modules if isinstance(config.target_modules, list) else [str(config.target_modules)]
        close = sorted({c for w in wanted for c in difflib.get_close_matches(w, leaf_names, n=5, cutoff=0.3)})
        # Name the filters too: the targets may exist and be filtered out by them (as PEFT notes).
        filters = [f"{key}={getattr(config, key)!r}" for key in ("exclude_modules", "layers_to_transform")
                   if getattr(config, key) is not None]  # fmt: skip
        raise ValueError(
            f"target_modules {config.target_modules!r} matches no module of {type(model).__name__}"
            + (f" (with {', '.join(filters)})" if filters else "")
            + f". Close names: {close or leaf_names[:12]}"
        )
    return names


def _is_inside_lora(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    for cut in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:cut])), LoraLinear):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _as_linear(module: nn.Module) -> nn.Module:
    """GPT-2's Conv1D (weight [in, out]) as an equivalent nn.Linear (weight [out, in])."""
    if isinstance(module, (nn.Linear, NF4Linear)):
        return module
    weight = module.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    # Fix: patch() froze the model's parameters before this new Linear was made; keep its copy of
    # the base weight / bias frozen too (GPT-2's Conv1D bases were trainable, unlike PEFT's).
    return linear.requires_grad_(False)


def patch(model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> nn.Module:
    """Turn ``model`` into a LoRA (or, with ``config.quantize="nf4"``, QLoRA) model in place.

    Every target module becomes a :class:`LoraLinear` with adapter ``adapter_name``; with
    quantization every Linear except the output head is stored in NF4 first, layer by layer.
    All other parameters are frozen (biases and ``modules_to_save`` stay trainable as
    ``config`` says). Returns the same model object.

    ``patch(peft_model)`` (no config) instead makes an existing PEFT LoRA / QLoRA model run our
    fused op, keeping PEFT's modules and parameters: see :mod:`peft_fast.peft_interop`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    interop = _peft_interop()
    if interop is not None and interop.is_peft_model(model, config):
        return interop.patch_peft_model(model, config)
    if config is None:
        raise TypeError("config is required (a peft_fast.LoraConfig, IA3Config, ...) unless model is a PEFT model")
    check_adapter_name(adapter_name)
    if not isinstance(config, LoraConfig):
        return _patch_other_method(model, config, adapter_name)
    state = _state(model)
    if state is not None:
        raise ValueError(
            f"this model is already patched (adapters {list(state.configs)}); "
            f"use peft_fast.add_adapter(model, config, {adapter_name!r}) for another adapter"
        )
    targets = find_targets(model, config)
    _check_modules_to_save(model, config)
    state = PatchState(configs={adapter_name: config}, active=[adapter_name], quantized=config.quantize == "nf4")
    # Fix: note every GPT-2 Conv1D before NF4 quantization turns it into an NF4Linear (after which
    # the check in the loop below no longer sees it), so that merge gives back Conv1D layers.
    state.conv1d_names = {
        n for n, m in model.named_modules() if is_quantizable_linear(m) and not isinstance(m, nn.Linear)
    }

    if config.quantize == "nf4":
        skip = tuple(output_head_names(model)) + tuple(config.modules_to_save or ())
        # Fix: like transformers + bitsandbytes, leave the model's _keep_in_fp32_modules dense (T5's
        # `wo`: its forward reads `self.wo.weight.dtype`, which an NF4 layer cannot provide).
        skip += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        quantize_model(model, blocksize=config.blocksize, double_quant=config.double_quant, skip_modules=skip)
    for param in model.parameters():
        param.requires_grad_(False)
    dtype = config.compute_dtype
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, NF4Linear)):
            state.conv1d_names.add(name)
        layer = LoraLinear(_as_linear(module))
        layer.update_layer(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                           config.init_lora_weights, config.use_rslora)  # fmt: skip
        if dtype is not None:
            layer.lora_A.to(dtype), layer.lora_B.to(dtype)
        _set_submodule(model, name, layer)
    _mark_trainable(model, config, adapter_name)
    setattr(model, _STATE_ATTR, state)
    # save_pretrained / load_adapter on the model and Trainer's checkpoint loading: adapter only.
    hf_integration.attach(model)
    return model


def _peft_interop():
    """peft_fast.peft_interop when PEFT is loaded (only then can a model be a PEFT model), else None."""
    if "peft" not in sys.modules:
        return None
    from peft_fast import peft_interop

    return peft_interop


def _patch_other_method(model: nn.Module, config, adapter_name: str) -> nn.Module:
    """Route a non-LoRA config to its method: bottleneck adapters, (IA)³ or a prompt method."""
    from peft_fast.adapters import patch_adapters
    from peft_fast.config import AdapterConfig, IA3Config
    from peft_fast.ia3 import patch_ia3
    from peft_fast.prompt_methods import (
        AdaptionPromptConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        patch_prompt,
    )

    if isinstance(config, AdapterConfig):
        return patch_adapters(model, config, adapter_name)
    if isinstance(config, IA3Config):
        return patch_ia3(model, config, adapter_name)
    if isinstance(config, (PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, AdaptionPromptConfig)):
        return patch_prompt(model, config, adapter_name)
    kind = f"{type(config).__module__}.{type(config).__qualname__}"
    raise TypeError(
        f"config must be a peft_fast config (peft_fast.LoraConfig, peft_fast.IA3Config, ...), got {kind}"
        + ("; peft's configs are not accepted, build the peft_fast one with the same fields" if "peft." in kind else "")
    )


def _check_modules_to_save(model: nn.Module, config: LoraConfig) -> None:
    for wanted in config.modules_to_save or ():
        if not any(_matches_modules_to_save(name, [wanted]) for name, _ in model.named_modules()):
            raise ValueError(f"modules_to_save names {wanted!r}, which is not a module of {type(model).__name__}")


def _mark_trainable(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for param in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
                param.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    for name, module in model.named_modules():
        if _matches_modules_to_save(name, config.modules_to_save):
            _untie(model, module)
            for param in module.parameters():
                param.requires_grad_(True)


def _untie(model: nn.Module, module: nn.Module) -> None:
    """Give ``module`` its own copy of any parameter it shares (a head tied to the embeddings).

    PEFT trains a copy of a module in modules_to_save; training the shared tensor instead would
    change the embeddings too, and the saved adapter would disagree with PEFT's.
    """
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    for owner in module.modules():
        for param_name, param in list(owner.named_parameters(recurse=False)):
            if counts.get(id(param), 0) > 1:
                setattr(owner, param_name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Add another adapter to an already patched model (on the same base; not activated)."""
    state = _require_state(model)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_adapter adds LoRA adapters: config must be a LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} exists already")
    if config.quantize != next(iter(state.configs.values())).quantize:
        raise ValueError("every adapter of a model must agree on quantize")
    # A new adapter lives on the layers the first patch wrapped; it starts inactive and frozen.
    targets = find_targets(model, config, among_lora_layers=True)
    for name in targets:
        layer = model.get_submodule(name)
        layer.update_layer(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                           config.init_lora_weights, config.use_rslora)  # fmt: skip
        if config.compute_dtype is not None:
            layer.lora_A[adapter_name].to(config.compute_dtype), layer.lora_B[adapter_name].to(config.compute_dtype)
        for param in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
            param.requires_grad_(False)
    state.configs[adapter_name] = config
    return model


def set_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Make ``adapter_names`` the active adapter(s); only they are trainable."""
    state = _require_state(model)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {list(state.configs)}")
    for _, layer in lora_layers(model):
        layer.set_adapter([n for n in names if n in layer.lora_A])
        for adapter in layer.lora_A:
            trainable = adapter in names
            for param in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()):
                param.requires_grad_(trainable)
    state.active = names


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes with its base weights only."""
    _require_state(model)
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous, strict=False):
            layer.disable_adapters = value


def _restore_base(module: nn.Module, was_conv1d: bool, dtype: torch.dtype | None, merged: torch.Tensor | None):
    """The plain module to put back: Linear, Conv1D, or NF4Linear (``merged`` = new weight)."""
    base = module.base_layer
    if merged is None and (not was_conv1d or isinstance(base, NF4Linear)):
        return base
    if merged is None:
        merged = base.weight.detach()
    bias = base.bias.detach() if base.bias is not None else None
    if was_conv1d:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(merged.shape[0], merged.shape[1])
        conv.weight = nn.Parameter(merged.t().contiguous(), requires_grad=False)
        conv.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(merged.shape[0]))
        return conv.to(merged.device)
    linear = nn.Linear(merged.shape[1], merged.shape[0], bias=bias is not None, device=merged.device,
                       dtype=dtype or merged.dtype)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(merged)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@dataclass
class _Wrapped:
    """Stands in for a LoraLinear around ``base_layer`` in ``_restore_base``."""

    base_layer: nn.Module


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the original modules (NF4 bases stay NF4Linear).

    On a PEFT model ``patch`` took over, gives its LoRA layers PEFT's own forward back.
    """
    interop = _peft_interop()
    if interop is not None and _state(model) is None and interop.is_peft_model(model, None):
        return interop.unpatch_peft_model(model)
    state = _require_state(model)
    for name, layer in list(lora_layers(model)):
        _set_submodule(model, name, _restore_base(layer, name in state.conv1d_names, None, None))
    hf_integration.detach(model)
    delattr(model, _STATE_ATTR)
    return model


def merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active adapters into the base weights; returns a plain HF model (in place).

    An NF4 base is dequantized to ``dtype`` (default: the weight's original dtype), so the
    result needs neither peft_fast nor bitsandbytes at inference. NF4 layers that carry no
    adapter are dequantized too.
    """
    state = _require_state(model)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    for name, layer in list(lora_layers(model)):
        merged = layer.merged_weight(dtype)
        _set_submodule(model, name, _restore_base(layer, name in state.conv1d_names, dtype, merged))
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear) and name in state.conv1d_names:
            # Fix: an NF4 layer that was a GPT-2 Conv1D goes back to Conv1D ([in, out] weight).
            conv = _restore_base(_Wrapped(module), True, dtype, module.dequantized_weight(dtype))
            _set_submodule(model, name, conv)
        elif isinstance(module, NF4Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            weight = module.dequantized_weight(dtype)
            plain = plain.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(weight)
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            _set_submodule(model, name, plain)
    hf_integration.detach(model)  # a merged model saves in full again
    delattr(model, _STATE_ATTR)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; NF4 weights count as their element count, like PEFT."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: trainable params, all params and the trainable percentage."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
