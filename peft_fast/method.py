"""The one interface every peft_fast method implements, and that the front doors call.

A method (LoRA / QLoRA, (IA)³, bottleneck adapters, the prompt methods) is one module that
defines a :class:`Method` subclass and one instance of it; :mod:`peft_fast.registry` lists them
by config type and by adapter-file kind. The front doors (:mod:`peft_fast.front_doors`) hold no
per-method code: they find the methods on a model and call these operations.

Conventions every method keeps:

- ``patch`` validates everything before it touches the model (a failed patch leaves it as it was);
- ``unpatch`` removes every trace of the method (the modules, hooks, attributes and parameters it
  added); NF4 bases stay NF4 (un-quantizing would not give the original weights back);
- ``disabled`` is a context manager inside which the model computes as if the method were absent;
- ``state_dict`` gives the adapter's tensors under the names of its file (PEFT's, where PEFT
  has the method), and ``save`` / ``load`` write and read that file with its config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peft_fast.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = ["Method"]


class Method:
    """One tuning method behind the front doors. Subclasses override what their method supports.

    Class attributes: ``name`` (in messages), ``config_types`` (the configs that select it),
    ``state_attr`` (the model attribute holding its per-model state; present iff it is on the
    model), ``mergeable``, ``stacks`` (whether ``add_adapter`` can add a second adapter) and
    ``trainer_hooks`` (whether the model gets the Hugging Face save / load hooks of
    :mod:`peft_fast.hf_integration`, which write and read this method's files through ``save``,
    ``load``, ``state_dict`` and the operations only they call, ``model_key``, ``save_tensors``,
    ``reload``, ``training_tensors`` and ``reload_training_tensors``: a method that sets it
    implements the first three of those too). ``weights_file`` / ``config_file``: the names of the
    two files of an adapter directory (PEFT's, unless the method has its own format).
    """

    name: ClassVar[str]
    config_types: ClassVar[tuple[type, ...]]
    state_attr: ClassVar[str]
    mergeable: ClassVar[bool] = False
    stacks: ClassVar[bool] = False
    trainer_hooks: ClassVar[bool] = False
    weights_file: ClassVar[str] = ADAPTER_WEIGHTS
    config_file: ClassVar[str] = ADAPTER_CONFIG

    # -- on a model ----------------------------------------------------------------------------

    def is_on(self, model: nn.Module) -> bool:
        """Whether this method has patched ``model``."""
        return getattr(model, self.state_attr, None) is not None

    def patch(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Add adapter ``adapter_name`` of this method to ``model`` in place (validated first)."""
        raise NotImplementedError

    def add_adapter(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        """Add another adapter to a model this method is on (inactive where the method has a notion of active)."""
        raise ValueError(f"{self.name}: one adapter per model (unpatch it before patching another)")

    def adapter_names(self, model: nn.Module) -> list[str]:
        """The names of this method's adapters on ``model``, in the order they were added."""
        raise NotImplementedError

    def active_adapters(self, model: nn.Module) -> list[str]:
        """The names of this method's adapters that compute."""
        return self.adapter_names(model)

    def set_adapter(self, model: nn.Module, adapter_names: list[str]) -> None:
        """Make exactly ``adapter_names`` (possibly none) of this method's adapters active and trainable."""
        raise NotImplementedError

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Inside the block the model computes without this method."""
        raise NotImplementedError

    def merge(self, model: nn.Module, dtype: torch.dtype | None) -> None:
        """Fold the active adapters into the base weights and remove the method."""
        raise ValueError(f"{self.name} cannot be merged into the base weights")

    def unpatch(self, model: nn.Module) -> None:
        """Remove the method and every trace of it."""
        raise NotImplementedError

    def conv1d_names(self, model: nn.Module) -> set[str]:
        """GPT-2 Conv1D layers this method turned into Linear / NF4Linear (merge gives Conv1D back)."""
        return set()

    # -- files ---------------------------------------------------------------------------------

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors of adapter ``adapter_name`` under its file's key names (CPU, contiguous)."""
        raise NotImplementedError

    def reads(self, adapter_config: dict) -> bool:
        """Whether an adapter directory whose config file holds ``adapter_config`` is this method's."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path, adapter_name: str) -> Path:
        """Write adapter ``adapter_name`` (config and weights) into ``directory``."""
        raise NotImplementedError

    def load(self, model: nn.Module, directory: str | os.PathLike, adapter_name: str | None, is_trainable: bool):
        """Load the adapter in ``directory`` into ``model`` (patching it, or adding the adapter)."""
        raise NotImplementedError

    # -- for the Hugging Face hooks (``trainer_hooks``) --------------------------------------------

    def model_key(self, model: nn.Module, file_key: str, adapter_name: str) -> str | None:
        """The model's parameter name for ``file_key``, a key of adapter ``adapter_name``'s file (of ``state_dict``).

        None when the file's tensor is no parameter of the model (computed from parameters, as a
        prompt encoder's output, or not in the model's module tree now): the hooks then write the
        method's own value.
        """
        raise NotImplementedError

    def save_tensors(
        self, model: nn.Module, directory: Path, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> Path:
        """As ``save``, with ``tensors`` (file key -> tensor) written in place of the model's own values."""
        raise NotImplementedError

    def reload(self, model: nn.Module, directory: str | os.PathLike, adapter_name: str) -> None:
        """Copy the tensors of the adapter in ``directory`` into the model's existing adapter ``adapter_name``.

        The file must be this adapter's (same shapes and settings); which adapters are active and
        trainable stays as it was.
        """
        raise NotImplementedError

    def training_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        """Trained tensors the adapter file does not hold (a reparameterisation PEFT's file evaluates away).

        The hooks write them beside the adapter files so that a resume restores exactly what trains;
        empty (the default) when the file holds everything.
        """
        return {}

    def reload_training_tensors(
        self, model: nn.Module, directory: str | os.PathLike, adapter_name: str, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Put ``tensors`` (from ``training_tensors``, saved beside the adapter in ``directory``) back, in place.

        Called after ``reload``; the method checks that they reproduce the adapter file's tensors.
        """
        raise NotImplementedError(f"{self.name} has no training tensors beside its adapter file")


@contextlib.contextmanager
def flags_set(objects: list, attribute: str, value) -> Iterator[None]:
    """Set ``attribute`` to ``value`` on every object for the block, then restore each old value."""
    previous = [getattr(obj, attribute) for obj in objects]
    for obj in objects:
        setattr(obj, attribute, value)
    try:
        yield
    finally:
        for obj, old in zip(objects, previous, strict=True):
            setattr(obj, attribute, old)
