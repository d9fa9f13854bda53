"""Bottleneck adapters (Houlsby, Pfeiffer, He et al.'s parallel adapter) in Hugging Face models.

An adapter computes ``h + s·up(act(down(LN?(h))))`` with the fused ``peft_fast::bottleneck_adapter``
op. ``patch_adapters`` finds the transformer layers, adds the adapters' parameters where
AdapterHub keeps them (``<owner>.adapters.<name>.adapter_down.0.weight`` ...) and registers
forward hooks on the host's sublayer modules; the host's own modules, classes and state-dict
keys stay as they were, and ``unpatch_adapters`` removes every trace.

Where the adapters go, per family (recognised by the layer's child modules):

============  ===================================  =====================================  ========================
family        attention adapter (owner / host)     FFN adapter (owner / host)             parallel adapter input
============  ===================================  =====================================  ========================
Llama-family  ``attention_adapters`` / self_attn   ``output_adapters`` / ``mlp``          the sublayer's input
GPT-2         ``attention_adapters`` / ``attn``    ``output_adapters`` / ``mlp``          the sublayer's input
BERT          ``attention.output`` / its dropout   ``output`` / its dropout               the residual argument
T5            ``layer.0`` / SelfAttention          ``layer.<last>`` / DenseReluDense      the sublayer's input
============  ===================================  =====================================  ========================

A serial adapter transforms the host's output, the sublayer's output before the residual add
(BERT: after dense and dropout, before ``LayerNorm(h + input)``). A parallel adapter reads the
sublayer's input and adds its scaled output to the sublayer's output; in BERT's post-LN layers,
whose residual add lives inside ``BertSelfOutput`` / ``BertOutput``, it is added to their
``input_tensor`` argument instead, which is the same sum before the LayerNorm.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peft_fast.adapter_files import (
    adapter_directory,
    check_adapter_tensors,
    output_directory,
    read_adapter_pair,
    write_adapter_pair,
)
from peft_fast.config import AdapterConfig, check_adapter_name
from peft_fast.host import prepare_host_model, register_state_attr, set_submodule
from peft_fast.method import Method, flags_set
from peft_fast.models import hidden_size
from peft_fast.version import __version__

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "METHOD",
    "AdapterProjection",
    "AdapterSite",
    "AdapterSlot",
    "BottleneckAdapter",
    "BottleneckMethod",
    "adapter_state_dict",
    "bottleneck_adapters",
    "load_adapters",
    "patch_adapters",
    "reload_adapters",
    "save_adapters",
    "transformer_layers",
    "unpatch_adapters",
    "write_adapter_files",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter.safetensors"  # AdapterHub's name for safetensors adapter weights
_STATE_ATTR = register_state_attr("peft_fast_adapter_state")


# -- modules ----------------------------------------------------------------------------------


class AdapterProjection(nn.Module):
    """The weight [out, in] and bias [out] of an adapter projection.

    An nn.Linear's parameters, but deliberately not an nn.Linear: NF4 quantization and LoRA's
    ``"all-linear"`` then leave adapters alone. The fused op reads the parameters; the module has
    no forward of its own.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BottleneckAdapter(nn.Module):
    """``residual + s·dropout(up(act(down(LN?(x)))))``, with AdapterHub's parameter names.

    ``adapter_down[0]`` is the down-projection (AdapterHub's Sequential puts its activation at
    index 1, which has no parameters), ``adapter_up`` the up-projection, ``adapter_norm_before``
    the optional input LayerNorm.
    """

    def __init__(self, hidden_size: int, bottleneck_size: int, config: AdapterConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.adapter_norm_before = nn.LayerNorm(hidden_size, **factory) if config.ln_before else None
        self.adapter_down = nn.ModuleList([AdapterProjection(hidden_size, bottleneck_size, **factory)])
        self.adapter_up = AdapterProjection(bottleneck_size, hidden_size, **factory)
        self.non_linearity = config.non_linearity
        self.scaling = config.scaling
        self.dropout_p = config.dropout
        self.enabled = True  # False: the hooks skip it (disable_adapters, or not among the active adapters)
        self.reset_parameters(config.init_weights)

    def reset_parameters(self, init_weights: str) -> None:
        """``"mam_adapter"``: the up-projection is zero, so the adapter starts as the identity;
        ``"houlsby"``: both projections from N(0, 1e-2) truncated at ±2e-2, biases zero."""
        down, up = self.adapter_down[0], self.adapter_up
        with torch.no_grad():
            if init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(down.weight, a=5**0.5)
                nn.init.zeros_(up.weight)
            elif init_weights == "houlsby":
                for weight in (down.weight, up.weight):
                    nn.init.trunc_normal_(weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            else:
                raise ValueError(f"unknown init_weights {init_weights!r}; valid choices: mam_adapter, houlsby")
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        from peft_fast.ops import autocast_dtype, bottleneck_adapter

        dtype = autocast_dtype(x) or x.dtype  # inside torch.autocast: its dtype (x is cast by the op)
        cast = lambda t: None if t is None else t.to(dtype)
        norm = self.adapter_norm_before
        down, up = self.adapter_down[0], self.adapter_up
        return bottleneck_adapter(
            x, cast(down.weight), cast(down.bias), cast(up.weight), cast(up.bias), residual=residual,
            ln_weight=cast(norm and norm.weight), ln_bias=cast(norm and norm.bias),
            ln_eps=norm.eps if norm is not None else 1e-5, scale=self.scaling, activation=self.non_linearity,
            dropout_p=self.dropout_p, training=self.training,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity}, scaling={self.scaling}, dropout={self.dropout_p}"


class AdapterSlot(nn.Module):
    """A container added to a transformer layer (AdapterHub's ``attention_adapters`` /
    ``output_adapters``): it only holds the ``adapters`` ModuleDict; hooks call the adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()


# -- where adapters go --------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSite:
    """One adapter position in one transformer layer (paths relative to the layer)."""

    location: str  # "attention" or "ffn"
    owner: str  # the module holding the `adapters` ModuleDict (created as an AdapterSlot if absent)
    host: str  # the module whose output is the sublayer's output before the residual add
    residual_arg: bool = False  # parallel adapters enter through `owner`'s residual argument (post-LN)


def _has_children(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def _llama_sites(layer: nn.Module) -> list[AdapterSite]:
    return [AdapterSite("attention", "attention_adapters", "self_attn"), AdapterSite("ffn", "output_adapters", "mlp")]


def _gpt2_sites(layer: nn.Module) -> list[AdapterSite]:
    return [AdapterSite("attention", "attention_adapters", "attn"), AdapterSite("ffn", "output_adapters", "mlp")]


def _bert_sites(layer: nn.Module) -> list[AdapterSite]:
    # The hosts are the Dropouts that end BertSelfOutput / BertOutput: their output is the sublayer's
    # output before LayerNorm(h + input), and unlike `dense` they are never replaced by LoRA or (IA)³.
    return [
        AdapterSite("attention", "attention.output", "attention.output.dropout", residual_arg=True),
        AdapterSite("ffn", "output", "output.dropout", residual_arg=True),
    ]


def _t5_sites(layer: nn.Module) -> list[AdapterSite]:
    last = len(layer.layer) - 1  # the FFN follows self-attention (and, in the decoder, cross-attention)
    return [
        AdapterSite("attention", "layer.0", "layer.0.SelfAttention"),
        AdapterSite("ffn", f"layer.{last}", f"layer.{last}.DenseReluDense"),
    ]


def _is_t5_block(module: nn.Module) -> bool:
    sublayers = getattr(module, "layer", None)
    return (
        isinstance(sublayers, nn.ModuleList)
        and len(sublayers) >= 2
        and _has_children(sublayers[0], "SelfAttention")
        and _has_children(sublayers[-1], "DenseReluDense")
    )


# (family, is a layer of it, its adapter sites); checked in this order.
_FAMILIES: tuple[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], list[AdapterSite]]], ...] = (
    ("llama", lambda m: _has_children(m, "self_attn", "mlp", "input_layernorm"), _llama_sites),
    ("gpt2", lambda m: _has_children(m, "attn", "mlp", "ln_1"), _gpt2_sites),
    ("bert", lambda m: _has_children(m, "attention", "intermediate", "output"), _bert_sites),
    ("t5", _is_t5_block, _t5_sites),
)
SUPPORTED_FAMILIES = "Llama-family (self_attn + mlp + input_layernorm), GPT-2, BERT, T5"


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module, list[AdapterSite]]]:
    """(name, layer, sites) for every transformer layer of a supported family, in model order."""
    found: list[tuple[str, nn.Module, list[AdapterSite]]] = []
    for name, module in model.named_modules():
        if any(name.startswith(layer_name + ".") for layer_name, _, _ in found[-1:]):
            continue  # inside the previous layer
        for _, is_layer, sites in _FAMILIES:
            if is_layer(module):
                found.append((name, module, sites(module)))
                break
    return found


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


@dataclass
class _Placement:
    """One adapter to insert: its layer, site, and the site's module paths in the model."""

    layer_path: str
    site: AdapterSite
    owner_path: str
    host_path: str


def _plan(model: nn.Module, config: AdapterConfig) -> list[_Placement]:
    """Every adapter position ``config`` asks for; raises (touching nothing) if there is none."""
    layers = transformer_layers(model)
    if not layers:
        raise ValueError(
            f"found no transformer layers in {type(model).__name__}; bottleneck adapters support {SUPPORTED_FAMILIES}"
        )
    bad = [i for i in config.leave_out if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"leave_out {bad} is outside the model's layers 0..{len(layers) - 1}")
    return [
        _Placement(name, site, _join(name, site.owner), _join(name, site.host))
        for index, (name, _, sites) in enumerate(layers)
        if index not in config.leave_out
        for site in sites
        if site.location in config.locations
    ]


# -- patching -----------------------------------------------------------------------------------


@dataclass
class AdapterState:
    """What ``patch_adapters`` did to a model, kept on it as ``model.peft_fast_adapter_state``."""

    hidden_size: int
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)
    created_slots: list[str] = field(default_factory=list)  # AdapterSlot modules we added
    owners: list[str] = field(default_factory=list)  # existing modules we gave an `adapters` dict


def _state(model: nn.Module) -> AdapterState | None:
    return getattr(model, _STATE_ATTR, None)


def _first_float_tensor(module: nn.Module) -> torch.Tensor:
    """A floating-point parameter or buffer of ``module``: where new adapters take device and dtype."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor
    raise ValueError(f"{type(module).__name__} has no floating-point parameter to take a dtype from")


def _serial_hook(adapter: BottleneckAdapter, module: nn.Module, args: tuple, output):
    if not adapter.enabled:
        return output
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def _parallel_hook(adapter: BottleneckAdapter, module: nn.Module, args: tuple, kwargs: dict, output):
    if not adapter.enabled:
        return output
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (adapter(x, residual=output[0]), *output[1:])
    return adapter(x, residual=output)


def _parallel_residual_hook(adapter: BottleneckAdapter, module: nn.Module, args: tuple, kwargs: dict):
    # BertSelfOutput / BertOutput(hidden_states, input_tensor) = LayerNorm(dense(h) + input_tensor):
    # input_tensor + s·A(input_tensor) adds the adapter beside the sublayer, inside the LayerNorm.
    if not adapter.enabled:
        return args, kwargs
    if len(args) >= 2:
        return (args[0], adapter(args[1]), *args[2:]), kwargs
    return args, {**kwargs, "input_tensor": adapter(kwargs["input_tensor"])}


def _register(model: nn.Module, placement: _Placement, adapter: BottleneckAdapter, parallel: bool) -> RemovableHandle:
    if not parallel:
        host = model.get_submodule(placement.host_path)
        return host.register_forward_hook(functools.partial(_serial_hook, adapter))
    if placement.site.residual_arg:
        owner = model.get_submodule(placement.owner_path)
        return owner.register_forward_pre_hook(functools.partial(_parallel_residual_hook, adapter), with_kwargs=True)
    host = model.get_submodule(placement.host_path)
    return host.register_forward_hook(functools.partial(_parallel_hook, adapter), with_kwargs=True)


def _adapter_dict(model: nn.Module, owner_path: str, state: AdapterState) -> nn.ModuleDict:
    """The ``adapters`` ModuleDict at ``owner_path``, created (with its AdapterSlot) if needed."""
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        owner = AdapterSlot()
        set_submodule(model, owner_path, owner)
        state.created_slots.append(owner_path)
    if owner_path not in state.created_slots and owner_path not in state.owners:
        owner.adapters = nn.ModuleDict()
        state.owners.append(owner_path)
    return owner.adapters


def _check_owners_free(model: nn.Module, plan: list[_Placement], state: AdapterState | None) -> None:
    """An owner module we neither created nor claimed must not have an ``adapters`` attribute yet."""
    known = set() if state is None else {*state.created_slots, *state.owners}
    for placement in plan:
        if placement.owner_path in known:
            continue
        with contextlib.suppress(AttributeError):  # absent: an AdapterSlot will be created there
            if hasattr(model.get_submodule(placement.owner_path), "adapters"):
                raise ValueError(f"{placement.owner_path} already has an attribute named `adapters`")


def patch_adapters(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Insert bottleneck adapter ``adapter_name`` into every transformer layer of ``model``, in place.

    Placement, width, activation, scaling, dropout and initialisation follow ``config``; with
    ``config.quantize="nf4"`` the host's Linear layers are stored in NF4 first. The host's own
    parameters are frozen (unless another peft_fast method patched the model first, whose choices
    are kept); the new adapters are trainable. Another name adds a second adapter, applied after
    the first. Everything is checked before the model is touched. Returns the same model.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a peft_fast.AdapterConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    state = _state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"the model already has a bottleneck adapter named {adapter_name!r}")
    hidden = hidden_size(model)
    bottleneck = config.bottleneck_for(hidden)
    plan = _plan(model, config)
    _check_owners_free(model, plan, state)
    prepare_host_model(model, config.quantize, config.blocksize, config.double_quant)
    if state is None:
        state = AdapterState(hidden_size=hidden)
        setattr(model, _STATE_ATTR, state)
    for placement in plan:
        reference = _first_float_tensor(model.get_submodule(placement.layer_path))
        adapter = BottleneckAdapter(hidden, bottleneck, config, device=reference.device, dtype=reference.dtype)
        _adapter_dict(model, placement.owner_path, state)[adapter_name] = adapter
        state.handles.append(_register(model, placement, adapter, config.is_parallel))
    state.configs[adapter_name] = config
    return model


def bottleneck_adapters(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, BottleneckAdapter]]:
    """(module name, adapter) for every bottleneck adapter (of ``adapter_name``, if given)."""
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter) and (adapter_name is None or name.endswith(f".{adapter_name}")):
            yield name, module


def unpatch_adapters(model: nn.Module) -> nn.Module:
    """Remove every bottleneck adapter, hook and container; the model is as before patching."""
    state = _state(model)
    if state is None:
        raise ValueError("this model has no bottleneck adapters (call peft_fast.patch_adapters first)")
    for handle in state.handles:
        handle.remove()
    for path in state.owners:
        delattr(model.get_submodule(path), "adapters")
    for path in state.created_slots:
        set_submodule(model, path, None)
    delattr(model, _STATE_ATTR)
    return model


# -- files ------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` under the model's own parameter names."""
    marker = f".adapters.{adapter_name}."
    return {name: param.detach().contiguous().cpu() for name, param in model.named_parameters() if marker in f".{name}"}


def save_adapters(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` (format: docs/adapters.md).

    One pair (:func:`peft_fast.adapter_files.write_adapter_pair`): both complete before either is renamed,
    the config's digest in the weights' metadata, under the directory's lock.
    """
    state = _state(model)
    if state is None:
        raise ValueError("this model has no bottleneck adapters (call peft_fast.patch_adapters first)")
    adapter_name = adapter_name or next(iter(state.configs))
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; the model has {list(state.configs)}")
    return write_adapter_files(model, directory, adapter_name, adapter_state_dict(model, adapter_name))


def _document(model: nn.Module, state: AdapterState, adapter_name: str) -> dict:
    """The adapter_config.json of adapter ``adapter_name`` (docs/adapters.md)."""
    model_config = getattr(model, "config", None)
    return {
        "config": _resolved_dict(state.configs[adapter_name], state.hidden_size),
        "hidden_size": state.hidden_size,
        "model_class": type(model).__name__,
        "model_name": getattr(model_config, "_name_or_path", None) or None,
        "model_type": getattr(model_config, "model_type", None),
        "name": adapter_name,
        "version": f"peft_fast.{__version__}",
    }


def _resolved_dict(config: AdapterConfig, hidden: int) -> dict:
    """``config.to_dict()`` with both the width and AdapterHub's reduction factor, as this hidden size resolves them."""
    bottleneck = config.bottleneck_for(hidden)
    return {**config.to_dict(), "bottleneck_size": bottleneck, "reduction_factor": hidden / bottleneck}


def write_adapter_files(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write adapter ``adapter_name``'s config and ``tensors`` (the model's parameter names) as one pair."""
    config_bytes = (json.dumps(_document(model, _state(model), adapter_name), indent=2, sort_keys=True) + "\n").encode()
    directory = output_directory(directory)
    return write_adapter_pair(directory, ADAPTER_WEIGHTS_FILE, tensors, config_bytes, ADAPTER_CONFIG_FILE)


def reload_adapters(model: nn.Module, directory: str | os.PathLike, adapter_name: str) -> None:
    """Copy the tensors of the adapter saved in ``directory`` into the model's adapter ``adapter_name``, in place.

    The file must hold an adapter of the same config (placement, width, ...) for this hidden size;
    which adapters are enabled and trainable stays as it was (what a resume needs).
    """
    state = _state(model)
    files = _read_files(adapter_directory(directory))
    document, tensors = files.config, files.tensors
    theirs = AdapterConfig.from_dict(document.get("config", {}))
    ours = state.configs[adapter_name]
    if document.get("hidden_size") != state.hidden_size:
        raise ValueError(f"the adapter at {directory} is for hidden size {document.get('hidden_size')}, "
                         f"not {state.hidden_size}")  # fmt: skip
    theirs, ours = _resolved_dict(theirs, state.hidden_size), _resolved_dict(ours, state.hidden_size)
    differ = [f"{key}: file {theirs.get(key)!r}, model {value!r}"
              for key, value in ours.items() if theirs.get(key) != value]  # fmt: skip
    if differ:
        raise ValueError(f"the adapter at {directory} does not match adapter {adapter_name!r}: {'; '.join(differ)}")
    saved_name = document.get("name", "default")
    renamed = {key.replace(f".adapters.{saved_name}.", f".adapters.{adapter_name}."): t for key, t in tensors.items()}
    own = dict(model.named_parameters())
    expected = {key: tuple(value.shape) for key, value in adapter_state_dict(model, adapter_name).items()}
    check_adapter_tensors(renamed, expected, f"adapter at {directory}", model)
    files.check_written_together()
    with torch.no_grad():
        for key, tensor in renamed.items():
            own[key].copy_(tensor.to(own[key].dtype))


def _read_files(directory: Path):
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}")
    return read_adapter_pair(directory, ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)  # together, under the lock


def _expected_shapes(model: nn.Module, config: AdapterConfig, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """File key -> shape for every tensor adapter ``adapter_name`` with ``config`` has in ``model``."""
    d = hidden_size(model)
    m = config.bottleneck_for(d)
    shapes = {"adapter_down.0.weight": (m, d), "adapter_down.0.bias": (m,), "adapter_up.weight": (d, m),
              "adapter_up.bias": (d,)}  # fmt: skip
    if config.ln_before:
        shapes |= {"adapter_norm_before.weight": (d,), "adapter_norm_before.bias": (d,)}
    return {
        f"{placement.owner_path}.adapters.{adapter_name}.{key}": shape
        for placement in _plan(model, config)
        for key, shape in shapes.items()
    }


def load_adapters(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None, is_trainable: bool = False
) -> nn.Module:
    """Load an adapter written by :func:`save_adapters` (under ``adapter_name``, default: its saved name).

    Refuses, before touching the model, a file for another hidden size or whose tensors do not
    match the positions and shapes its config implies. Returns the model.
    """
    directory = adapter_directory(directory)
    files = _read_files(directory)
    document, tensors = files.config, files.tensors
    config = AdapterConfig.from_dict(document.get("config", {}))
    saved_name = document.get("name", "default")
    adapter_name = adapter_name or saved_name
    hidden = hidden_size(model)
    if document.get("hidden_size", hidden) != hidden:
        raise ValueError(f"the adapter at {directory} is for hidden size {document['hidden_size']}, not {hidden}")
    expected = _expected_shapes(model, config, saved_name)
    check_adapter_tensors(tensors, expected, f"adapter at {directory}", model)
    files.check_written_together()  # an interrupted or concurrent save: refused before the model changes
    patch_adapters(model, config, adapter_name)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = key.replace(f".adapters.{saved_name}.", f".adapters.{adapter_name}.")
            params[name].copy_(tensor.to(params[name].dtype))
    if not is_trainable:
        for _, adapter in bottleneck_adapters(model, adapter_name):
            adapter.requires_grad_(False)
    return model


class BottleneckMethod(Method):
    """Bottleneck adapters (AdapterConfig): hooked adapters in each layer; several adapters, all active; no merge."""

    name = "bottleneck adapters"
    config_types = (AdapterConfig,)
    state_attr = _STATE_ATTR
    stacks = True
    trainer_hooks = True
    weights_file = ADAPTER_WEIGHTS_FILE
    config_file = ADAPTER_CONFIG_FILE

    def patch(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        patch_adapters(model, config, adapter_name)

    def add_adapter(self, model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
        patch_adapters(model, config, adapter_name)  # another name adds an adapter, applied after the others

    def adapter_names(self, model: nn.Module) -> list[str]:
        return list(_state(model).configs)

    def active_adapters(self, model: nn.Module) -> list[str]:
        names = self.adapter_names(model)
        return [n for n in names if any(a.enabled for _, a in bottleneck_adapters(model, n))]

    def set_adapter(self, model: nn.Module, adapter_names: list[str]) -> None:
        for name in self.adapter_names(model):
            for _, adapter in bottleneck_adapters(model, name):
                adapter.enabled = name in adapter_names
                adapter.requires_grad_(name in adapter_names)

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return flags_set([adapter for _, adapter in bottleneck_adapters(model)], "enabled", False)

    def unpatch(self, model: nn.Module) -> None:
        unpatch_adapters(model)

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict:
        return adapter_state_dict(model, adapter_name)

    def reads(self, adapter_config: dict) -> bool:
        # Our own format (docs/adapters.md): no peft_type, the adapter's config and the host's hidden size.
        return adapter_config.get("peft_type") is None and {"hidden_size", "config"} <= adapter_config.keys()

    def save(self, model: nn.Module, directory: Path, adapter_name: str) -> Path:
        return save_adapters(model, directory, adapter_name)

    def load(self, model: nn.Module, directory, adapter_name: str | None, is_trainable: bool):
        return load_adapters(model, directory, adapter_name, is_trainable)

    def model_key(self, model: nn.Module, file_key: str, adapter_name: str) -> str:
        return file_key  # the file holds the model's own parameter names

    def save_tensors(self, model: nn.Module, directory: Path, adapter_name: str, tensors: dict) -> Path:
        return write_adapter_files(model, directory, adapter_name, tensors)

    def reload(self, model: nn.Module, directory, adapter_name: str) -> None:
        reload_adapters(model, directory, adapter_name)


METHOD = BottleneckMethod()
