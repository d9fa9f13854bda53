"""Hugging Face ``Trainer`` (and TRL) integration: a patched model saves and reloads its adapter.

Written against :class:`peft_fast.method.Method`: the hooks act on the one method on the model
(LoRA / QLoRA, (IA)³, bottleneck adapters or a prompt method; every one sets ``trainer_hooks``)
through its operations (adapter names, active adapters, ``save`` / ``save_tensors``, ``reload``,
``model_key``, ``training_tensors``, its two file names), never on a method's internals.

A model made by :func:`peft_fast.patch` keeps its Hugging Face class, so without this module
``Trainer`` treats it as a plain model: every checkpoint and ``save_model`` writes
``model.safetensors`` with the whole base (the NF4 buffers included: gigabytes for a 7B model at
every ``save_steps``). With it, checkpoints and ``save_model`` hold what PEFT users get, the
method's two adapter files (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``; our
bottleneck adapters' ``adapter_config.json`` + ``adapter.safetensors``) beside the optimizer,
scheduler and RNG state Trainer adds, and ``resume_from_checkpoint`` / ``load_best_model_at_end``
load the adapter back in place. No Trainer subclass is needed; ``trl.SFTTrainer`` (a Trainer)
works the same way.

Where PEFT's file holds less than what trains (prefix tuning with ``prefix_projection``, P-tuning:
PEFT saves the encoder's output, not the encoder), ``save_pretrained`` also writes
``peft_fast_training_tensors.safetensors`` (the method's ``training_tensors``, with the digest of the
adapter config it goes with), which PEFT ignores and a resume loads, so that it continues exactly.

A model carrying several methods at once (LoRA beside (IA)³, ...) gets no hooks: PEFT has no
file layout for it, so Trainer saves and loads it whole, as any model (``peft_fast.save_adapter``
saves each method's adapter).

Hooks, and why these:

1. On the model instance (installed by ``patch``; ``unpatch`` and ``merge`` remove them):

   - ``save_pretrained``: ``Trainer._save`` (behind ``save_model`` and every checkpoint) calls
     ``model.save_pretrained(dir, state_dict=..., is_main_process=...)`` on any ``PreTrainedModel``.
     Ours writes the adapters in PEFT's layout, as ``PeftModel.save_pretrained`` does: adapter
     ``"default"`` at the top of ``dir``, any other adapter in ``dir/<name>/``; never the base
     weights. This is also what a user's own ``model.save_pretrained(dir)`` does on a patched
     model; for a full model, ``peft_fast.merge(model).save_pretrained(dir)``.
   - ``load_adapter``, ``set_adapter``, ``active_adapters``: the adapter API every HF model has
     (``transformers.integrations.PeftAdapterMixin``). transformers' own versions would inject
     peft's layers on top of ours; these act on peft_fast's adapters instead (``load_adapter``
     with an existing adapter's name reloads its tensors in place, as PEFT's does).

2. On ``transformers.Trainer``, once per process: ``_load_from_checkpoint`` and
   ``_load_best_model``. An instance hook cannot reach these: in transformers 5.24 both take their
   adapter path (``model.load_adapter``) only when ``isinstance(model, peft.PeftModel)``, and any
   other model must bring ``model.safetensors`` or a weights index (a model with transformers' own
   ``add_adapter`` cannot resume either). The wrappers act only for a model patched by peft_fast
   whose checkpoint holds adapter files and no full weights, outside DeepSpeed / FSDP / SageMaker
   MP: they reload each adapter of the checkpoint in place (what ``model.load_adapter`` does for
   an adapter the model has). Everything else runs
   transformers' own code unchanged (so an old checkpoint with ``model.safetensors`` still
   resumes). ``patch`` installs them at once if ``transformers.trainer`` is already imported, and
   otherwise right after it is imported (importing Trainer costs seconds, which ``patch`` should
   not). They stay installed after ``unpatch``: with no patched model they do nothing.

Not covered: Trainer with DeepSpeed or FSDP (saving takes its values from the gathered
``state_dict`` Trainer passes, untested under either; resuming takes transformers' path, which
expects full weights).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from peft_fast import io
from peft_fast.adapter_files import CONFIG_DIGEST_KEY, adapter_directory, config_digest
from peft_fast.io import read_json, read_safetensors
from peft_fast.method import Method
from peft_fast.registry import method_for_file, methods_on

__all__ = [
    "TRAINING_TENSORS",
    "attach",
    "detach",
    "hooked_method",
    "install_trainer_hooks",
    "load_checkpoint_adapters",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

_ROOT_ADAPTER = "default"  # PEFT writes this adapter at the top of the directory, others in subdirectories
# Beside an adapter's files: what trains but the adapter file lacks (Method.training_tensors).
TRAINING_TENSORS = "peft_fast_training_tensors.safetensors"
_FULL_WEIGHTS = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)  # fmt: skip


class _Hook:
    """A method bound to one model, kept in the model's ``__dict__``.

    Unlike a bound method it survives ``pickle`` (a bound method pickles as ``getattr(model, name)``,
    which during unpickling finds the class's method) and ``copy.deepcopy`` rebinds it to the copy.
    """

    def __init__(self, function, model: nn.Module) -> None:
        self.__func__ = function
        self.__self__ = model
        functools.update_wrapper(self, function)
        del self.__wrapped__  # the signature is the method's, without the model
        parameters = list(inspect.signature(function).parameters.values())[1:]
        self.__signature__ = inspect.signature(function).replace(parameters=parameters)

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<peft_fast {self.__func__.__name__} of {type(self.__self__).__name__}>"


# -- the method the hooks act on -------------------------------------------------------------


def hooked_method(model: nn.Module) -> Method | None:
    """The method whose files the hooks write and read: the one method on ``model`` (if it sets
    ``Method.trainer_hooks``), else None (no method, or several: see the module's docstring)."""
    methods = methods_on(model)
    return methods[0] if len(methods) == 1 and methods[0].trainer_hooks else None


def _require_method(model: nn.Module) -> Method:
    method = hooked_method(model)
    if method is None:
        raise ValueError("this model is not patched by peft_fast (call peft_fast.patch first)")
    return method


# -- the hooks on the model ------------------------------------------------------------------


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    selected_adapters: list[str] | None = None,
    safe_serialization: bool = True,
    push_to_hub: bool = False,
    **kwargs,
) -> None:
    """``model.save_pretrained`` of a patched model: its adapters in PEFT's format, no base weights.

    Adapter ``"default"`` goes to ``save_directory``, any other to ``save_directory/<name>``
    (``PeftModel.save_pretrained``'s layout); ``selected_adapters`` limits which. ``state_dict``
    (what Trainer passes under DeepSpeed / FSDP: the gathered model state) supplies the values
    when given. Always safetensors. Other keyword arguments of ``PreTrainedModel.save_pretrained``
    (``max_shard_size``, ...) do not apply to an adapter and are ignored.
    """
    del safe_serialization, kwargs
    if push_to_hub:
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported on a peft_fast model: save the adapter, then "
            "upload the directory (huggingface_hub.upload_folder)"
        )
    if not is_main_process:
        return
    method = _require_method(model)
    adapters = method.adapter_names(model)
    names = list(adapters) if selected_adapters is None else list(selected_adapters)
    unknown = [name for name in names if name not in adapters]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {list(adapters)}")
    for name in names:
        directory = Path(save_directory) if name == _ROOT_ADAPTER else Path(save_directory) / name
        _write_adapter(method, model, directory, name, state_dict)


