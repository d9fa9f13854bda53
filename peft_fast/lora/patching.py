"""LoRA / QLoRA on a Hugging Face model: targets, LoraLinear layers in and out, active adapters, merging.

``patch_lora`` finds the target modules (names, a regex, or "all-linear"), quantizes the base
weights to NF4 when asked, replaces each target with a :class:`LoraLinear` and freezes everything
else. The model keeps its class, ``generate`` and Trainer compatibility. Everything is validated
before the model is touched, so a failed patch leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from peft_fast.config import TASK_MODULES_TO_SAVE, LoraConfig, check_adapter_name
from peft_fast.host import (
    as_linear,
    conv1d_names,
    put_bases_back,
    quantize_host_model,
    register_state_attr,
    restore_base,
    set_submodule,
    untie,
)
from peft_fast.layers import LoraEmbedding, LoraLayer, LoraLinear, LoraParamWrapper, NF4Linear
from peft_fast.lora import mixed
from peft_fast.lora.init import is_base_init
from peft_fast.lora.parameters import find_parameter_targets, unwrap_parameters, wrap_parameters
from peft_fast.lora.tokens import token_targets, token_wrappers, wrap_tokens
from peft_fast.method import flags_set
from peft_fast.targeting import (
    check_modules_to_save,
    inside,
    is_base_linear,
    layer_index_ok,
    matches,
    matches_modules_to_save,
    modules_to_save_names,
    no_match_error,
    output_head_names,
)

__all__ = [
    "PatchState",
    "add_lora_adapter",
    "disabled",
    "find_targets",
    "lora_layers",
    "merge_lora_layers",
    "patch_lora",
    "set_lora_adapter",
    "token_layers",
    "unpatch_lora",
]

STATE_ATTR = register_state_attr("peft_fast_state")


@dataclass
class PatchState:
    """What ``patch`` did to a model, kept on it as ``model.peft_fast_state``."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    conv1d_names: set[str] = field(default_factory=set)  # GPT-2 Conv1D layers turned into Linear
    quantized: bool = False
    # modules_to_save, as PEFT's ModulesToSaveWrapper keeps them: the trained module (in place, so
    # the model's names stay its own) and a frozen copy of the original, which the model computes
    # with while adapters are disabled or no active adapter lists the module.
    trained_modules: dict[str, nn.Module] = field(default_factory=dict)
    original_modules: dict[str, nn.Module] = field(default_factory=dict)


def _state(model: nn.Module) -> PatchState | None:
    return getattr(model, STATE_ATTR, None)


def _require_state(model: nn.Module) -> PatchState:
    state = _state(model)
    if state is None:
        raise ValueError("this model is not patched by peft_fast (call peft_fast.patch first)")
    return state


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer (LoraLinear, LoraEmbedding) in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def token_layers(model: nn.Module) -> list:
    """The TrainableTokensLayer of every trainable-tokens wrapper (embeddings first, then tied heads)."""
    return [wrapper.token_adapter for _, wrapper in token_wrappers(model)]


def _token_targets(model: nn.Module, config: LoraConfig, targets: list[str]) -> tuple[dict, list[str]]:
    """({embedding: indices}, tied heads) for ``config.trainable_token_indices`` (empty without it)."""
    if config.trainable_token_indices is None:
        return {}, []
    return token_targets(model, config.trainable_token_indices, targets, config.modules_to_save)


