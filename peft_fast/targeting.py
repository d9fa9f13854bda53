"""PEFT's rules for which modules a method touches, shared by every method.

``target_modules`` as names (a module whose name is, or ends with ``.``, an entry), a regex
(matched against the whole name) or ``"all-linear"`` (every Linear / Conv1D but the output head);
``exclude_modules`` by the same rule; ``layers_to_transform`` / ``layers_pattern`` by the layer
index in the name; ``modules_to_save`` by suffix. Nothing here changes a model.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from peft_fast.layers import NF4Linear
from peft_fast.models import OUTPUT_HEAD_NAMES
from peft_fast.quantize import is_quantizable_linear

__all__ = [
    "check_modules_to_save",
    "inside",
    "is_base_linear",
    "layer_index_ok",
    "matches",
    "matches_modules_to_save",
    "modules_to_save_names",
    "no_match_error",
    "output_head_names",
]

# PEFT's: the lazy .*? takes the first numbered segment (a layer's, not a nested expert's or T5 sublayer's).
_FIRST_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head(s), which "all-linear" leaves alone (as PEFT does)."""
    names = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        elif name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES:
            names.add(name)
    return names


def is_base_linear(module: nn.Module) -> bool:
    """A layer a method can wrap: nn.Linear, GPT-2's Conv1D, or an NF4Linear."""
    return is_quantizable_linear(module) or isinstance(module, NF4Linear)


def matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT's target_modules / exclude_modules rule: a regex over the full name, or a name suffix at a dot."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def matches_modules_to_save(name: str, patterns: list[str] | None) -> bool:
    """PEFT's modules_to_save rule: the module name ends with a pattern, no dot boundary needed.

    Not the target_modules rule (``matches``): under it ``["norm"]`` would miss Llama's
    ``input_layernorm``, which PEFT trains and saves.
    """
    return bool(name) and any(name.endswith(pattern) for pattern in patterns or ())


def layer_index_ok(name: str, layers_to_transform: list[int] | None, layers_pattern: str | list[str] | None) -> bool:
    """Whether ``name`` is in one of ``layers_to_transform`` (always, when that is None), by PEFT 0.21's rule.

    The layer index is the first numbered segment of the name (``encoder.block.0.layer.1.…wi`` is
    in layer 0: T5's ``block.N``, not its inner ``layer.N``); with ``layers_pattern`` the number
    after the first segment so named, which may be the first segment of all (a bare ``LlamaModel``'s
    ``layers.0.…``). Without a pattern, a name must have some segment before the numbered one.
    """
    if layers_to_transform is None:
        return True
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    else:
        match = _FIRST_LAYER_INDEX.match(name)
    return match is not None and int(match.group(1)) in layers_to_transform


def inside(name: str, prefixes: list[str] | set[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def modules_to_save_names(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """The names of the modules ``modules_to_save`` selects (outermost only: none inside another)."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if matches_modules_to_save(name, modules_to_save) and not inside(name, found):
            found.append(name)
    return found


def check_modules_to_save(model: nn.Module, modules_to_save: list[str] | None) -> None:
    """Every modules_to_save entry must name a module of ``model``."""
    for wanted in modules_to_save or ():
        if not any(matches_modules_to_save(name, [wanted]) for name, _ in model.named_modules()):
            raise ValueError(f"modules_to_save names {wanted!r}, which is not a module of {type(model).__name__}")


def no_match_error(model: nn.Module, target_modules, filters: dict[str, object] | None = None) -> ValueError:
    """The error for targets that match nothing: the close module names, and the filters that applied."""
    leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_base_linear(m)})
    wanted = target_modules if isinstance(target_modules, list) else [str(target_modules)]
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w, leaf_names, n=5, cutoff=0.3)})
    # Name the filters too: the targets may exist and be filtered out by them (as PEFT notes).
    shown = [f"{key}={value!r}" for key, value in (filters or {}).items() if value is not None]
    return ValueError(
        f"target_modules {target_modules!r} matches no module of {type(model).__name__}"
        + (f" (with {', '.join(shown)})" if shown else "")
        + f". Close names: {close or leaf_names[:12]}"
    )
