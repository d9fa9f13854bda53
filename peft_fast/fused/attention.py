"""Attention modules whose rotary embedding runs through ``peft_fast::rope`` (q and k rotated in one kernel).

Hugging Face's attention forwards call their modeling module's ``apply_rotary_pos_emb``. The
fused subclass's ``forward`` is the original function itself, rebuilt over a copy of its module's
globals in which that name is ours: the modelling code is Hugging Face's, line for line, and only
the rotation differs. Models that are not patched, of any family, keep the original function.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types

from torch import nn

from peft_fast.fused.classes import fused_subclass

_ROPE_NAME = "apply_rotary_pos_emb"


def _rope_of(module_class: type):
    """The ``apply_rotary_pos_emb`` the class's modeling module defines, or None."""
    return getattr(sys.modules.get(module_class.__module__), _ROPE_NAME, None)


def _fused_rope(original):
    """Our rotation with the original function's signature (some take ``position_ids`` before ``unsqueeze_dim``)."""
    parameters = list(inspect.signature(original).parameters)

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        from peft_fast.ops.rope import apply_rope

        bound = dict(zip(parameters[4:], args, strict=False), **kwargs)
        # Out of place: q and k are views of the projections' outputs (see apply_rope's in_place).
        return apply_rope(q, k, cos, sin, unsqueeze_dim=bound.get("unsqueeze_dim", 1), in_place=False)

    apply_rotary_pos_emb._peft_fast_rope = True
    return apply_rotary_pos_emb


_SHADOWS: dict[str, types.ModuleType] = {}


def _shadow_module(module_name: str, replacements: dict) -> types.ModuleType:
    """A registered copy of a modeling module whose namespace has ``replacements`` (made once per module).

    The rebuilt functions need globals that are a real module's ``__dict__``: ``torch.compile`` finds
    a function's globals through ``sys.modules[globals["__name__"]]`` to guard on them.
    """
    shadow = _SHADOWS.get(module_name)
    if shadow is None:
        name = f"peft_fast.fused._shadow.{module_name}"
        shadow = types.ModuleType(name)
        shadow.__dict__.update(sys.modules[module_name].__dict__)
        shadow.__dict__.update(replacements, __name__=name)
        sys.modules[name] = shadow
        _SHADOWS[module_name] = shadow
    return shadow


def _with_globals(fn, namespace: dict):
    """A copy of ``fn`` whose innermost function runs over the globals ``namespace``.

    A decorator made with ``functools.wraps`` keeps the function it wraps in a closure cell and in
    ``__wrapped__``: each such layer is rebuilt (over its own globals) with the cell pointing at the
    rebuilt inner function.
    """
    inner = getattr(fn, "__wrapped__", None)
    cells = fn.__closure__
    if inner is not None and cells:
        rebuilt_inner = _with_globals(inner, namespace)
        cells = tuple(types.CellType(rebuilt_inner) if _cell_value(cell) is inner else cell for cell in cells)
        rebuilt = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
        rebuilt.__wrapped__ = rebuilt_inner
    else:
        rebuilt = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, cells)
    rebuilt.__kwdefaults__ = fn.__kwdefaults__
    for name, value in fn.__dict__.items():
        if name != "__wrapped__":
            rebuilt.__dict__[name] = value
    rebuilt.__qualname__, rebuilt.__doc__, rebuilt.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return rebuilt


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _calls_rope(fn) -> bool:
    """Whether ``fn`` (or a function it wraps) looks up ``apply_rotary_pos_emb`` as a global."""
    while fn is not None:
        if _ROPE_NAME in getattr(getattr(fn, "__code__", None), "co_names", ()):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def fusable_attention(module: nn.Module, classes: tuple[str, ...]) -> bool:
    """An attention module of the family whose forward calls its module's ``apply_rotary_pos_emb``."""
    cls = type(module)
    forward = cls.forward
    return cls.__name__ in classes and _rope_of(cls) is not None and _calls_rope(forward)


def fuse_attention(module: nn.Module) -> None:
    """Give ``module`` the original forward with our rotation."""
    cls = type(module)
    shadow = _shadow_module(cls.__module__, {_ROPE_NAME: _fused_rope(_rope_of(cls))})
    forward = _with_globals(cls.forward, shadow.__dict__)
    module.__class__ = fused_subclass(cls, "rope", {"forward": forward})


def rope_is_fused(module: nn.Module) -> bool:
    """Whether ``module`` rotates through our op (for tests and the summary)."""
    forward = type(module).forward
    while forward is not None:
        rope = forward.__globals__.get(_ROPE_NAME) if hasattr(forward, "__globals__") else None
        if getattr(rope, "_peft_fast_rope", False):
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False
