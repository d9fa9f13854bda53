"""``peft_fast.patch(peft_model)``: our fused op inside an existing Hugging Face PEFT LoRA / QLoRA model.

Only the forward changes. Each PEFT LoRA layer over an ``nn.Linear`` (``peft.tuners.lora.Linear``)
or over a bitsandbytes 4-bit NF4 ``Linear4bit`` (``peft.tuners.lora.bnb.Linear4bit``) gets its class
swapped, in place, for a subclass whose ``forward`` calls ``peft_fast::lora_linear`` with the
layer's own tensors: the dense weight, or an :class:`NF4Weight` that views bitsandbytes' packed
bytes, absmax, nested absmax and offset (the formats are identical, nothing is copied or
re-quantized), ``lora_A`` / ``lora_B`` of the active adapter, its scaling and dropout
probability, and the bias. Modules, parameters, buffers and their names stay PEFT's, so
``state_dict``, ``save_pretrained``, ``merge_and_unload``, ``set_adapter``, ``disable_adapter``,
``load_adapter``, Trainer and TRL run PEFT's own code unchanged. ``unpatch`` swaps the classes back.

Each call falls back to PEFT's forward (the class's parent) whenever the fused op cannot compute
exactly what PEFT would:

- adapters disabled, merged adapters, no active adapter on the layer (PEFT's base-only paths);
- extra forward arguments (``adapter_names`` mixed batches, variant kwargs);
- several active adapters on the layer, a LoRA variant other than DoRA or ``lora_bias`` on the active
  adapter (added after ``patch``), a dropout module other than ``nn.Dropout`` / ``nn.Identity``;
- hooks or an instance-level ``forward`` on the base layer, ``lora_A`` or ``lora_B`` (accelerate's
  offloading hooks, for instance), a base weight that requires grad;
- without autocast, tensors whose dtypes differ (e.g. fp32 activations and LoRA weights over a
  bitsandbytes layer computing in bf16: PEFT then runs the base in bf16 and LoRA in fp32, one op
  computes in one dtype). Under ``torch.autocast`` the op casts as ``nn.Linear`` does;
- a bitsandbytes weight repacked for its AVX512-BF16 CPU inference kernel
  (``quant_state.packing_format_for_cpu``, set by bitsandbytes' own eval-mode no-grad CPU forward,
  e.g. under ``disable_adapter()``; bitsandbytes converts it back when its state dict is taken, as
  ``save_pretrained`` does, and the fused path resumes).

The configuration-dependent fallbacks warn once per reason. Layers of other LoRA kinds stay on
PEFT's forward, with one warning at ``patch``: LoRA ``Embedding``, ``Conv1d/2d/3d``,
``MultiheadAttention``, ``ParamWrapper`` (``target_parameters``), and ``lora.Linear`` over GPT-2's
``Conv1D`` (``fan_in_fan_out``) or over an ``nn.Linear`` subclass with its own ``forward``.
DoRA adapters (``use_dora=True``) on those two layer kinds run :func:`peft_fast.ops.dora_linear` (the
fused weight-norm kernel and the fused op) with PEFT's ``lora_magnitude_vector`` and PEFT's own dropout
module; DoRA on the kinds left on PEFT stays on PEFT's forward like their LoRA.
``patch`` refuses, leaving every module as it was: non-LoRA PEFT methods, ``lora_bias``,
other LoRA variants (aLoRA, Arrow, ...), bitsandbytes 8-bit and 4-bit fp4, and every other
quantized LoRA layer (GPTQ, AWQ, HQQ, torchao, ...). Patching again takes over layers added since,
and is otherwise a no-op.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import peft
import torch
from peft.tuners.lora import layer as _lora_layer
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from peft_fast.nf4 import NESTED_BLOCKSIZE, NF4Weight, dynamic_map, nf4_code
from peft_fast.ops import (
    AdapterStackCache,
    autocast_dtype,
    base_linear,
    dora_linear,
    group_rows,
    lora_linear,
    lora_mixed_batch,
)

__all__ = ["fast_layers", "is_peft_model", "patch_peft_model", "unpatch_peft_model"]

try:  # defined by PEFT only when bitsandbytes' 4-bit layers are importable
    from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit
except ImportError:  # pragma: no cover - bitsandbytes missing
    _PeftLinear4bit = None
try:
    from peft.tuners.lora.bnb import Linear8bitLt as _PeftLinear8bit
except ImportError:  # pragma: no cover
    _PeftLinear8bit = None

_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STACK_ATTR = "_peft_fast_mixed_stack"  # a layer's AdapterStackCache for mixed batches (not state)
# LoRA layer kinds that stay on PEFT's forward (correct, just not fused).
_LEFT_ON_PEFT = tuple(
    getattr(_lora_layer, kind)
    for kind in ("Embedding", "_ConvNd", "MultiheadAttention", "ParamWrapper")
    if hasattr(_lora_layer, kind)  # ParamWrapper is new in PEFT 0.17
)


# -- the fused forward ---------------------------------------------------------------------


class _FusedForward:
    """Mixin before PEFT's class: the fused forward, PEFT's own (``super().forward``) otherwise."""

    _peft_fast_original: type

    def forward(self, x, *args, **kwargs):
        if not args and not kwargs:
            y = _fused_forward(self, x)
            if y is not None:
                return y
        elif not args and kwargs.keys() == {"adapter_names"} and kwargs["adapter_names"] is not None:
            self._check_forward_args(x, **kwargs)  # PEFT's refusals, with its messages
            y = _mixed_forward(self, x, kwargs["adapter_names"])
            if y is not None:
                return y
        return super().forward(x, *args, **kwargs)


class PeftFastLinear(_FusedForward, _lora_layer.Linear):
    """PEFT's ``lora.Linear`` over an ``nn.Linear``, running ``peft_fast::lora_linear``."""

    _peft_fast_original = _lora_layer.Linear


