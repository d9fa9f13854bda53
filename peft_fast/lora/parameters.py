"""LoRA on ``nn.Parameter``s (``target_parameters``): which parameters, their wrappers in and out.

PEFT 0.21's rules: an entry matches a parameter whose full name (module name + ``.`` + parameter
name, any ``base_layer`` of a wrapper left out) is the entry or ends with ``.`` + the entry. Each
matched parameter gets its own :class:`~peft_fast.layers.LoraParamWrapper` around the module that
holds it; several parameters of one module nest, the first in the module's registration order
innermost (so the second's adapter is ``<module>.lora_A``, the first's ``<module>.base_layer.lora_A``,
as PEFT names them). A later adapter reuses the wrappers. Nothing here changes a model until
:func:`wrap_parameters`; :func:`find_parameter_targets` validates everything first.
"""

from __future__ import annotations

import difflib

from torch import nn

from peft_fast.config import LoraConfig
from peft_fast.host import set_submodule
from peft_fast.layers import PARAM_DTYPES, AdapterLayer, LoraParamWrapper
from peft_fast.targeting import matches_modules_to_save

__all__ = [
    "ParamTarget",
    "find_parameter_targets",
    "parameter_chains",
    "parameter_wrapper_names",
    "unwrap_parameters",
    "wrap_parameters",
]

ParamTarget = tuple[str, str]  # (the owning module's name, without wrappers; the parameter's name in it)


def _strip_wrappers(name: str) -> str:
    return name.replace(".base_layer", "")