def _write_adapter(
    method: Method, model: nn.Module, directory: Path, adapter_name: str, state_dict: dict | None
) -> None:
    if state_dict is None:
        method.save(model, directory, adapter_name)
    else:
        own = method.state_dict(model, adapter_name)
        keys = {key: method.model_key(model, key, adapter_name) for key in own}
        missing = [name for name in keys.values() if name is not None and name not in state_dict]
        if missing:
            raise ValueError(f"the state_dict passed to save_pretrained lacks adapter tensors: {missing[:5]}")
        tensors = {key: own[key] if name is None else state_dict[name].detach().contiguous().cpu()
                   for key, name in keys.items()}  # fmt: skip
        method.save_tensors(model, directory, adapter_name, tensors)
    _write_training_tensors(method, model, directory, adapter_name)


def _write_training_tensors(method: Method, model: nn.Module, directory: Path, adapter_name: str) -> None:
    """``TRAINING_TENSORS`` beside the adapter when the method has any, tagged with the adapter config's digest."""
    path = directory / TRAINING_TENSORS
    tensors = method.training_tensors(model, adapter_name)
    if not tensors:
        with io.directory_lock(directory, exclusive=True):
            path.unlink(missing_ok=True)  # an older save's, which no longer goes with this adapter
        return
    from safetensors.torch import save as safetensors_bytes

    with io.directory_lock(directory, exclusive=True):
        digest = config_digest(read_json(directory / method.config_file))
        data = safetensors_bytes(tensors, metadata={"format": "pt", CONFIG_DIGEST_KEY: digest})
        with io.atomic_write(path) as handle:
            handle.write(data)


