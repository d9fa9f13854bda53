"""Fused subclasses of Hugging Face module classes, made once per (class, variant) and picklable.

A fused piece is applied by giving a module a subclass of its own class (``module.__class__ =``):
its parameters, buffers, state-dict names and ``isinstance`` checks stay those of the original, and
``unfuse`` gives the original class back. Each subclass keeps the original's ``__name__`` (Hugging
Face reads class names: ``_no_split_modules``, ``config.architectures``) and lives in this module's
namespace under a unique attribute, so ``pickle`` and ``copy.deepcopy`` find it.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

_CACHE: dict[tuple, type] = {}


def fused_subclass(original: type, kind: str, members: dict[str, Any], variant: tuple = ()) -> type:
    """The subclass of ``original`` with ``members`` (a forward, class attributes) for ``kind`` and ``variant``.

    ``variant`` names what else the members depend on (an activation, a norm's casting), so two
    models of one class with different settings get different subclasses.
    """
    key = (original, kind, variant)
    cls = _CACHE.get(key)
    if cls is None:
        digest = hashlib.sha1(repr((original.__module__, original.__qualname__, kind, variant)).encode()).hexdigest()
        attr = f"Fused{kind.title().replace('_', '')}_{original.__name__}_{digest[:10]}"
        cls = type(original.__name__, (original,), {**members, "_peft_fast_fused_kind": kind, "__module__": __name__})
        cls.__qualname__ = attr
        setattr(sys.modules[__name__], attr, cls)
        _CACHE[key] = cls
    return cls


def original_class(cls: type) -> type:
    """The Hugging Face class under any number of fused subclasses."""
    while "_peft_fast_fused_kind" in cls.__dict__:
        cls = cls.__mro__[1]
    return cls


def is_fused(module: Any, kind: str | None = None) -> bool:
    """Whether ``module``'s class is a fused subclass (of ``kind``, when given)."""
    fused_kind = type(module).__dict__.get("_peft_fast_fused_kind")
    return fused_kind is not None and (kind is None or fused_kind == kind)
