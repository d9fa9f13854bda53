"""(IA)³ in Hugging Face models: IA3Linear layers, patching, merging, PEFT-format save and load.

(IA)³ learns one vector per target layer that rescales the layer's output (attention k / v) or,
for ``feedforward_modules``, its input (the FFN's down-projection). ``patch_ia3`` replaces each
target Linear (or GPT-2 Conv1D, or NF4Linear) with an :class:`IA3Linear`, whose forward is one
``peft_fast::ia3_linear`` op: the GEMM with the scale fused in, over a dense or NF4 weight. The
module layout is PEFT's (``base_layer``, ``ia3_l.<adapter>`` with PEFT's [out, 1] / [1, in]
shapes), so adapter files carry PEFT's key names (``base_model.model.<path>.ia3_l``) and load
in PEFT 0.21, and PEFT's files load here.

(IA)³ and LoRA mix on different modules: patch LoRA first (its ``patch`` freezes every other
parameter, (IA)³ vectors included), then (IA)³ on modules LoRA left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peft_fast.adapter_files import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    check_adapter_tensors,
    module_features,
    output_directory,
    read_adapter_files,
    write_adapter_pair,
)
from peft_fast.config import IA3Config, check_adapter_name
from peft_fast.host import (
    as_linear,
    conv1d_names,
    dequantize_nf4_layers,
    has_method,
    plain_layer,
    prepare_host_model,
    put_bases_back,
    register_state_attr,
    set_submodule,
)
from peft_fast.layers import AdapterLayer, LoraLinear, NF4Linear
from peft_fast.method import Method, flags_set
from peft_fast.nf4 import NF4Weight, dequantize_nf4
from peft_fast.targeting import is_base_linear, matches, no_match_error, output_head_names

__all__ = [
    "METHOD",
    "IA3Linear",
    "IA3Method",
    "find_ia3_targets",
    "ia3_layers",
    "ia3_state_dict",
    "load_ia3",
    "merge_ia3",
    "patch_ia3",
    "save_ia3",
    "unpatch_ia3",
]

_STATE_ATTR = register_state_attr("peft_fast_ia3_state")
_PEFT_PREFIX = PEFT_PREFIX


class IA3Linear(AdapterLayer):
    """A frozen base linear (``nn.Linear`` or :class:`NF4Linear`) with (IA)³ vectors, laid out as PEFT's.

    ``ia3_l[<adapter>]`` is [out_features, 1] (output scaling) or [1, in_features] when
    ``is_feedforward`` (input scaling). Active adapters' vectors multiply, as in PEFT.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError(f"IA3Linear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add adapter ``adapter_name``: ones (the identity), or PEFT's randn with ``init_ia3_weights=False``."""
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = torch.ones(shape) if init_ia3_weights else torch.randn(shape)
        self.ia3_l[adapter_name] = nn.Parameter(vector.to(device=self.base_device(), dtype=self.base_dtype()))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def scale_vector(self) -> torch.Tensor | None:
        """The product of the active adapters' vectors, flat (None when no adapter is active)."""
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.ia3_l]
        if not active:
            return None
        scale = self.ia3_l[active[0]].flatten()
        for name in active[1:]:
            scale = scale * self.ia3_l[name].flatten()
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from peft_fast.ops import base_linear, ia3_linear

        # The dtypes of PEFT's (IA)³ over nn.Linear or bitsandbytes' Linear4bit, autocast included.
        x, base, bias, _, out_dtype = self.compute_inputs(x)
        scale = self.scale_vector()
        if scale is None:
            return base_linear(x, base, bias).to(out_dtype)
        return ia3_linear(x, base, scale, bias, scale_input=self.is_feedforward).to(out_dtype)

    def merged_weight_and_bias(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b'): diag(l)·W and l ⊙ b for output scaling, W·diag(l) and b for input scaling.

        Computed in fp32 from the (dequantized) base; W' in ``dtype`` (default: the base's dtype).
        """
        base = self.base_weight()
        out_dtype = dtype or self.base_dtype()
        weight = dequantize_nf4(base, torch.float32) if isinstance(base, NF4Weight) else base.float()
        bias = self.base_layer.bias
        scale = self.scale_vector()
        if scale is not None:
            scale = scale.detach().float()
            if self.is_feedforward:
                weight = weight * scale[None, :]
            else:
                weight = weight * scale[:, None]
                bias = None if bias is None else (bias.float() * scale).to(bias.dtype)
        return weight.to(out_dtype), None if bias is None else bias.detach().clone()

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.is_feedforward else "output"
        return f"scales={kind}, adapters={list(self.ia3_l)}, active={self.active_adapters}"


@dataclass
class IA3State:
    """What ``patch_ia3`` did, kept on the model as ``model.peft_fast_ia3_state``."""

    config: IA3Config  # with the targets resolved
    adapter_name: str
    conv1d_names: set[str] = field(default_factory=set)  # GPT-2 Conv1D layers turned into Linear


def _state(model: nn.Module) -> IA3State:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no (IA)³ adapter (call peft_fast.patch_ia3 first)")
    return state


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Linear]]:
    """(name, layer) for every IA3Linear of the model."""
    for name, module in model.named_modules():
        if isinstance(module, IA3Linear):
            yield name, module


def _is_feedforward(name: str, feedforward_modules: list[str] | str | None) -> bool:
    """PEFT's rule: a regex over the full name, or a list entry the name ends with (no dot needed)."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