def _is_lora_base(module: nn.Module) -> bool:
    """A layer LoRA can wrap: Linear / Conv1D / NF4Linear, or nn.Embedding (named targets only, as PEFT)."""
    return is_base_linear(module) or isinstance(module, nn.Embedding)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``config`` targets; raises with close names when nothing matches.

    Candidates are the Linear / Conv1D / NF4Linear layers and the model's LoraLinear layers (as
    their base: a new adapter may go on layers the first one wraps or on others, as in PEFT), never
    a module inside another method's wrapper, and, as in PEFT, never a module inside (or equal to) a
    module of ``modules_to_save``.
    """
    heads = output_head_names(model)
    wrappers = [n for n, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), nn.Module)]
    saved = modules_to_save_names(model, _with_task_modules(config).modules_to_save)
    names = []
    unsupported = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers) or inside(name, saved):
            continue
        wrapped_parameter = isinstance(module, LoraParamWrapper)
        if isinstance(module, LoraLayer):
            module = module.base_layer
        if config.target_modules == "all-linear":
            chosen = is_base_linear(module) and name not in heads
        else:
            chosen = matches(name, config.target_modules)
        if (not chosen or matches(name, config.exclude_modules)
                or not layer_index_ok(name, config.layers_to_transform, config.layers_pattern)):  # fmt: skip
            continue
        if wrapped_parameter:
            raise ValueError(f"target_modules selects {name}, whose parameters are adapted by target_parameters: a "
                             "module is targeted by target_modules or by target_parameters, not both")  # fmt: skip
        if not _is_lora_base(module):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        names.append(name)
    if config.use_dora:
        _check_dora_targets(model, names)
    if unsupported:
        raise ValueError(
            "target_modules selects modules that are not Linear / Conv1D / Embedding layers: "
            + ", ".join(unsupported[:8])
            + ("" if len(unsupported) <= 8 else f" and {len(unsupported) - 8} more")
        )
    if not names and config.target_parameters:
        if config.target_modules:  # PEFT warns too when its target_parameters matched
            warnings.warn(f"target_modules={config.target_modules!r} matched no module (target_parameters is used)",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
        return names
    if not names:
        filters = {key: getattr(config, key) for key in ("exclude_modules", "layers_to_transform")}
        raise no_match_error(model, config.target_modules, filters)
    return names


def _param_key(target: tuple[str, str]) -> str:
    """A targeted parameter's full name (what rank_pattern / alpha_pattern match, as in PEFT)."""
    return f"{target[0]}.{target[1]}"


def _check_same_parameters(state: PatchState, config: LoraConfig) -> None:
    """PEFT's rule: every adapter that uses target_parameters targets the same set of parameters."""
    if not config.target_parameters:
        return
    for name, other in state.configs.items():
        if other.target_parameters and set(other.target_parameters) != set(config.target_parameters):
            raise ValueError(
                "When using multiple adapters with target_parameters, all adapters must target the same set of "
                f"parameters (as in PEFT), but got {sorted(config.target_parameters)} for the new adapter and "
                f"{sorted(other.target_parameters)} for adapter {name!r}"
            )


def _check_dora_targets(model: nn.Module, names: list[str]) -> None:
    """DoRA runs on linear layers only: refuse, naming them, targets that are embeddings (PEFT's DoRA
    embedding variant is not implemented here), before the model is touched."""
    embeddings = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoraLayer):
            module = module.base_layer
        if isinstance(module, nn.Embedding):
            embeddings.append(name)
    if embeddings:
        shown = ", ".join(embeddings[:8]) + ("" if len(embeddings) <= 8 else f" and {len(embeddings) - 8} more")
        raise ValueError(
            f"DoRA (use_dora=True) is supported on Linear / Conv1D layers (dense or NF4) only; these targets are "
            f"Embedding layers: {shown}. Leave them out of target_modules (or use plain LoRA for them)"
        )


def _with_task_modules(config: LoraConfig) -> LoraConfig:
    """``config`` with the modules PEFT saves for its task type (SEQ_CLS: classifier / score) in modules_to_save."""
    wanted = config.modules_to_save or []
    extra = [name for name in TASK_MODULES_TO_SAVE.get(config.task_type, ()) if name not in wanted]
    return config.replace(modules_to_save=[*wanted, *extra]) if extra else config


def _check_user_modules_to_save(model: nn.Module, config: LoraConfig) -> None:
    """Every modules_to_save entry must exist, except those the task type adds (PEFT adds both classifier
    and score and uses the one the model has)."""
    added = TASK_MODULES_TO_SAVE.get(config.task_type, ())
    check_modules_to_save(model, [name for name in config.modules_to_save or () if name not in added])