_FAST_CLASSES: dict[type, type] = {_lora_layer.Linear: PeftFastLinear}

if _PeftLinear4bit is not None:

    class PeftFastLinear4bit(_FusedForward, _PeftLinear4bit):
        """PEFT's ``lora.bnb.Linear4bit`` over bitsandbytes NF4, running ``peft_fast::lora_linear``."""

        _peft_fast_original = _PeftLinear4bit

    _FAST_CLASSES[_PeftLinear4bit] = PeftFastLinear4bit


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _warn_fallback(layer: nn.Module, reason: str) -> None:
    warnings.warn(
        f"peft_fast: a {type(layer).__name__} layer runs PEFT's forward instead of the fused op: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )


def _dropout_of(layer, name: str) -> tuple[float, bool] | None:
    dropout = layer.lora_dropout[name]
    if type(dropout) is nn.Identity:
        return 0.0, False
    if type(dropout) is nn.Dropout and 0.0 <= dropout.p < 1.0:
        return float(dropout.p), dropout.training
    return None


def nf4_view(weight: torch.Tensor) -> NF4Weight:
    """An :class:`NF4Weight` over a bitsandbytes NF4 ``Params4bit``'s own tensors (no copy).

    Raises ``ValueError`` naming what does not fit (fp4, a foreign codebook, nested blocks other
    than 256, sizes that disagree with the shape).
    """
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("the bitsandbytes weight has no quant_state (not quantized yet)")
    if state.quant_type != "nf4":
        raise ValueError(f"bitsandbytes 4-bit quant_type {state.quant_type!r} (only 'nf4' is supported)")
    packed = weight.data
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage: the same bytes in another dtype
        packed = packed.view(torch.uint8)
    nested_absmax = nested_offset = None
    if state.nested:
        if state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"nested quantization with blocksize {state.state2.blocksize} (only 256)")
        nested_absmax, nested_offset = state.state2.absmax.reshape(-1), state.offset
    return NF4Weight(
        packed.reshape(-1, 1), state.absmax.reshape(-1), state.shape, state.dtype, state.blocksize,
        nested_absmax, nested_offset,
    )  # fmt: skip


def _fused_forward(layer, x) -> torch.Tensor | None:
    """The layer's output through ``peft_fast::lora_linear``, or None where PEFT's forward must run."""
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        if active:
            _warn_fallback(layer, f"{len(active)} active adapters (one is fused)")
        return None
    name = active[0]
    if not _plain_adapter(layer, name, dora_ok=True):
        return None
    dropout = _dropout_of(layer, name)
    if dropout is None:
        _warn_fallback(layer, f"dropout module {type(layer.lora_dropout[name]).__name__}")
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    base_args = _base_args(layer, x, [lora_a.weight, lora_b.weight])
    if base_args is None:
        return None
    weight, bias, cast, out_dtype = base_args
    if layer.use_dora.get(name, False):
        y = _dora_forward(layer, name, x, weight, bias, cast)
    else:
        p, training = dropout
        y = lora_linear(x, weight, lora_a.weight, lora_b.weight, bias, scale=layer.scaling[name], dropout_p=p,
                        training=training)  # fmt: skip
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