def find_ia3_targets(model: nn.Module, config: IA3Config) -> list[tuple[str, bool]]:
    """(name, is_feedforward) of every module ``config`` targets; config's targets must be resolved.

    Raises, naming close module names, when nothing matches; and when a target is already a LoRA
    or (IA)³ layer or is not a Linear / Conv1D.
    """
    heads = output_head_names(model)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, IA3Linear))]
    found, refused = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        if config.target_modules == "all-linear":
            chosen = is_base_linear(module) and name not in heads
        else:
            chosen = matches(name, config.target_modules)
        if not chosen or matches(name, config.exclude_modules):
            continue
        if isinstance(module, (LoraLinear, IA3Linear)):
            method = "LoRA" if isinstance(module, LoraLinear) else "(IA)³"
            refused.append(f"{name} (already a {method} layer; (IA)³ and LoRA must target different modules)")
        elif not is_base_linear(module):
            refused.append(f"{name} ({type(module).__name__}, not a Linear / Conv1D)")
        else:
            found.append((name, _is_feedforward(name, config.feedforward_modules)))
    if refused:
        raise ValueError("cannot add (IA)³ to: " + "; ".join(refused[:8]))
    if not found:
        raise no_match_error(model, config.target_modules)
    return found


def _resolved(model: nn.Module, config: IA3Config) -> IA3Config:
    return config.for_model_type(getattr(getattr(model, "config", None), "model_type", None))


