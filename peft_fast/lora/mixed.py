"""Mixed-adapter batches on a peft_fast LoRA model: ``model(..., adapter_names=[...])`` and ``generate`` as PEFT's.

PEFT threads ``adapter_names`` (one adapter name per sample, ``"__base__"`` for none) from
``PeftModel.forward`` / ``generate`` to every LoRA layer through forward pre-hooks registered for
the call (``LoraModel._enable_peft_forward_hooks``). A model ``patch`` gave LoRA keeps its class, so
here a forward pre-hook on the model takes ``adapter_names`` out of the call's keyword arguments
and registers the same per-layer pre-hooks until the forward returns, and ``generate`` (an
instance attribute while LoRA is on the model) does the same around the whole generation, the
names repeated per beam under beam search (the encoder of an encoder-decoder keeps the batch's own).

The layers compute it (:meth:`peft_fast.layers.LoraLinear._mixed_batch_forward`: the base GEMM once,
then one gathered LoRA pass). Refused as PEFT refuses, with PEFT's messages: a model in training
mode, adapter names no layer has, a length that is not the batch's, DoRA adapters in the batch,
LoRA on parameters (``target_parameters``). Not built: ``modules_to_save`` and trainable tokens in a
mixed batch (PEFT runs each sample through its adapter's copy): refused with a clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from peft_fast.layers import BASE_ROWS, MIXED_PARAMETERS_REFUSED, LoraLayer, LoraParamWrapper
from peft_fast.lora.tokens import token_wrappers

__all__ = ["install", "mixed_batch", "uninstall"]

_EXITS = "_peft_fast_mixed_exits"  # the model's open mixed-batch contexts, one per forward in flight


def _inject(names: list[str]):
    def pre_hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    return pre_hook


def _known_adapters(model: nn.Module) -> set[str]:
    return {name for module in model.modules() if isinstance(module, LoraLayer) for name in module.lora_A}


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str], num_beams: int | None = None) -> Iterator[None]:
    """Within the block every LoRA layer of ``model`` computes sample i with adapter ``adapter_names[i]``.

    PEFT's checks and messages (``LoraModel._enable_peft_forward_hooks``); with ``num_beams`` > 1
    each name is repeated per beam, except in the encoder of an encoder-decoder model.
    """
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers or all(layer.disable_adapters for layer in layers):
        yield  # as PeftModel: no enabled adapter, the base model runs and nothing is checked
        return
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    unexpected = set(adapter_names) - {BASE_ROWS} - _known_adapters(model)
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    if any(isinstance(layer, LoraParamWrapper) for layer in layers):
        raise ValueError(MIXED_PARAMETERS_REFUSED)
    state = getattr(model, "peft_fast_state", None)
    if token_wrappers(model) or (state is not None and state.trained_modules):
        raise ValueError(
            "peft_fast does not run mixed-adapter batches (adapter_names) on a model with modules_to_save or "
            "trainable_token_indices (PEFT runs each sample through its adapter's copy); run one adapter per batch"
        )
    names = list(adapter_names)
    original = names
    if isinstance(num_beams, int) and num_beams > 1:
        names = [n for n in names for _ in range(num_beams)]
    handles = [layer.register_forward_pre_hook(_inject(names), with_kwargs=True) for layer in layers]
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    encoder = model.get_encoder() if encoder_decoder and hasattr(model, "get_encoder") else None
    if names is not original and encoder is not None:
        # Registered later, so it runs last: the encoder's samples are the batch's, not its beams.
        handles += [
            m.register_forward_pre_hook(_inject(original), with_kwargs=True)
            for m in encoder.modules()
            if isinstance(m, LoraLayer)
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_pre_hook(model: nn.Module, args, kwargs):
    """Takes ``adapter_names`` out of the model call and opens :func:`mixed_batch` until the call returns."""
    names = kwargs.pop("adapter_names", None)
    context = contextlib.ExitStack()
    model.__dict__.setdefault(_EXITS, []).append(context)  # first: the forward hook pops it even if this raises
    if names is not None:
        context.enter_context(mixed_batch(model, names))
    return args, kwargs


def _forward_hook(model: nn.Module, args, kwargs, output):
    exits = model.__dict__.get(_EXITS)
    if exits:
        exits.pop().close()
    return output


class _Generate:
    """``model.generate`` accepting ``adapter_names`` (kept in the model's ``__dict__``; pickles and deep-copies)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, adapter_names: list[str] | None = None, **kwargs):
        generate = type(self.model).generate
        if adapter_names is None:
            return generate(self.model, *args, **kwargs)
        with mixed_batch(self.model, adapter_names, kwargs.get("num_beams")):
            return generate(self.model, *args, **kwargs)


def install(model: nn.Module) -> None:
    """Let ``model(...)`` and ``model.generate(...)`` take ``adapter_names`` (``patch`` calls it)."""
    if any(hook is _forward_pre_hook for hook in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(_forward_pre_hook, with_kwargs=True)
    model.register_forward_hook(_forward_hook, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = _Generate(model)


def uninstall(model: nn.Module) -> None:
    """Remove what :func:`install` added (``unpatch`` and ``merge`` call it)."""
    for table, hook in ((model._forward_pre_hooks, _forward_pre_hook), (model._forward_hooks, _forward_hook)):
        for key in [k for k, v in table.items() if v is hook]:
            del table[key]
            model._forward_hooks_with_kwargs.pop(key, None)
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_always_called.pop(key, None)
    if isinstance(model.__dict__.get("generate"), _Generate):
        del model.__dict__["generate"]
    model.__dict__.pop(_EXITS, None)