def _plain_adapter(layer, name: str, dora_ok: bool) -> bool:
    """Whether adapter ``name`` is plain LoRA (or, with ``dora_ok``, DoRA) with unhooked factors: what we fuse."""
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    dora = layer.use_dora.get(name, False)
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and not (dora_ok and dora and type(variant).__name__ == "DoraLinearVariant"):
        return False  # a variant other than plain DoRA (added after patch)
    return lora_b.bias is None and not _hooked(lora_a) and not _hooked(lora_b)  # lora_bias: added after patch


def _mixed_forward(layer, x, adapter_names: list[str]) -> torch.Tensor | None:
    """PEFT's ``_mixed_batch_forward`` as the base GEMM once plus ``peft_fast::lora_mixed_batch``, or None for PEFT's.

    PEFT's own loop runs where autograd records (the op has no backward), where LoRA dropout
    applies (a layer in training mode), and wherever the single-adapter fused path would fall back.
    """
    if not isinstance(x, torch.Tensor) or x.numel() == 0 or x.dim() < 2 or layer.disable_adapters:
        return None
    wanted = set(adapter_names)
    batch = [name for name in layer.lora_A if name in wanted]  # "__base__" and unknown names: no LoRA term
    if not batch or not all(_plain_adapter(layer, name, dora_ok=False) for name in batch):
        return None
    for name in batch:
        dropout = _dropout_of(layer, name)
        if dropout is None or (dropout[1] and dropout[0] > 0):
            return None
    factors = [(layer.lora_A[name].weight, layer.lora_B[name].weight) for name in batch]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for pair in factors for t in pair)):
        return None
    base_args = _base_args(layer, x, [t for pair in factors for t in pair])
    if base_args is None:
        return None
    weight, bias, cast, out_dtype = base_args
    if cast is not None:
        x = x.to(cast)
        bias = None if bias is None else bias.to(cast)
        weight = weight.to(cast) if isinstance(weight, torch.Tensor) else weight
    y = base_linear(x, weight, bias).contiguous()
    cache = layer.__dict__.setdefault(_STACK_ATTR, AdapterStackCache())
    stack = cache.get(
        [(name, a, b, layer.scaling[name], None) for name, (a, b) in zip(batch, factors, strict=True)], x.dtype
    )
    slot = {name: i for i, name in enumerate(batch)}
    groups = group_rows([slot.get(name, -1) for name in adapter_names], y[0].numel() // y.shape[-1], y.device)
    y = lora_mixed_batch(y, x, stack, groups)
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


def _base_args(layer, x, lora_tensors: list[torch.Tensor]):
    """(weight, bias, autocast dtype, output dtype) of the layer's base for the op, or None for PEFT's forward.

    ``lora_tensors``: the adapter factors the call computes with (their dtypes are checked).
    """
    base = layer.base_layer
    if _hooked(base):
        return None
    quantized = type(layer) is not PeftFastLinear
    cast = autocast_dtype(x)
    bias = base.bias
    out_dtype = None
    if quantized:
        weight = base.weight
        state = getattr(weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            _warn_fallback(layer, "bitsandbytes repacked the weight for its CPU inference kernel")
            return None
        try:
            weight = nf4_view(weight)
        except (ValueError, TypeError) as exc:
            _warn_fallback(layer, str(exc))
            return None
        if cast is None:
            if not base.compute_type_is_set:  # what bitsandbytes' own forward does on its first call
                base.set_compute_type(x)
                base.compute_type_is_set = True
            compute = base.compute_dtype or x.dtype
        out_dtype = x.dtype if cast is None else torch.promote_types(x.dtype, cast)
    else:
        weight = base.weight
        if weight.requires_grad:
            _warn_fallback(layer, "the base weight requires grad (the op gives it none)")
            return None
        compute = weight.dtype
    floats = [x, *lora_tensors] + ([] if quantized else [weight]) + ([] if bias is None else [bias])
    if cast is None:
        if any(t.dtype != compute for t in floats):
            dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in floats}))
            _warn_fallback(
                layer, f"mixed dtypes ({dtypes}; base computes in {str(compute).removeprefix('torch.')}) without "
                "torch.autocast: match them or run under torch.autocast",
            )  # fmt: skip
            return None
    elif any(t.dtype not in _AUTOCAST_DTYPES for t in floats):
        return None
    return weight, bias, cast, out_dtype


