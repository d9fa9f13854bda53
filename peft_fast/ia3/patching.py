"""(IA)³ on a Hugging Face model: IA3Linear layers in and out, several adapters, modules_to_save, merging.

(IA)³ learns one vector per target layer that rescales the layer's output (attention k / v) or,
for ``feedforward_modules``, its input (the FFN's down-projection). ``patch_ia3`` replaces each
target Linear (or GPT-2 Conv1D, or NF4Linear) with an :class:`IA3Linear`, whose forward is one
``peft_fast::ia3_linear`` op: the GEMM with the scale fused in, over a dense or NF4 weight. The
module layout is PEFT's (``base_layer``, ``ia3_l.<adapter>`` with PEFT's [out, 1] / [1, in]
shapes), so adapter files carry PEFT's key names (see :mod:`peft_fast.ia3.files`).

Several adapters, as PEFT's ``add_adapter`` / ``set_adapter``: each adapter has its own vectors
(on its own targets) and its own copy of each of its ``modules_to_save``; the active adapters'
vectors multiply (PEFT's rule), and the model computes with the trained copy of the active adapter
that lists a module (two active adapters listing one module are refused, as PEFT refuses them),
else with the frozen original (also inside ``disabled``).

(IA)³ and LoRA mix on different modules: patch LoRA first (its ``patch`` freezes every other
parameter, (IA)³ vectors included), then (IA)³ on modules LoRA left alone.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

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
    untie,
)
from peft_fast.layers import AdapterLayer, LoraLinear, NF4Linear
from peft_fast.method import flags_set
from peft_fast.nf4 import NF4Weight, dequantize_nf4
from peft_fast.targeting import (
    check_modules_to_save,
    inside,
    is_base_linear,
    matches,
    modules_to_save_names,
    no_match_error,
    output_head_names,
)

__all__ = [
    "STATE_ATTR",
    "IA3Linear",
    "IA3State",
    "add_ia3_adapter",
    "disabled",
    "find_ia3_targets",
    "fold_ia3",
    "ia3_layers",
    "merge_ia3",
    "patch_ia3",
    "require_state",
    "resolved",
    "set_ia3_adapter",
    "unpatch_ia3",
]

STATE_ATTR = register_state_attr("peft_fast_ia3_state")


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
    """What ``patch_ia3`` / ``add_ia3_adapter`` did, kept on the model as ``model.peft_fast_ia3_state``."""

    configs: dict[str, IA3Config] = field(default_factory=dict)  # by adapter, targets and task heads resolved
    active: list[str] = field(default_factory=list)
    conv1d_names: set[str] = field(default_factory=set)  # GPT-2 Conv1D layers turned into Linear
    # modules_to_save as PEFT's ModulesToSaveWrapper keeps them: module name -> adapter -> its trained
    # copy (the first adapter's is the model's own module object, so the model's names stay its own),
    # and the frozen original the model computes with when no active adapter lists the module.
    trained_modules: dict[str, dict[str, nn.Module]] = field(default_factory=dict)
    original_modules: dict[str, nn.Module] = field(default_factory=dict)


def require_state(model: nn.Module) -> IA3State:
    """The model's (IA)³ state; a ValueError when it has no (IA)³ adapter."""
    state = getattr(model, STATE_ATTR, None)
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


def find_ia3_targets(model: nn.Module, config: IA3Config, adding: bool = False) -> list[tuple[str, bool]]:
    """(name, is_feedforward) of every module ``config`` targets; config's targets must be resolved.

    As in PEFT, never a module inside (or equal to) one of ``modules_to_save``. With ``adding`` (a
    second adapter) an IA3Linear may be a target (its base is), if it scales the same side.
    Raises, naming close module names, when nothing matches; and when a target is a LoRA layer,
    an (IA)³ layer (unless adding), or not a Linear / Conv1D.
    """
    heads = output_head_names(model)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, IA3Linear))]
    saved = modules_to_save_names(model, config.modules_to_save)
    found, refused = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers) or inside(name, saved):
            continue
        base = module.base_layer if adding and isinstance(module, IA3Linear) else module
        if config.target_modules == "all-linear":
            chosen = is_base_linear(base) and name not in heads
        else:
            chosen = matches(name, config.target_modules)
        if not chosen or matches(name, config.exclude_modules):
            continue
        feedforward = _is_feedforward(name, config.feedforward_modules)
        if isinstance(module, LoraLinear) or (isinstance(module, IA3Linear) and not adding):
            method = "LoRA" if isinstance(module, LoraLinear) else "(IA)³"
            refused.append(f"{name} (already a {method} layer; (IA)³ and LoRA must target different modules)")
        elif isinstance(module, IA3Linear) and module.is_feedforward != feedforward:
            # PEFT would keep the first adapter's side silently; the new adapter would not be what it says.
            sides = ("input", "output") if module.is_feedforward else ("output", "input")
            refused.append(f"{name} (the other adapters scale its {sides[0]}, this one its {sides[1]})")
        elif not is_base_linear(base):
            refused.append(f"{name} ({type(module).__name__}, not a Linear / Conv1D)")
        else:
            found.append((name, feedforward))
    if refused:
        raise ValueError("cannot add (IA)³ to: " + "; ".join(refused[:8]))
    if not found:
        raise no_match_error(model, config.target_modules)
    return found