def _base_inits(model: nn.Module, targets: list[str], config: LoraConfig) -> dict[str, tuple]:
    """PiSSA / OLoRA / LoftQ: (A, B) per target from its base weight, each base left its residual.

    Every target is checked before any weight changes (a refused one leaves the model as it was).
    """
    from peft_fast.lora.init import init_from_base

    bases: dict[str, nn.Module] = {}
    for name in targets:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if type(base) is not nn.Linear and not (isinstance(base, NF4Linear) and config.init_lora_weights == "olora"):
            init_from_base(base, config.init_lora_weights, 1, 1.0, where=name)  # raises, naming the layer
        bases[name] = base
    out = {}
    for name, base in bases.items():
        r, alpha = config.rank_for(name), config.alpha_for(name)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        out[name] = init_from_base(base, config.init_lora_weights, r, scaling, config.loftq_config, where=name)
    return out


def _new_adapter(
    layer: LoraLayer, name: str, config: LoraConfig, adapter_name: str, initial: tuple | None = None
) -> None:
    extra = {} if initial is None else {"initial": initial}  # from the base weight: linear layers only
    if config.lora_bias:
        if isinstance(layer, LoraEmbedding):  # as PEFT: its embedding layer takes no lora_bias
            raise ValueError(f"lora_bias=True is not supported for embedding layers ({name})")
        extra["lora_bias"] = True
    layer.update_layer(adapter_name, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
                       config.init_lora_weights, config.use_rslora, config.use_dora, **extra)  # fmt: skip
    # PEFT's autocast_adapter_dtype (get_peft_model's default): over an fp16 / bf16 base the adapter
    # is kept in fp32 (the forward casts it to the compute dtype; its gradients and optimizer state
    # stay fp32). compute_dtype, when given, is the adapter's dtype instead.
    for param in layer.adapter_parameters(adapter_name):
        dtype = config.compute_dtype or (torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else None)
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _wrap(module: nn.Module) -> LoraLayer:
    """A LoRA layer around ``module`` (a Conv1D becomes an equivalent Linear first)."""
    layer = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(as_linear(module))
    # In the wrapped module's mode: an eval model gets no LoRA dropout (nn.Module starts in train mode).
    return layer.train(module.training)