def patch_ia3(model: nn.Module, config: IA3Config, adapter_name: str = "default") -> nn.Module:
    """Give ``model`` an (IA)³ adapter, in place: every target becomes an :class:`IA3Linear`.

    Targets default to PEFT's for the model type. With ``config.quantize="nf4"`` the Linear layers
    (but the output head) are stored in NF4 first. Other parameters are frozen unless another
    peft_fast method patched the model first. Everything is checked before the model is touched.
    """
    if not isinstance(config, IA3Config):
        raise TypeError(f"config must be a peft_fast.IA3Config, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError(f"the model already has the (IA)³ adapter {_state(model).adapter_name!r}")
    config = _resolved(model, config)
    targets = find_ia3_targets(model, config)
    state = IA3State(config=config, adapter_name=adapter_name)
    # Note GPT-2 Conv1D layers before NF4 quantization turns them into NF4Linear, for unpatch / merge.
    state.conv1d_names = conv1d_names(model)
    prepare_host_model(model, config.quantize, config.blocksize, config.double_quant)
    for name, is_feedforward in targets:
        layer = IA3Linear(as_linear(model.get_submodule(name)), is_feedforward)
        layer.update_layer(adapter_name, config.init_ia3_weights)
        vector = layer.ia3_l[adapter_name]
        if vector.dtype in (torch.float16, torch.bfloat16):
            # PEFT's autocast_adapter_dtype: the vectors stay fp32 over an fp16 / bf16 base (the op
            # applies them in fp32 anyway).
            vector.data = vector.data.float()
        set_submodule(model, name, layer)
    setattr(model, _STATE_ATTR, state)
    return model


def unpatch_ia3(model: nn.Module) -> nn.Module:
    """Remove the (IA)³ adapter and put the base layers back (NF4 bases stay NF4Linear)."""
    put_bases_back(model, list(ia3_layers(model)), _state(model).conv1d_names)
    delattr(model, _STATE_ATTR)
    return model


def fold_ia3(model: nn.Module, dtype: torch.dtype | None = None) -> set[str]:
    """Replace every IA3Linear by a plain layer holding its merged weight; remove (IA)³'s state.

    Returns the names of the model's GPT-2 Conv1D layers (noted at patch time) for the caller.
    """
    state = _state(model)
    for name, layer in list(ia3_layers(model)):
        weight, bias = layer.merged_weight_and_bias(dtype)
        set_submodule(model, name, plain_layer(weight, bias, name in state.conv1d_names))
    delattr(model, _STATE_ATTR)
    return state.conv1d_names


def merge_ia3(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the (IA)³ vectors into the base weights (and output-scaled biases), in place.

    NF4 bases are dequantized to ``dtype`` (default: the weight's original dtype). When no other
    peft_fast method remains on the model, every other NF4 layer is dequantized too, so the result
    is a plain Hugging Face model.
    """
    conv1d = fold_ia3(model, dtype)
    if not has_method(model):
        dequantize_nf4_layers(model, dtype, conv1d)
    return model


# -- files in PEFT's layout -----------------------------------------------------------------------


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for the (IA)³ adapter, under PEFT's key names (no adapter name)."""
    adapter = _state(model).adapter_name
    return {
        f"{_PEFT_PREFIX}{name}.ia3_l": layer.ia3_l[adapter].detach().contiguous().cpu()
        for name, layer in ia3_layers(model)
    }


def save_ia3(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT 0.21 does for (IA)³.

    One pair (:func:`peft_fast.adapter_files.write_adapter_pair`): both complete before either is renamed,
    the config's digest in the weights' metadata, under the directory's lock.
    """
    state = _state(model)
    model_config = getattr(model, "config", None)
    config_dict = state.config.to_peft_dict(getattr(model_config, "_name_or_path", None) or None)
    # PEFT sets fan_in_fan_out when it wraps a Conv1D (GPT-2), and writes the config as it left it.
    # (True for a Conv1D, False for a Linear: the last wrapped layer's.)
    for name, _ in ia3_layers(model):
        config_dict["fan_in_fan_out"] = name in state.conv1d_names
    config_bytes = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()
    return write_adapter_pair(output_directory(directory), ADAPTER_WEIGHTS, ia3_state_dict(model), config_bytes)


def load_ia3(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Load an (IA)³ adapter saved by PEFT (or by :func:`save_ia3`) into ``model``.

    Refuses, before touching the model, a config we cannot run, targets the model lacks, and
    tensors that are missing, unexpected or of the wrong shape. Returns the model.
    """
    files = read_adapter_files(directory)
    raw_config, tensors = files.config, files.tensors
    config = _resolved(model, IA3Config.from_peft_dict(raw_config))
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError(f"the model already has the (IA)³ adapter {_state(model).adapter_name!r}")
    expected = {}
    for name, is_feedforward in find_ia3_targets(model, config):
        out_features, in_features = module_features(model.get_submodule(name))
        expected[f"{_PEFT_PREFIX}{name}.ia3_l"] = (1, in_features) if is_feedforward else (out_features, 1)
    check_adapter_tensors(tensors, expected, f"(IA)³ adapter at {directory}", model)
    files.check_written_together()  # an interrupted or concurrent save: refused before the model changes
    patch_ia3(model, config, adapter_name)
    with torch.no_grad():
        for name, layer in ia3_layers(model):
            vector = layer.ia3_l[adapter_name]
            vector.copy_(tensors[f"{_PEFT_PREFIX}{name}.ia3_l"].to(vector.dtype))
            vector.requires_grad_(is_trainable)
    return model


class IA3Method(Method):
    """(IA)³ (IA3Config): IA3Linear layers around the targets; one adapter per model; merges."""

    name = "(IA)³"
    config_types = (IA3Config,)
    state_attr = _STATE_ATTR
    mergeable = True

    def patch(self, model: nn.Module, config: IA3Config, adapter_name: str) -> None:
        patch_ia3(model, config, adapter_name)

    def adapter_names(self, model: nn.Module) -> list[str]:
        return [_state(model).adapter_name]

    def active_adapters(self, model: nn.Module) -> list[str]:
        return next((list(layer.active_adapters) for _, layer in ia3_layers(model)), [])

    def set_adapter(self, model: nn.Module, adapter_names: list[str]) -> None:
        for _, layer in ia3_layers(model):
            layer.active_adapters = [name for name in adapter_names if name in layer.ia3_l]
            for name, vector in layer.ia3_l.items():
                vector.requires_grad_(name in adapter_names)

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        _state(model)
        return flags_set([layer for _, layer in ia3_layers(model)], "disable_adapters", True)

    def merge(self, model: nn.Module, dtype) -> None:
        fold_ia3(model, dtype)

    def unpatch(self, model: nn.Module) -> None:
        unpatch_ia3(model)

    def conv1d_names(self, model: nn.Module) -> set[str]:
        return set(_state(model).conv1d_names)

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict:
        return ia3_state_dict(model)

    def reads(self, adapter_config: dict) -> bool:
        return adapter_config.get("peft_type") == "IA3"

    def save(self, model: nn.Module, directory: Path, adapter_name: str) -> Path:
        return save_ia3(model, directory)

    def load(self, model: nn.Module, directory, adapter_name: str | None, is_trainable: bool):
        return load_ia3(model, directory, adapter_name or "default", is_trainable)


METHOD = IA3Method()