def _reload_training_tensors(method: Method, model: nn.Module, directory: Path, adapter_name: str) -> None:
    """Put the ``TRAINING_TENSORS`` saved beside an adapter back, after ``method.reload``."""
    if not method.training_tensors(model, adapter_name):
        return
    path = directory / TRAINING_TENSORS
    if not path.is_file():
        raise ValueError(
            f"{directory} lacks {TRAINING_TENSORS}: its adapter file holds the {method.name} encoder's output only, "
            "so training cannot resume from it exactly (it was not written by model.save_pretrained of peft_fast)"
        )
    with io.directory_lock(directory, exclusive=False):
        tensors, metadata = read_safetensors(path)
        digest = config_digest(read_json(directory / method.config_file))
    if metadata.get(CONFIG_DIGEST_KEY) != digest:
        raise ValueError(f"{path} was not written with {directory / method.config_file}; save the adapter again")
    method.reload_training_tensors(model, directory, adapter_name, tensors)


def load_adapter(
    model: nn.Module,
    peft_model_id: str | os.PathLike | None = None,
    adapter_name: str | None = None,
    is_trainable: bool = False,
    **kwargs,
) -> None:
    """``model.load_adapter`` of a patched model (a local adapter directory of the model's method).

    An adapter the model already has is overwritten in place (its files must match its shapes
    and scaling; trainability is unchanged), as PEFT's ``load_adapter`` does and Trainer's resume
    relies on. A new name adds the adapter inactive and frozen, as PEFT does; make it active
    (and trainable) with ``model.set_adapter(name)``.
    """
    unsupported = {key: value for key, value in kwargs.items() if value not in (None, False, {})}
    if unsupported:
        raise TypeError(
            f"load_adapter of a peft_fast model reads a local directory; unsupported: {sorted(unsupported)}"
        )
    if peft_model_id is None:
        raise TypeError("load_adapter needs the adapter's directory")
    del is_trainable  # see the docstring: in place keeps trainability, a new adapter starts frozen
    method = _require_method(model)
    adapter_name = adapter_name or _ROOT_ADAPTER
    if adapter_name in method.adapter_names(model):
        method.reload(model, peft_model_id, adapter_name)
        _reload_training_tensors(method, model, adapter_directory(peft_model_id), adapter_name)
        return
    active = method.active_adapters(model)
    directory = adapter_directory(peft_model_id)
    config_path = directory / method.config_file
    document = read_json(config_path) if config_path.is_file() else {}
    method_for_file(document).load(model, directory, adapter_name, True)
    method.set_adapter(model, active)


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """``model.set_adapter`` of a patched model: its active adapter(s), as :func:`peft_fast.set_adapter`."""
    method = _require_method(model)
    method.set_adapter(model, [adapter_name] if isinstance(adapter_name, str) else list(adapter_name))


def active_adapters(model: nn.Module) -> list[str]:
    """``model.active_adapters()`` of a patched model: the names of its active adapters."""
    return _require_method(model).active_adapters(model)


_MODEL_HOOKS = {
    "save_pretrained": save_pretrained,
    "load_adapter": load_adapter,
    "set_adapter": set_adapter,
    "active_adapters": active_adapters,
}


def attach(model: nn.Module) -> None:
    """Install the instance hooks on a patched Hugging Face model, and the Trainer hooks (``patch`` calls it)."""
    if not callable(getattr(model, "save_pretrained", None)):
        return  # not a Hugging Face model: nothing calls these
    for name, function in _MODEL_HOOKS.items():
        model.__dict__[name] = _Hook(function, model)
    install_trainer_hooks()


def detach(model: nn.Module) -> None:
    """Remove what :func:`attach` put on the model (``unpatch`` and ``merge`` call it)."""
    for name in _MODEL_HOOKS:
        if isinstance(model.__dict__.get(name), _Hook):
            del model.__dict__[name]


def is_attached(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("save_pretrained"), _Hook)


# -- checkpoints ----------------------------------------------------------------------------