def patch_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Turn ``model`` into a LoRA (or, with ``config.quantize="nf4"``, QLoRA) model in place.

    Every target module becomes a :class:`LoraLinear` with adapter ``adapter_name``; with
    quantization every Linear except the output head is stored in NF4 first, layer by layer.
    All other parameters are frozen (biases and ``modules_to_save`` stay trainable as
    ``config`` says). Returns the same model object.
    """
    check_adapter_name(adapter_name)
    state = _state(model)
    if state is not None:
        raise ValueError(
            f"this model is already patched (adapters {list(state.configs)}); "
            f"use peft_fast.add_adapter(model, config, {adapter_name!r}) for another adapter"
        )
    config = _with_task_modules(config)
    targets = find_targets(model, config)
    param_targets = find_parameter_targets(model, config, targets)
    _check_user_modules_to_save(model, config)
    tokens, tied_heads = _token_targets(model, config, targets)
    state = PatchState(configs={adapter_name: config}, active=[adapter_name], quantized=config.quantize == "nf4")
    # Every GPT-2 Conv1D is noted before NF4 quantization turns it into an NF4Linear (which the
    # check in the loop below no longer sees as one), so that merge gives back Conv1D layers.
    state.conv1d_names = conv1d_names(model)

    # PiSSA / OLoRA / LoftQ read the full-precision weights: before NF4 quantization, which then
    # quantizes the residual bases (what PEFT advises: "re-quantize the residual model").
    initial = _base_inits(model, targets, config) if is_base_init(config.init_lora_weights) else {}
    # Not host.prepare_host_model: LoRA keeps modules_to_save dense too, quantizes (with a progress
    # bar) whatever Linear layers are left even if some are NF4 already, and freezes every
    # parameter, another method's included (patch LoRA first: see peft_fast.ia3).
    if config.quantize == "nf4":
        # Dense: modules_to_save, trainable tokens, and the modules of targeted parameters (their
        # forward reads the parameter).
        dense = (*(config.modules_to_save or ()), *tokens, *tied_heads, *sorted({owner for owner, _ in param_targets}))
        quantize_host_model(model, config.blocksize, config.double_quant, dense)
    for param in model.parameters():
        param.requires_grad_(False)
    wrap_tokens(model, tokens, tied_heads, adapter_name)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, (nn.Linear, NF4Linear, nn.Embedding)):
            state.conv1d_names.add(name)
        layer = _wrap(module)
        _new_adapter(layer, name, config, adapter_name, initial.get(name))
        set_submodule(model, name, layer)
    for target, wrapper in wrap_parameters(model, param_targets).items():
        _new_adapter(wrapper, _param_key(target), config, adapter_name)
    _mark_trainable(model, config, adapter_name, state)
    setattr(model, STATE_ATTR, state)
    mixed.install(model)
    return model


def _mark_trainable(model: nn.Module, config: LoraConfig, adapter_name: str, state: PatchState) -> None:
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            for param in layer.adapter_parameters(adapter_name):
                param.requires_grad_(True)
    _set_token_adapters(model, [adapter_name])
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            if not isinstance(layer, LoraParamWrapper) and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
    for name in modules_to_save_names(model, config.modules_to_save):
        module = model.get_submodule(name)
        if name not in state.trained_modules:
            # The original, frozen, for disabled adapters (PEFT's ModulesToSaveWrapper.original_module).
            state.original_modules[name] = copy.deepcopy(module).requires_grad_(False)
            state.trained_modules[name] = module
        untie(model, module)
        for param in module.parameters():
            param.requires_grad_(True)


def add_lora_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Add another adapter to an already patched model (on the same base; not activated)."""
    state = _require_state(model)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"add_adapter adds LoRA adapters: config must be a LoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} exists already")
    if config.quantize != next(iter(state.configs.values())).quantize:
        raise ValueError("every adapter of a model must agree on quantize")
    config = _with_task_modules(config)
    # A new adapter goes on its targets, wrapped by the first adapter or not (PEFT's "LoRA Different"
    # case); it starts inactive and frozen.
    _check_same_parameters(state, config)
    targets = find_targets(model, config)
    param_targets = find_parameter_targets(model, config, targets)
    _check_user_modules_to_save(model, config)
    tokens, tied_heads = _token_targets(model, config, targets)
    # From the base weight (PiSSA, OLoRA, LoftQ): the shared base becomes the new adapter's residual,
    # under the other adapters too, as in PEFT.
    initial = _base_inits(model, targets, config) if is_base_init(config.init_lora_weights) else {}
    wrap_tokens(model, tokens, tied_heads, adapter_name)  # inactive and frozen, as the new LoRA layers
    for name in targets:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLayer):
            if not isinstance(layer, (nn.Linear, NF4Linear, nn.Embedding)):
                state.conv1d_names.add(name)
            layer = _wrap(layer)
            set_submodule(model, name, layer)
        _new_adapter(layer, name, config, adapter_name, initial.get(name))
        layer.set_adapter([n for n in state.active if n in layer.lora_A])
        for param in layer.adapter_parameters(adapter_name):
            param.requires_grad_(False)
    for target, wrapper in wrap_parameters(model, param_targets).items():
        _new_adapter(wrapper, _param_key(target), config, adapter_name)
        wrapper.set_adapter([n for n in state.active if n in wrapper.lora_A])
        for param in wrapper.adapter_parameters(adapter_name):
            param.requires_grad_(False)
    for name in modules_to_save_names(model, config.modules_to_save):
        if name not in state.trained_modules:
            state.original_modules[name] = copy.deepcopy(model.get_submodule(name)).requires_grad_(False)
            state.trained_modules[name] = model.get_submodule(name)
    state.configs[adapter_name] = config
    _set_token_adapters(model, state.active)
    _use_saved_modules(model, state, state.active)
    return model


def _set_token_adapters(model: nn.Module, active: list[str]) -> None:
    """The trainable-tokens layers compute with (and train) the rows of the active adapters only."""
    for layer in token_layers(model):
        layer.active_adapters = [name for name in active if name in layer.adapters()]
        if not layer.tied:
            for name, param in layer.trainable_tokens_delta.items():
                param.requires_grad_(name in active)