def _chain(module: nn.Module) -> list[LoraParamWrapper]:
    """The parameter wrappers at one place, outermost first (empty for a plain module)."""
    chain = []
    while isinstance(module, LoraParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain


def _owner(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.owner if isinstance(module, LoraParamWrapper) else module


def find_parameter_targets(model: nn.Module, config: LoraConfig, module_targets: list[str]) -> list[ParamTarget]:
    """The parameters ``config.target_parameters`` selects, in PEFT's order; refuses, before any change:

    an entry that matches no parameter (with the close names), a parameter of the top-level module, one
    that is not 2-D / 3-D or not fp32 / fp16 / bf16, one whose module is (or holds, or sits inside) a
    LoRA target module or another method's layer, a modules_to_save module, or another targeted
    parameter's module.
    """
    wanted = config.target_parameters or []
    if not wanted:
        return []
    # Modules under another layer's adapter (lora_A, ...) are no candidates; those under a parameter
    # wrapper's base_layer are (their names without the wrappers'), as PEFT strips "base_layer".
    adapter_layers = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    found: list[ParamTarget] = []
    hits = dict.fromkeys(wanted, 0)
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) or any(
            name.startswith(w + ".") and not name.startswith(w + ".base_layer") for w in adapter_layers if w
        ):
            continue
        owner = _strip_wrappers(name)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{owner}.{param_name}" if owner else param_name
            matched = [w for w in wanted if key == w or key.endswith("." + w)]
            for entry in matched:
                hits[entry] += 1
            if matched:
                found.append((owner, param_name))
    missing = [entry for entry, count in hits.items() if not count]
    if missing:
        names = sorted(n for n, p in model.named_parameters() if p.dim() in (2, 3) and ".lora_" not in n)
        close = sorted({c for m in missing for c in difflib.get_close_matches(m, names, n=5, cutoff=0.3)})
        raise ValueError(
            f"target_parameters {missing} match no parameter of {type(model).__name__} (an entry is a parameter's "
            f"full name or its end after a '.'). Close names: {close or names[:12]}"
        )
    _check_parameter_targets(model, config, found, module_targets)
    return found


def _check_parameter_targets(model, config, found: list[ParamTarget], module_targets: list[str]) -> None:
    owners = sorted({owner for owner, _ in found})
    layers = [_strip_wrappers(n) for n, m in model.named_modules() if isinstance(m, AdapterLayer)
              and not isinstance(m, LoraParamWrapper)]  # fmt: skip
    taken = set(module_targets) | set(layers)
    for owner, param_name in found:
        key = f"{owner}.{param_name}" if owner else param_name
        if not owner:
            raise ValueError(f"target_parameters: {key!r} is a parameter of the top-level module, which PEFT cannot "
                             "wrap either; target a parameter of a submodule")  # fmt: skip
        inside = [t for t in taken if t == owner or t.startswith(owner + ".") or owner.startswith(t + ".")]
        if inside:
            raise ValueError(
                f"target_parameters: {key!r} belongs to {owner!r}, which is (or holds, or sits inside) the LoRA / "
                f"adapter layer {sorted(inside)[0]!r}: a module is targeted by target_modules or by target_parameters, "
                "not both (for HF models, PEFT's default target_modules may do this: pass target_modules=[])"
            )
        if any(matches_modules_to_save(n, config.modules_to_save) for n in _prefixes(owner)):
            raise ValueError(f"target_parameters: {key!r} is inside a modules_to_save module; peft_fast does not "
                             "support both on one module")  # fmt: skip
        nested = [o for o in owners if o != owner and o.startswith(owner + ".")]
        if nested:
            raise ValueError(f"target_parameters: {key!r} belongs to {owner!r}, which holds {nested[0]!r}, another "
                             "targeted parameter's module; peft_fast does not nest those")  # fmt: skip
        param = _owner(model, owner)._parameters[param_name]
        if param.dim() not in (2, 3):
            raise ValueError(
                f"target_parameters: {key!r} has shape {tuple(param.shape)}; LoRA on parameters takes 2-D "
                "([out, in]) or 3-D ([experts, in, out] / [experts, out, in]) parameters, as PEFT"
            )
        if param.dtype not in PARAM_DTYPES:
            raise ValueError(f"target_parameters: {key!r} is {param.dtype}; LoRA on parameters needs fp32 / fp16 / "
                             "bf16 parameters")  # fmt: skip


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def parameter_wrapper_names(model: nn.Module, targets: list[ParamTarget]) -> dict[ParamTarget, str]:
    """Where each target's wrapper is (or will be, once :func:`wrap_parameters` ran): ``owner`` + ``.base_layer``·k."""
    out: dict[ParamTarget, str] = {}
    by_owner: dict[str, list[str]] = {}
    for owner, param_name in targets:
        by_owner.setdefault(owner, []).append(param_name)
    for owner, names in by_owner.items():
        existing = [w.parameter_name for w in _chain(model.get_submodule(owner))]
        new = [n for n in names if n not in existing]
        order = [*reversed(new), *existing]  # new wrappers go outside the existing ones, in order
        for depth, param_name in enumerate(order):
            if param_name in names:
                out[(owner, param_name)] = owner + ".base_layer" * depth
    return out


def wrap_parameters(model: nn.Module, targets: list[ParamTarget]) -> dict[ParamTarget, LoraParamWrapper]:
    """Each target's wrapper: the existing one, or a new one put around the module (in its train / eval mode)."""
    out = {}
    for owner, param_name in targets:
        current = model.get_submodule(owner)
        existing = [w for w in _chain(current) if w.parameter_name == param_name]
        if existing:
            out[(owner, param_name)] = existing[0]
            continue
        wrapper = LoraParamWrapper(current, param_name).train(current.training)
        set_submodule(model, owner, wrapper)
        out[(owner, param_name)] = wrapper
    return out


def parameter_chains(model: nn.Module) -> list[tuple[str, list[LoraParamWrapper]]]:
    """(name, wrappers outermost first) for every place of the model wrapped by parameter wrappers."""
    out = []
    for name, module in model.named_modules():
        inner = name.endswith(".base_layer") and isinstance(model.get_submodule(name[: -len(".base_layer")]),
                                                            LoraParamWrapper)  # fmt: skip
        if isinstance(module, LoraParamWrapper) and not inner:
            out.append((name, _chain(module)))
    return out


def unwrap_parameters(model: nn.Module, merge: bool) -> None:
    """Put each wrapped module back in place of its wrappers, the active adapters folded into its parameters first
    when ``merge`` (PEFT's ``merge_and_unload``)."""
    for name, chain in parameter_chains(model):
        if merge:
            for wrapper in chain:
                wrapper.merge()
        set_submodule(model, name, chain[-1].base_layer)