def resolved(model: nn.Module, config: IA3Config) -> IA3Config:
    """``config`` with PEFT's default targets for the model type and the task type's heads filled in."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return config.for_model_type(model_type).with_task_modules()


def _check_modules_to_save(model: nn.Module, config: IA3Config) -> None:
    """Every user entry must name a module (the task type adds both classifier and score; the model has one)."""
    from peft_fast.config import TASK_MODULES_TO_SAVE

    added = TASK_MODULES_TO_SAVE.get(config.task_type, ())
    check_modules_to_save(model, [name for name in config.modules_to_save or () if name not in added])


def _add_vectors(model: nn.Module, state: IA3State, config: IA3Config, adapter_name: str, targets) -> None:
    for name, is_feedforward in targets:
        layer = model.get_submodule(name)
        if not isinstance(layer, IA3Linear):
            layer = IA3Linear(as_linear(layer), is_feedforward)
            set_submodule(model, name, layer)
        layer.update_layer(adapter_name, config.init_ia3_weights)
        vector = layer.ia3_l[adapter_name]
        if vector.dtype in (torch.float16, torch.bfloat16):
            # PEFT's autocast_adapter_dtype: the vectors stay fp32 over an fp16 / bf16 base (the op
            # applies them in fp32 anyway).
            vector.data = vector.data.float()


def _add_saved_modules(model: nn.Module, state: IA3State, config: IA3Config, adapter_name: str) -> None:
    """Each module of ``config.modules_to_save`` gets a trained copy for ``adapter_name`` (frozen here)."""
    for name in modules_to_save_names(model, config.modules_to_save):
        copies = state.trained_modules.setdefault(name, {})
        if name not in state.original_modules:
            module = model.get_submodule(name)
            state.original_modules[name] = copy.deepcopy(module).requires_grad_(False)
            untie(model, module)  # a head tied to the embeddings: train its own copy, as PEFT does
            copies[adapter_name] = module
        else:
            copies[adapter_name] = copy.deepcopy(state.original_modules[name])
        copies[adapter_name].requires_grad_(False)


def patch_ia3(model: nn.Module, config: IA3Config, adapter_name: str = "default") -> nn.Module:
    """Give ``model`` an (IA)³ adapter, in place: every target becomes an :class:`IA3Linear`.

    Targets default to PEFT's for the model type. With ``config.quantize="nf4"`` the Linear layers
    (but the output head) are stored in NF4 first. Other parameters are frozen unless another
    peft_fast method patched the model first; ``modules_to_save`` train (a copy; the original is
    kept for disabled adapters). Everything is checked before the model is touched. A second
    adapter: :func:`add_ia3_adapter`.
    """
    if not isinstance(config, IA3Config):
        raise TypeError(f"config must be a peft_fast.IA3Config, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if getattr(model, STATE_ATTR, None) is not None:
        names = list(require_state(model).configs)
        raise ValueError(
            f"the model already has the (IA)³ adapter(s) {names}; "
            f"use peft_fast.add_adapter(model, config, {adapter_name!r}) for another"
        )
    config = resolved(model, config)
    _check_modules_to_save(model, config)
    targets = find_ia3_targets(model, config)
    state = IA3State(configs={adapter_name: config}, active=[adapter_name])
    # Note GPT-2 Conv1D layers before NF4 quantization turns them into NF4Linear, for unpatch / merge.
    state.conv1d_names = conv1d_names(model)
    # modules_to_save stay dense (they train whole), as LoRA keeps them.
    prepare_host_model(model, config.quantize, config.blocksize, config.double_quant,
                       tuple(config.modules_to_save or ()))  # fmt: skip
    _add_vectors(model, state, config, adapter_name, targets)
    _add_saved_modules(model, state, config, adapter_name)
    setattr(model, STATE_ATTR, state)
    set_ia3_adapter(model, [adapter_name])
    return model


def add_ia3_adapter(model: nn.Module, config: IA3Config, adapter_name: str) -> nn.Module:
    """Add another (IA)³ adapter, inactive and frozen (PEFT's ``add_adapter``); ``set_ia3_adapter`` activates it.

    Its targets may be the other adapters' layers (which must scale the same side) or others.
    """
    state = require_state(model)
    if not isinstance(config, IA3Config):
        raise TypeError(f"config must be a peft_fast.IA3Config, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if adapter_name in state.configs:
        raise ValueError(f"the model already has an (IA)³ adapter named {adapter_name!r}")
    first = next(iter(state.configs.values()))
    config = resolved(model, config)
    storage = ("quantize", "blocksize", "double_quant")
    if any(getattr(config, key) != getattr(first, key) for key in storage):
        raise ValueError("every (IA)³ adapter of a model must agree on quantize, blocksize and double_quant")
    _check_modules_to_save(model, config)
    targets = find_ia3_targets(model, config, adding=True)
    _add_vectors(model, state, config, adapter_name, targets)
    _add_saved_modules(model, state, config, adapter_name)
    state.configs[adapter_name] = config
    set_ia3_adapter(model, state.active)
    return model


def set_ia3_adapter(model: nn.Module, adapter_names: list[str]) -> None:
    """Make exactly ``adapter_names`` the active (IA)³ adapters; only they (and their modules_to_save) train."""
    state = require_state(model)
    unknown = [name for name in adapter_names if name not in state.configs]
    if unknown:
        raise ValueError(f"unknown (IA)³ adapter(s) {unknown}; the model has {list(state.configs)}")
    shared = [name for name, copies in state.trained_modules.items() if sum(a in copies for a in adapter_names) > 1]
    if shared:
        # One module computes with one copy: PEFT's ModulesToSaveWrapper refuses this too.
        raise ValueError(
            f"{', '.join(shared)} is in modules_to_save of several active adapters {adapter_names}; "
            "activate one of them at a time"
        )
    for _, layer in ia3_layers(model):
        layer.active_adapters = [name for name in adapter_names if name in layer.ia3_l]
        for name, vector in layer.ia3_l.items():
            vector.requires_grad_(name in adapter_names)
    for copies in state.trained_modules.values():
        for name, module in copies.items():
            module.requires_grad_(name in adapter_names)
    state.active = list(adapter_names)
    _use_saved_modules(model, state, state.active)


def _use_saved_modules(model: nn.Module, state: IA3State, active: list[str]) -> None:
    """Put in place the trained copy of the first active adapter listing each module, else the original."""
    for name, copies in state.trained_modules.items():
        chosen = next((copies[a] for a in active if a in copies), state.original_modules[name])
        set_submodule(model, name, chosen)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block every IA3Linear computes with its base only and modules_to_save with their originals."""
    state = require_state(model)
    with flags_set([layer for _, layer in ia3_layers(model)], "disable_adapters", True):
        _use_saved_modules(model, state, [])
        try:
            yield
        finally:
            _use_saved_modules(model, state, state.active)


def unpatch_ia3(model: nn.Module) -> nn.Module:
    """Remove every (IA)³ adapter and put the original modules back (NF4 bases stay NF4Linear)."""
    state = require_state(model)
    put_bases_back(model, list(ia3_layers(model)), state.conv1d_names)
    _use_saved_modules(model, state, [])
    delattr(model, STATE_ATTR)
    return model


def fold_ia3(model: nn.Module, dtype: torch.dtype | None = None) -> set[str]:
    """Replace every IA3Linear by a plain layer holding its merged weight (active adapters); remove (IA)³'s state.

    The modules_to_save in place (the active adapter's trained copies) stay, as PEFT's
    ``merge_and_unload`` leaves them. Returns the names of the model's GPT-2 Conv1D layers (noted
    at patch time) for the caller.
    """
    state = require_state(model)
    for name, layer in list(ia3_layers(model)):
        weight, bias = layer.merged_weight_and_bias(dtype)
        set_submodule(model, name, plain_layer(weight, bias, name in state.conv1d_names))
    delattr(model, STATE_ATTR)
    return state.conv1d_names


def merge_ia3(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold the active (IA)³ vectors into the base weights (and output-scaled biases), in place.

    NF4 bases are dequantized to ``dtype`` (default: the weight's original dtype). When no other
    peft_fast method remains on the model, every other NF4 layer is dequantized too, so the result
    is a plain Hugging Face model.
    """
    conv1d = fold_ia3(model, dtype)
    if not has_method(model):
        dequantize_nf4_layers(model, dtype, conv1d)
    return model