def _use_saved_modules(model: nn.Module, state: PatchState, active: list[str]) -> None:
    """Put each modules_to_save module's trained copy in place if an active adapter lists it, else the original."""
    for name, trained in state.trained_modules.items():
        configs = [state.configs[a] for a in active if a in state.configs]
        listed = any(matches_modules_to_save(name, config.modules_to_save) for config in configs)
        set_submodule(model, name, trained if listed else state.original_modules[name])


def set_lora_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
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
            for param in layer.adapter_parameters(adapter):
                param.requires_grad_(trainable)
    state.active = names
    _set_token_adapters(model, names)
    _use_saved_modules(model, state, names)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block every LoraLinear computes with its base weights only, and modules_to_save
    with their originals (as PEFT's ``disable_adapter``)."""
    state = _require_state(model)
    layers = [layer for _, layer in lora_layers(model)] + token_layers(model)
    with flags_set(layers, "disable_adapters", True):
        _use_saved_modules(model, state, [])
        try:
            yield
        finally:
            _use_saved_modules(model, state, state.active)


def unpatch_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter and put the original modules back (NF4 bases stay NF4Linear)."""
    layers = [(name, layer) for name, layer in lora_layers(model) if not isinstance(layer, LoraParamWrapper)]
    put_bases_back(model, layers, _require_state(model).conv1d_names)
    unwrap_parameters(model, merge=False)
    for name, wrapper in token_wrappers(model):
        set_submodule(model, name, wrapper.base_layer)
    delattr(model, STATE_ATTR)
    mixed.uninstall(model)
    return model


def _lora_bias_delta(name: str, layer: LoraLayer) -> torch.Tensor | None:
    """Σ s·b_B over the active lora_bias adapters of ``layer`` (what merging adds to its base bias), or None."""
    if isinstance(layer, LoraEmbedding) or layer.disable_adapters:
        return None
    biases = [(a, layer.lora_B[a].bias) for a in layer.active_adapters if a in layer.lora_B]
    biases = [(a, b) for a, b in biases if b is not None]
    if not biases:
        return None
    if getattr(layer.base_layer, "bias", None) is None:
        raise RuntimeError(
            f"cannot merge {name}: its adapter has lora_bias=True but the base layer has no bias (as in PEFT); "
            "nothing was merged"
        )
    return sum(layer.scaling[a] * b.detach().float() for a, b in biases)


def merge_lora_layers(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active adapters into the base weights of every LoraLinear and remove LoRA's state.

    An NF4 base is dequantized to ``dtype`` (default: the weight's original dtype); NF4 layers
    without an adapter are left to the caller (the merge front door dequantizes them once no
    method is left on the model).
    """
    state = _require_state(model)
    layers = [(name, layer) for name, layer in lora_layers(model) if not isinstance(layer, LoraParamWrapper)]
    biases = {name: _lora_bias_delta(name, layer) for name, layer in layers}  # refuses before anything merges
    wrappers = token_wrappers(model)
    rows = {name: w.token_adapter.merged_weight().detach() for name, w in wrappers if not w.token_adapter.tied}
    for name, wrapper in wrappers:  # the rows into the embedding (a tied head shares its weight), as PEFT merges
        if name in rows:
            wrapper.base_layer.weight.data = rows[name]
        set_submodule(model, name, wrapper.base_layer)
    for name, layer in layers:
        merged = layer.merged_weight(dtype)
        if biases[name] is not None:
            with torch.no_grad():
                layer.base_layer.bias.add_(biases[name].to(layer.base_layer.bias.dtype))
        if isinstance(layer, LoraEmbedding):
            # Into the base embedding itself, as PEFT merges (a tied output head sees the merge too).
            layer.base_layer.weight.data = merged
            set_submodule(model, name, layer.base_layer)
        else:
            set_submodule(model, name, restore_base(layer, name in state.conv1d_names, dtype, merged))
    unwrap_parameters(model, merge=True)  # W + Σ s·ΔW into each targeted parameter, in its own dtype
    delattr(model, STATE_ATTR)
    mixed.uninstall(model)
    return model