def _dora_forward(layer, name: str, x, weight, bias, cast) -> torch.Tensor:
    """PEFT's DoRA (``DoraLinearVariant.forward``) on the layer's own tensors through :func:`dora_linear`.

    As PEFT: the DoRA term takes dropout(x) only when the layer trains and its dropout is not an
    Identity (PEFT's module, so its RNG draw is PEFT's); otherwise base(x) is reused (one fused GEMM).
    """
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if cast is not None:  # the op's autocast, done here because the norm and the scale need one dtype too
        x, lora_a, lora_b = x.to(cast), lora_a.to(cast), lora_b.to(cast)
        bias = None if bias is None else bias.to(cast)
        weight = weight.to(cast) if isinstance(weight, torch.Tensor) else weight
    dropout = layer.lora_dropout[name]
    dropped = None if isinstance(dropout, nn.Identity) or not layer.training else dropout(x)
    magnitude = layer.lora_magnitude_vector[name].weight
    return dora_linear(x, weight, lora_a, lora_b, magnitude, bias, layer.scaling[name], dropped)


# -- what can be taken over ----------------------------------------------------------------


def is_peft_model(model: nn.Module, config) -> bool:
    """Whether ``patch(model, config)`` is for a PEFT model: a PeftModel / LoraModel, or with no
    config, any model holding PEFT tuner layers (e.g. transformers' ``model.add_adapter``)."""
    if isinstance(model, (peft.PeftModel, peft.PeftMixedModel, BaseTuner)):
        return True
    return config is None and any(isinstance(m, BaseTunerLayer) for m in model.modules())