def checkpoint_adapters(directory: str | os.PathLike, method: Method) -> dict[str, Path]:
    """adapter name -> directory, for the adapters in ``method``'s files saved under ``directory``."""
    directory = Path(directory)
    found: dict[str, Path] = {}
    if not directory.is_dir():
        return found

    def holds(path: Path) -> bool:
        return (path / method.weights_file).is_file() and (path / method.config_file).is_file()

    if holds(directory):
        found[_ROOT_ADAPTER] = directory
    for sub in sorted(directory.iterdir()):
        if sub.is_dir() and holds(sub):
            found.setdefault(sub.name, sub)
    return found


def load_checkpoint_adapters(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load the adapters ``save_pretrained`` wrote to ``directory`` back into ``model``, in place.

    The checkpoint must hold exactly the model's adapters (a resume restores, it does not add);
    which adapters are active and trainable stays as it was. Returns the adapter names.
    """
    method = _require_method(model)
    found = checkpoint_adapters(directory, method)
    adapters = method.adapter_names(model)
    if set(found) != set(adapters):
        raise ValueError(
            f"{directory} holds adapter(s) {sorted(found)} but the model has {sorted(adapters)}; "
            "resume with the model patched as it was for the run that wrote the checkpoint"
        )
    for name, path in found.items():
        method.reload(model, path, name)
        _reload_training_tensors(method, model, path, name)
    return list(found)


def _patched(model) -> nn.Module | None:
    """The peft_fast-patched model inside ``model`` (DDP / DataParallel unwrapped), else None."""
    while model is not None and hooked_method(model) is None and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model if model is not None and hooked_method(model) is not None and is_attached(model) else None


def _adapter_checkpoint(trainer, directory, model) -> nn.Module | None:
    """The patched model to load ``directory`` into ourselves, or None to let transformers do it."""
    if directory is None or _patched(model) is None:
        return None
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return None
    from transformers.utils import is_sagemaker_mp_enabled

    if is_sagemaker_mp_enabled():
        return None
    if any(os.path.isfile(os.path.join(directory, name)) for name in _FULL_WEIGHTS):
        return None  # a full checkpoint (written before these hooks): transformers loads it
    target = _patched(model)
    return target if checkpoint_adapters(directory, hooked_method(target)) else None


def _wrap_load_from_checkpoint(original):
    @functools.wraps(original)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = _adapter_checkpoint(self, resume_from_checkpoint, self.model if model is None else model)
        if target is None:
            return original(self, resume_from_checkpoint, model)
        logger.info("Loading the peft_fast adapter(s) from %s.", resume_from_checkpoint)
        load_checkpoint_adapters(target, resume_from_checkpoint)
        return None

    _load_from_checkpoint.__peft_fast_original__ = original
    return _load_from_checkpoint


def _wrap_load_best_model(original):
    @functools.wraps(original)
    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        target = _adapter_checkpoint(self, best, self.model)
        if target is None:
            return original(self)
        logger.info("Loading the best peft_fast adapter(s) from %s (score: %s).", best, self.state.best_metric)
        load_checkpoint_adapters(target, best)
        return None

    _load_best_model.__peft_fast_original__ = original
    return _load_best_model


def _wrap_trainer(trainer_class) -> None:
    for name, wrap in (
        ("_load_from_checkpoint", _wrap_load_from_checkpoint),
        ("_load_best_model", _wrap_load_best_model),
    ):
        method = trainer_class.__dict__.get(name)
        if method is not None and not hasattr(method, "__peft_fast_original__"):
            setattr(trainer_class, name, wrap(method))


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Wraps ``transformers.Trainer`` right after ``transformers.trainer`` is imported, then leaves.

    The module is found and loaded by the usual finder and loader (its ``__loader__`` is theirs);
    only that one loader's ``exec_module`` is wrapped.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers.trainer":
            return None
        _remove_import_hook()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _wrap_trainer(module.Trainer)

        spec.loader.exec_module = exec_module
        return spec


def _remove_import_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _TrainerImportHook)]


def install_trainer_hooks() -> None:
    """Wrap ``Trainer._load_from_checkpoint`` / ``_load_best_model`` (now, or once Trainer is imported)."""
    module = sys.modules.get("transformers.trainer")
    if module is not None and hasattr(module, "Trainer"):
        _remove_import_hook()
        _wrap_trainer(module.Trainer)
    elif not any(isinstance(finder, _TrainerImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TrainerImportHook())