def fast_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every PEFT layer of ``model`` that runs our fused forward."""
    for name, module in model.named_modules():
        if isinstance(module, _FusedForward):
            yield name, module


def _variant_name(variant) -> str:
    kind = type(variant).__name__
    return "DoRA (use_dora=True)" if "Dora" in kind else f"the LoRA variant {kind}"


class _Refusals(dict):
    """{feature: [where]}: what cannot be taken over, grouped so that one message names each feature once."""

    def add(self, feature: str, where: str) -> None:
        self.setdefault(feature, []).append(where)

    def message(self) -> str:
        parts = []
        for feature, places in self.items():
            shown = ", ".join(places[:2]) + ("" if len(places) <= 2 else f" and {len(places) - 2} more")
            parts.append(f"{feature} in {shown}")
        return "; ".join(parts)


def _check_adapters(name: str, module, refusals: _Refusals) -> None:
    for adapter in list(getattr(module, "lora_A", {})) + list(getattr(module, "lora_embedding_A", {})):
        where = f"{name} (adapter {adapter!r})"
        if getattr(module, "use_dora", {}).get(adapter, False):
            pass  # DoRA: fused on linear layers, PEFT's own forward on the kinds left on PEFT
        elif adapter in getattr(module, "lora_variant", {}):
            refusals.add(_variant_name(module.lora_variant[adapter]), where)
        if getattr(module, "lora_bias", {}).get(adapter, False):
            refusals.add("lora_bias=True", where)


def _plain_linear(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    return (
        isinstance(base, nn.Linear)
        and type(base).forward is nn.Linear.forward
        and type(weight) in (nn.Parameter, torch.Tensor)
        and weight.dtype.is_floating_point
    )


def _check_nf4_base(base: nn.Module) -> str | None:
    """Why the bitsandbytes layer cannot be read as NF4 in place, or None."""
    import bitsandbytes as bnb

    if not isinstance(base, bnb.nn.Linear4bit) or type(base).forward is not bnb.nn.Linear4bit.forward:
        return f"LoRA over {type(base).__name__} (a bitsandbytes 4-bit layer with its own forward)"
    state = getattr(base.weight, "quant_state", None)
    if state is not None and state.quant_type != "nf4":
        return f"bitsandbytes 4-bit quant_type {state.quant_type!r} (only 'nf4' is supported)"
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None  # checked per call (falls back until quantized / unpacked)
    if tuple(state.shape) != (base.out_features, base.in_features):
        return f"a bitsandbytes weight of shape {tuple(state.shape)} in a {base.out_features}x{base.in_features} layer"
    if not torch.equal(state.code.float().cpu(), nf4_code("cpu")):
        return "a bitsandbytes 4-bit codebook that is not NF4"
    if state.nested and not torch.equal(state.state2.code.float().cpu(), dynamic_map("cpu")):
        return "a nested-quantization map that is not bitsandbytes' dynamic map"
    try:
        nf4_view(base.weight)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _classify(model: nn.Module) -> tuple[list[tuple[nn.Module, type]], _Refusals, list[str], int]:
    """(modules to swap with their classes, refusals, layers left on PEFT, layers already swapped)."""
    refusals = _Refusals()
    for adapter, config in (getattr(model, "peft_config", None) or {}).items():
        kind = getattr(config, "peft_type", None)
        kind = str(getattr(kind, "value", kind))
        if kind != "LORA":
            refusals.add(
                f"the PEFT method {kind} ({type(config).__name__}; only LoRA models can be taken over, peft_fast "
                "has its own IA3Config, AdapterConfig and prompt methods for a plain model)",
                f"adapter {adapter!r}",
            )
    method_refused = bool(refusals)
    swaps, left, done = [], [], 0
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, _lora_layer.LoraLayer):
            if type(module).__module__.startswith("peft.tuners.trainable_tokens"):
                continue  # LoRA's trainable_token_indices: PEFT keeps running it
            if not method_refused:  # a non-LoRA method named by its config says it all
                refusals.add(f"the non-LoRA PEFT layer {type(module).__module__}.{type(module).__name__}", name)
            continue
        _check_adapters(name, module, refusals)
        if isinstance(module, _FusedForward):
            done += 1
            continue
        base = module.get_base_layer()
        kind = type(module)
        if kind is _lora_layer.Linear:
            if module.fan_in_fan_out:
                left.append(f"{name} (Conv1D base, fan_in_fan_out)")
            elif module.base_layer is not base or not _plain_linear(base):
                left.append(f"{name} ({type(base).__name__} base)")
            else:
                swaps.append((module, PeftFastLinear))
        elif _PeftLinear4bit is not None and kind is _PeftLinear4bit:
            reason = _check_nf4_base(base) if module.base_layer is base else "a stacked PEFT tuner layer"
            if reason is None:
                swaps.append((module, _FAST_CLASSES[_PeftLinear4bit]))
            else:
                refusals.add(reason, name)
        elif isinstance(module, _LEFT_ON_PEFT):
            left.append(f"{name} (LoRA {kind.__name__})")
        elif _PeftLinear8bit is not None and kind is _PeftLinear8bit:
            refusals.add("bitsandbytes 8-bit (LLM.int8, Linear8bitLt)", name)
        else:
            refusals.add(f"the quantized / custom LoRA layer {kind.__name__} over {type(base).__name__}", name)
    return swaps, refusals, left, done


def _listing(items: list[str]) -> str:
    return "; ".join(items[:6]) + ("" if len(items) <= 6 else f"; and {len(items) - 6} more")


def patch_peft_model(model: nn.Module, config=None) -> nn.Module:
    """Make the PEFT LoRA / QLoRA layers of ``model`` run ``peft_fast::lora_linear``, in place.

    Everything is checked before any layer changes: a refusal (``ValueError``) leaves the model as
    it was. Returns the same model object.
    """
    if config is not None:
        raise TypeError(
            "a PEFT model is patched as it is: call peft_fast.patch(peft_model) without a config "
            "(its adapters and their settings stay PEFT's)"
        )
    swaps, refusals, left, done = _classify(model)
    if refusals:
        raise ValueError(
            f"peft_fast.patch cannot take over this PEFT model (left unchanged): {refusals.message()}. It fuses plain "
            "LoRA over nn.Linear and bitsandbytes 4-bit NF4 layers only"
        )
    if not swaps and not done:
        raise ValueError(
            "peft_fast.patch found no PEFT LoRA layer over nn.Linear or bitsandbytes 4-bit NF4 to take over"
            + (f" (LoRA layers: {_listing(left)})" if left else "")
        )
    for module, fast_class in swaps:
        module.__class__ = fast_class
    if left and swaps:
        warnings.warn(
            f"peft_fast: {len(left)} LoRA layer(s) stay on PEFT's forward: {_listing(left)}", UserWarning, stacklevel=3
        )
    return model


def unpatch_peft_model(model: nn.Module) -> nn.Module:
    """Give every layer ``patch`` took over its PEFT class (and forward) back; returns the model."""
    layers = [module for _, module in fast_layers(model)]
    if not layers:
        raise ValueError("no layer of this model runs peft_fast's forward (call peft_fast.patch(peft_model) first)")
    for module in layers:
        module.__class__ = module._peft_fast_original
        module.__dict__.pop(_STACK_ATTR, None)
    return model
