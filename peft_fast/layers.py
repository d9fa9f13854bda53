"""nn.Modules that replace Hugging Face layers.

``NF4Linear`` is a frozen linear layer whose weight lives in NF4. Its state dict uses exactly
the keys of a bitsandbytes ``Linear4bit`` (``weight``, ``weight.absmax``, ``weight.quant_map``,
...), so a checkpoint written by transformers + bitsandbytes loads into it and back.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peft_fast.nf4 import NF4Weight, dequantize_nf4
from peft_fast.ops.lora_mixed import AdapterStackCache

__all__ = [
    "BASE_ROWS",
    "MIXED_PARAMETERS_REFUSED",
    "NF4_FIELDS",
    "PARAM_DTYPES",
    "AdapterLayer",
    "DoraMagnitude",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraParamWrapper",
    "NF4Linear",
    "check_mixed_batch",
]

# PEFT's mixed-adapter batches (``adapter_names``): the name of a sample without an adapter, and PEFT's refusals.
BASE_ROWS = "__base__"
MIXED_PARAMETERS_REFUSED = "lora.ParamWrapper does not support mixed adapter batches yet."


def check_mixed_batch(x: torch.Tensor, adapter_names: list[str]) -> None:
    """PEFT's check of ``adapter_names`` against the batch: one name per sample (x's first dimension)."""
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"a mixed-adapter batch needs an input [batch, ..., features], got {shape}")
    if len(x) != len(adapter_names):
        raise ValueError(  # PEFT's message
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )


# NF4Weight fields kept as (non-persistent) buffers so that .to(), .cuda() and friends move them.
NF4_FIELDS = ("packed", "absmax", "nested_absmax", "nested_offset")
# The fields FSDP2 shards once :meth:`NF4Linear.make_shardable` turns them into frozen parameters
# (fully_shard shards parameters, never buffers). The 0-d nested offset (4 bytes) stays a buffer:
# FSDP2 shards along dim 0, which a scalar does not have.
_NF4_SHARDABLE = ("packed", "absmax", "nested_absmax")


class NF4Linear(nn.Module):
    """``y = x · deq(W)ᵀ + b`` for a frozen NF4 weight W [out_features, in_features].

    Under ``torch.autocast`` it computes in the autocast dtype and returns x's dtype, as
    bitsandbytes' ``Linear4bit`` does (so do :class:`LoraLinear` and (IA)³ layers over it).
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _set_weight(self, weight: NF4Weight, shardable: bool | None = None) -> None:
        self.weight_dtype = weight.dtype
        self.blocksize = weight.blocksize
        shardable = self.is_shardable if shardable is None else shardable
        for name in NF4_FIELDS:
            key, value = f"weight_{name}", getattr(weight, name)
            self._parameters.pop(key, None)
            self._buffers.pop(key, None)
            if shardable and name in _NF4_SHARDABLE and value is not None:
                self.register_parameter(key, nn.Parameter(value, requires_grad=False))
            else:
                self.register_buffer(key, value, persistent=False)

    @property
    def is_shardable(self) -> bool:
        """Whether the NF4 arrays are frozen parameters (see :meth:`make_shardable`)."""
        return "weight_packed" in self._parameters

    def make_shardable(self) -> None:
        """Hold the packed codes and both levels of scales as frozen ``nn.Parameter``s instead of buffers.

        FSDP2's ``fully_shard`` shards a module's parameters (dim 0), never its buffers; with this
        it shards the 4-bit base too and all-gathers it, byte for byte, right before the layer's
        forward and backward. The bytes, names and the bitsandbytes state dict are unchanged, and
        the parameters never need a gradient (``requires_grad=False``: no optimizer state either).
        """
        if not self.is_shardable:
            self._set_weight(self.nf4, shardable=True)

    @property
    def nf4(self) -> NF4Weight:
        """The quantized weight (a view over this module's buffers)."""
        return NF4Weight(
            packed=self.weight_packed,
            absmax=self.weight_absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            nested_absmax=self.weight_nested_absmax,
            nested_offset=self.weight_nested_offset,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: its original dtype), freshly dequantized."""
        return dequantize_nf4(self.nf4, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from peft_fast.ops import base_linear

        y = base_linear(x, self.nf4, self.bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)  # autocast: computed in its dtype, as bitsandbytes

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_nested_absmax is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}{dq}"
        )

    # bitsandbytes-compatible (de)serialisation -----------------------------------------

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        for name in _NF4_SHARDABLE:  # as parameters (make_shardable) they are saved in bitsandbytes' keys alone
            destination.pop(f"{prefix}weight_{name}", None)
        for key, value in self.nf4.to_bnb_state_dict(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        weight_key = prefix + "weight"
        own = [k for k in state_dict if k == weight_key or k.startswith(weight_key + ".")]
        if not own:
            missing_keys.append(weight_key)
        else:
            try:
                weight = NF4Weight.from_bnb_state_dict({k: state_dict[k] for k in own}, weight_key)
            except ValueError as exc:
                error_msgs.append(str(exc))
            else:
                if tuple(weight.shape) != (self.out_features, self.in_features):
                    error_msgs.append(
                        f"{weight_key}: shape {tuple(weight.shape)} does not match the layer "
                        f"({self.out_features}, {self.in_features})"
                    )
                else:
                    self._set_weight(weight.to(self.weight_packed.device))
        rest = {k: v for k, v in state_dict.items() if k not in own}
        internal = {f"{prefix}weight_{name}" for name in _NF4_SHARDABLE}
        before = len(missing_keys)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # Shardable NF4 arrays are parameters, loaded above from bitsandbytes' keys, never by their own names.
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in internal]


class AdapterLayer(nn.Module):
    """A frozen base layer with adapters around it, as PEFT's ``BaseTunerLayer``: what every method's layer shares.

    The base is ``base_layer`` (PEFT's module layout, so state dicts carry PEFT's names); a linear
    base's ``in_features`` / ``out_features`` are the layer's. ``active_adapters`` names the adapters
    that compute and ``disable_adapters`` turns them all off. The base's side of a forward (its W
    for the op, device, dtype, the compute dtype under autocast) is here, once for every method.
    Subclasses: :class:`LoraLayer` (LoRA) and ``peft_fast.ia3.IA3Linear``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        if isinstance(base_layer, (nn.Linear, NF4Linear)):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as PEFT's layers expose it.

        Hugging Face code reads a wrapped layer's weight directly: T5's feed-forward checks
        ``self.wo.weight.dtype``, and ``get_input_embeddings().weight`` is read for embeddings.
        """
        return self.base_layer.weight

    def base_weight(self) -> torch.Tensor | NF4Weight:
        """The frozen W for the op: a dense tensor or an NF4Weight."""
        base = self.base_layer
        return base.nf4 if isinstance(base, NF4Linear) else base.weight

    def base_device(self) -> torch.device:
        """Where the base's weight lives (an NF4 base: its packed bytes)."""
        base = self.base_layer
        return base.weight_packed.device if isinstance(base, NF4Linear) else base.weight.device

    def base_dtype(self) -> torch.dtype:
        """The base weight's dtype (an NF4 base: the dtype it was quantized from)."""
        base = self.base_layer
        return base.weight_dtype if isinstance(base, NF4Linear) else base.weight.dtype

    def compute_inputs(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | NF4Weight, torch.Tensor | None, torch.dtype, torch.dtype]:
        """(x, W, bias, compute dtype, output dtype) for a linear base's op, as ``nn.Linear`` + PEFT compute.

        The compute dtype is x's, or the autocast dtype inside ``torch.autocast``; x, a dense W and
        the bias are cast to it (fp32 parameters still get fp32 gradients, through the casts). The
        output is in it too over a dense base; over NF4 it is returned in x's dtype, as bitsandbytes'
        ``Linear4bit`` and PEFT's layers over it do.
        """
        from peft_fast.ops import autocast_dtype, check_input

        # Checked before the casts, which would otherwise turn the weights into x's dtype (an
        # integer x gave an integer matmul with truncated weights when adapters were disabled).
        check_input(x, self.in_features)
        dtype = autocast_dtype(x) or x.dtype
        out_dtype = x.dtype if isinstance(self.base_layer, NF4Linear) else dtype
        x = x.to(dtype)
        base, bias = self.base_weight(), self.base_layer.bias
        if isinstance(base, torch.Tensor) and base.dtype != dtype:
            base = base.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return x, base, bias, dtype, out_dtype


class LoraLayer(AdapterLayer):
    """LoRA's base class (PEFT's ``LoraLayer``): per-adapter r / alpha / scaling and choosing the active adapters.

    Its layers are :class:`LoraLinear` and :class:`LoraEmbedding`; each keeps its adapters' first
    factor in a dict reachable as ``lora_A`` (adapter names).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    @staticmethod
    def _check_adapter(adapter_name: str, r: int, lora_alpha: float) -> None:
        from peft_fast.config import check_adapter_name, check_finite, check_positive_int

        check_adapter_name(adapter_name)
        check_positive_int("r", r)
        # A NaN or infinite lora_alpha makes every output NaN (PEFT accepts it and does just that).
        check_finite("lora_alpha", lora_alpha)

    def _record(self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool) -> None:
        """r, alpha and the scale of a new adapter; the first adapter of a layer becomes active."""
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / (r**0.5 if use_rslora else r)
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make ``adapter_names`` this layer's active adapters (each must be one of its adapters)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        self.active_adapters = names

    def extra_repr(self) -> str:
        return f"adapters={dict(self.r)}, active={self.active_adapters}"


def _reset_factors(lora_a: nn.Linear, lora_b: nn.Linear, init_lora_weights: bool | str, r: int) -> None:
    """PEFT's LoRA init of A and B (nn.Linear modules): B = 0; A Kaiming-uniform or N(0, 1/r); False keeps both."""
    if init_lora_weights is False:
        return  # keep nn.Linear's default (random) initialisation of both: for tests
    if init_lora_weights is True:
        nn.init.kaiming_uniform_(lora_a.weight, a=5**0.5)
    elif init_lora_weights == "gaussian":
        nn.init.normal_(lora_a.weight, std=1 / r)
    else:
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
    nn.init.zeros_(lora_b.weight)
    if lora_b.bias is not None:
        nn.init.zeros_(lora_b.bias)


class DoraMagnitude(nn.Module):
    """DoRA's trained magnitude vector m [out_features] of one adapter, as ``weight``.

    A module (not a bare parameter) so that the layer's state dict key is PEFT's,
    ``lora_magnitude_vector.<adapter>.weight`` (PEFT's ``DoraLinearLayer``); PEFT's file drops
    the adapter name and the ``.weight``: ``<layer>.lora_magnitude_vector``.
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[0]}"


class LoraLinear(LoraLayer):
    """A frozen base linear (dense ``nn.Linear`` or :class:`NF4Linear`) plus LoRA adapters.

    The module layout is PEFT's (``base_layer``, ``lora_A.<adapter>``, ``lora_B.<adapter>``), so
    state dicts carry PEFT's names. The first active adapter runs fused with the base matmul in
    one ``peft_fast::lora_linear`` op; further active adapters (rare) are added with plain torch.

    DoRA adapters (``use_dora=True``) also hold ``lora_magnitude_vector.<adapter>`` (a
    :class:`DoraMagnitude`) and compute as PEFT's DoRA (:func:`peft_fast.ops.dora_linear`): the
    weight norm ‖W + s·B·A‖ by one fused pass over W per forward, kept between calls only in eval
    mode without autograd while A, B and W are unchanged (PEFT's inference cache).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError(f"LoraLinear wraps nn.Linear or NF4Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout_p: dict[str, float] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only, PEFT's name
        self.use_dora: dict[str, bool] = {}
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # eval-mode cache, not state
        self._mixed_stack = AdapterStackCache()  # mixed batches: the batch's adapters stacked, not state

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        initial: tuple[torch.Tensor, torch.Tensor] | None = None,
        lora_bias: bool = False,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` with rank ``r``, initialised as PEFT does.

        ``initial``: (A, B) computed from the base weight (PiSSA, OLoRA, LoftQ: ``peft_fast.lora.init``,
        which already left the base its residual), taken as they are (fp32, as PEFT assigns them).

        With ``use_dora`` the magnitude starts as PEFT's: ‖W + s·B·A‖ per output row (deq(W) for
        an NF4 base), which is ‖W‖ with the default B = 0, so the new adapter is the identity.
        """
        from peft_fast.config import check_bool, check_probability

        self._check_adapter(adapter_name, r, lora_alpha)
        check_probability("lora_dropout", lora_dropout)
        factory = {"device": self.base_device(), "dtype": self.base_dtype()}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        check_bool("lora_bias", lora_bias)
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(  # as PEFT: it trains and saves, but cannot be merged into a base without a bias
                f"lora_bias=True on a {type(self.base_layer).__name__} without a bias: merging this adapter "
                "will not be possible",
                UserWarning,
                stacklevel=4,
            )
        # lora_bias (PEFT): B has a bias, trained and scaled with B·A: y += s·(H·Bᵀ + b_B).
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias, **factory)
        self.lora_dropout_p[adapter_name] = float(lora_dropout)
        self._record(adapter_name, r, lora_alpha, use_rslora)
        if initial is None:
            self.reset_lora_parameters(adapter_name, init_lora_weights)
        else:
            lora_a, lora_b = initial
            if tuple(lora_a.shape) != (r, self.in_features) or tuple(lora_b.shape) != (self.out_features, r):
                raise ValueError(f"initial A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit rank {r}")
            self.lora_A[adapter_name].weight.data = lora_a.to(self.base_device())
            self.lora_B[adapter_name].weight.data = lora_b.to(self.base_device())
        check_bool("use_dora", use_dora)
        self.use_dora[adapter_name] = use_dora
        if adapter_name in self.lora_magnitude_vector:  # replacing a DoRA adapter
            del self.lora_magnitude_vector[adapter_name]
        self._dora_norms.pop(adapter_name, None)
        if use_dora:
            self.lora_magnitude_vector[adapter_name] = DoraMagnitude(self._initial_magnitude(adapter_name))

    def _initial_magnitude(self, adapter_name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per row in the base's dtype, as PEFT's ``DoraLinearLayer.update_layer``."""
        from peft_fast.ops import dora_weight_norm

        dtype = self.base_dtype()
        base = self.base_weight()
        base = base.detach().to(dtype) if isinstance(base, torch.Tensor) else base
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            return dora_weight_norm(base, lora_a.to(dtype), lora_b.to(dtype), self.scaling[adapter_name]).clone()

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """PEFT's initialisation: B = 0 so the adapter starts as the identity on the base output."""
        _reset_factors(self.lora_A[adapter_name], self.lora_B[adapter_name], init_lora_weights, self.r[adapter_name])

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """The trainable parameters of adapter ``adapter_name`` (A, B, and DoRA's magnitude)."""
        params = [*self.lora_A[adapter_name].parameters(), *self.lora_B[adapter_name].parameters()]
        if adapter_name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[adapter_name].weight)
        return params

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s tensors under their PEFT file suffixes (``lora_A.weight``, ...)."""
        out = {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}
        if self.lora_B[adapter_name].bias is not None:
            out["lora_B.bias"] = self.lora_B[adapter_name].bias
        if adapter_name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[adapter_name].weight
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_B):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p):
            del table[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self.use_dora.pop(adapter_name, None)
        self._dora_norms.pop(adapter_name, None)
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def train(self, mode: bool = True) -> LoraLinear:
        if mode:
            self._dora_norms.clear()  # training changes A and B: the eval cache would go stale
            self._mixed_stack.clear()
        return super().train(mode)

    def _weight_norm(
        self, name: str, base, lora_a: torch.Tensor, lora_b: torch.Tensor, cached_only: bool = False
    ) -> torch.Tensor | None:
        """‖W + s·B·A‖ of DoRA adapter ``name`` (A, B in the compute dtype), cached in no-grad eval calls.

        The cache key holds the versions and storages of A, B and W (and the dtype), so an
        optimizer step, ``load_state_dict`` or a cast recomputes it, as PEFT's cache does not.
        ``cached_only``: None where no cache applies (training, grad mode, compiling), so that
        ``dora_linear`` computes the norm itself (over NF4, inside the pass dequantizing W).
        """
        from peft_fast.ops import dora_weight_norm

        scale = self.scaling[name]
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None if cached_only else dora_weight_norm(base, lora_a, lora_b, scale)
        params = (self.lora_A[name].weight, self.lora_B[name].weight)
        stored = base.packed if isinstance(base, NF4Weight) else self.base_layer.weight
        key = (*((t._version, t.data_ptr()) for t in (*params, stored)), lora_a.dtype, lora_a.device)
        hit = self._dora_norms.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = dora_weight_norm(base, lora_a, lora_b, scale)
        self._dora_norms[name] = (key, norm)
        return norm

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The layer's output; with ``adapter_names`` (one per sample, ``"__base__"``: none) PEFT's mixed batch."""
        from peft_fast.ops import base_linear, lora_linear

        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        # Base, A and B all compute in one dtype (x's, or autocast's), as nn.Linear + PEFT.
        x, base, bias, dtype, out_dtype = self.compute_inputs(x)
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return base_linear(x, base, bias).to(out_dtype)
        if any(self.use_dora.get(name, False) for name in active):
            return self._dora_forward(x, base, bias, dtype, active).to(out_dtype)
        first, *others = active
        b_first = self.lora_B[first].bias
        if b_first is not None:  # lora_bias: s·b_B joins the base bias, in the op's one epilogue
            scaled = self.scaling[first] * b_first.to(dtype)
            bias = scaled if bias is None else bias + scaled
        y = lora_linear(
            x, base, self.lora_A[first].weight.to(dtype), self.lora_B[first].weight.to(dtype), bias,
            scale=self.scaling[first], dropout_p=self.lora_dropout_p[first], training=self.training,
        )  # fmt: skip
        for name in others:
            dropped = nn.functional.dropout(x, self.lora_dropout_p[name], self.training)
            lora_a, lora_b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
            lora = dropped @ lora_a.t() @ lora_b.t()
            if self.lora_B[name].bias is not None:
                lora = lora + self.lora_B[name].bias.to(dtype)
            y = y + self.scaling[name] * lora
        return y.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """PEFT's mixed-adapter batch: sample i gets adapter ``adapter_names[i]`` (``"__base__"`` or one this
        layer lacks: none), whatever the active adapters are.

        The base GEMM runs once for the whole batch; then, without autograd, every row's LoRA term in
        one gathered pass (``peft_fast::lora_mixed_batch``) over the batch's adapters stacked (cached on
        the layer). Where autograd records, or LoRA dropout applies (a layer training), a
        differentiable torch path computes the same, adapter by adapter as PEFT.
        """
        from peft_fast.ops import base_linear, group_rows, lora_mixed_batch

        check_mixed_batch(x, adapter_names)
        names = set(adapter_names) - {BASE_ROWS}
        if any(self.use_dora.get(name, False) for name in names):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")  # PEFT's message
        x, base, bias, dtype, out_dtype = self.compute_inputs(x)
        y = base_linear(x, base, bias)
        batch = [name for name in self.lora_A if name in names] if not self.disable_adapters else []
        if not batch:
            return y.to(out_dtype)
        params = [p for name in batch for p in self.lora_A[name].parameters()]
        params += [p for name in batch for p in self.lora_B[name].parameters()]
        grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or any(p.requires_grad for p in params))
        dropout = self.training and any(self.lora_dropout_p[name] > 0 for name in batch)
        if grad or dropout:
            return self._mixed_batch_torch(x, y, adapter_names, batch, dtype).to(out_dtype)
        stack = self._mixed_stack.get(
            [(name, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.lora_B[name].bias)
             for name in batch],
            dtype,
        )  # fmt: skip
        slot = {name: i for i, name in enumerate(batch)}
        groups = group_rows([slot.get(name, -1) for name in adapter_names], y[0].numel() // y.shape[-1], y.device)
        return lora_mixed_batch(y.contiguous(), x, stack, groups).to(out_dtype)

    def _mixed_batch_torch(self, x, y, adapter_names: list[str], batch: list[str], dtype) -> torch.Tensor:
        """The mixed batch with autograd (or dropout): PEFT's loop over the batch's adapters, out of place."""
        for name in batch:
            index = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            sub = nn.functional.dropout(x.index_select(0, index), self.lora_dropout_p[name], self.training)
            lora_b = self.lora_B[name]
            term = sub @ self.lora_A[name].weight.to(dtype).t() @ lora_b.weight.to(dtype).t()
            if lora_b.bias is not None:
                term = term + lora_b.bias.to(dtype)
            y = y.index_add(0, index, term * self.scaling[name])
        return y

    def _dora_forward(self, x, base, bias, dtype: torch.dtype, active: list[str]) -> torch.Tensor:
        """The active adapters, at least one of them DoRA, as PEFT's forward runs them (in order)."""
        from peft_fast.ops import base_linear, dora_linear

        def weights(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)

        def dropped(name: str) -> torch.Tensor | None:
            p = self.lora_dropout_p[name]
            # As PEFT: dropout only in training with p > 0; the mask is torch's (nn.Dropout's) RNG.
            return nn.functional.dropout(x, p, True) if self.training and p > 0 else None

        if len(active) == 1:  # the common case: one fused GEMM without dropout, as dora_linear explains
            (name,) = active
            lora_a, lora_b = weights(name)
            norm = self._weight_norm(name, base, lora_a, lora_b, cached_only=True)
            magnitude = self.lora_magnitude_vector[name].weight
            return dora_linear(x, base, lora_a, lora_b, magnitude, bias, self.scaling[name], dropped(name), norm)
        y = base_linear(x, base, bias)
        for name in active:
            lora_a, lora_b = weights(name)
            x_d = dropped(name)
            lora = self.scaling[name] * ((x if x_d is None else x_d) @ lora_a.t() @ lora_b.t())
            if not self.use_dora.get(name, False):
                y = y + lora
                continue
            # PEFT's DoraLinearLayer.forward on the running result: without dropout its base part is
            # the result so far minus the bias, with dropout the base GEMM of the dropped input.
            factor = self.lora_magnitude_vector[name].weight / self._weight_norm(name, base, lora_a, lora_b)
            if x_d is None:
                base_part = y if bias is None else y - bias
            else:
                base_part = base_linear(x_d, base, None)
            y = (y + (factor - 1) * base_part + factor * lora).to(dtype)
        return y

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + Σ s·B·A over the active adapters, dense, in ``dtype`` (default: the base's dtype).

        A DoRA adapter merges as PEFT's: ``(m / ‖W₀ + s·B·A‖)·(W + s·B·A)`` per row, the norm
        taken on the unmerged base W₀ and W the weight merged so far.
        """
        merged = self.base_weight()
        out_dtype = dtype or self.base_dtype()
        if isinstance(merged, NF4Weight):
            merged = dequantize_nf4(merged, torch.float32)
        original = merged = merged.detach().float()
        for name in [] if self.disable_adapters else self.active_adapters:
            delta = self.scaling[name] * (
                self.lora_B[name].weight.detach().float() @ self.lora_A[name].weight.detach().float()
            )
            if self.use_dora.get(name, False):
                norm = torch.linalg.vector_norm(original + delta, dim=1)
                factor = self.lora_magnitude_vector[name].weight.detach().float() / norm
                merged = factor[:, None] * (merged + delta)
            else:
                merged = merged + delta
        return merged.to(out_dtype)


class LoraEmbedding(LoraLayer):
    """A frozen ``nn.Embedding`` plus LoRA adapters, laid out and computed as PEFT's ``lora.Embedding``.

    ``lora_embedding_A[<adapter>]`` is [r, num_embeddings] and ``lora_embedding_B[<adapter>]``
    [embedding_dim, r]: ``E(x) + s·(A[:, x]ᵀ·Bᵀ)``. Plain torch (a row gather and a rank-r matmul:
    memory-bound, nothing for a fused kernel to win). As in PEFT, LoRA dropout does not apply to
    embeddings, and a scaled embedding's ``embed_scale`` scales the adapter's output too.
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``: A = 0, B ~ N(0, 1) as PEFT; both N(0, 1) with ``init_lora_weights=False``."""
        if use_dora:
            raise ValueError("DoRA (use_dora=True) on an Embedding layer is not supported: peft_fast runs DoRA on "
                             "Linear layers (dense or NF4) only")  # fmt: skip
        self._check_adapter(adapter_name, r, lora_alpha)
        del lora_dropout  # PEFT's Embedding keeps it but never applies it
        factory = {"device": self.base_device(), "dtype": self.base_dtype()}
        lora_a = torch.randn(r, self.num_embeddings, **factory)
        lora_b = torch.randn(self.embedding_dim, r, **factory)
        if init_lora_weights is not False:  # True and "gaussian" both: PEFT's embedding init
            nn.init.zeros_(lora_a)
            nn.init.normal_(lora_b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(lora_a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(lora_b)
        self._record(adapter_name, r, lora_alpha, use_rslora)

    @property
    def lora_A(self) -> nn.ParameterDict:
        """The adapters by name (what code common to LoRA layers looks up)."""
        return self.lora_embedding_A

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]]

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[adapter_name],
                "lora_embedding_B": self.lora_embedding_B[adapter_name]}  # fmt: skip

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return nn.functional.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                                       base.scale_grad_by_freq, base.sparse)  # fmt: skip

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """The embedding; with ``adapter_names`` (one per sample) PEFT's mixed batch, each sample its own adapter."""
        if adapter_names is not None:
            check_mixed_batch(x, adapter_names)
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        if adapter_names is None:
            groups = [(name, None) for name in self.active_adapters if name in self.lora_embedding_A]
        else:  # plain torch, adapter by adapter as PEFT (a row gather: nothing for a kernel to win)
            groups = [
                (name, torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device))
                for name in self.lora_embedding_A
                if name in adapter_names
            ]
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        for name, index in groups:
            lora_a = self.lora_embedding_A[name].to(result.dtype)
            lora_b = self.lora_embedding_B[name].to(result.dtype)
            ids = x if index is None else x.index_select(0, index)
            update = (self._embed(ids, lora_a.t()) @ lora_b.t()) * self.scaling[name]
            if isinstance(embed_scale, torch.Tensor):
                update = update * embed_scale.to(update.dtype)
            elif isinstance(embed_scale, (float, int)):
                update = update * embed_scale
            result = result + update if index is None else result.index_add(0, index, update)
        return result

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """E + Σ s·(B·A)ᵀ over the active adapters, in ``dtype`` (default: the base's dtype)."""
        weight = self.base_layer.weight.detach()
        merged = weight.float()
        for name in [] if self.disable_adapters else self.active_adapters:
            delta = self.lora_embedding_B[name].detach().float() @ self.lora_embedding_A[name].detach().float()
            merged = merged + self.scaling[name] * delta.t()
        return merged.to(dtype or weight.dtype)


# The parameter dtypes a ParamWrapper adapts (PEFT's low-precision fp8 path, W upcast for the add, is not here).
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LoraParamWrapper(LoraLayer):
    """LoRA on one ``nn.Parameter`` of a module, as PEFT 0.21's ``lora.ParamWrapper`` (``target_parameters``).

    ``base_layer`` is the module that holds the parameter (or another wrapper: one wrapper per
    parameter, nested, as PEFT nests them); during the wrapped module's forward, and only then, the
    parameter reads as ``W + Σ s·ΔW`` over the active adapters, so the module's own forward (an
    expert loop, a grouped GEMM, ``F.linear``) computes with it. Outside the forward ``module.<name>``
    is the frozen W, as in PEFT.

    A 2-D parameter [out, in] gets ``lora_A`` [r, in] and ``lora_B`` [out, r], ΔW = B·A. A 3-D one
    holds experts, [E, d1, d2]: A is [E·r, in] (expert e's rows e·r … e·r + r − 1) and B [out, E·r]
    (expert e's columns e, e + E, …: PEFT's layout), with (in, out) = (d2, d1), or (d1, d2) where the
    module says ``is_transposed`` (GPT-OSS); ΔW[e] = B_e·A_e (its transpose for ``is_transposed``).
    One adapter on experts folds as one ``baddbmm`` in W's dtype, otherwise Σ ΔW is added, as in PEFT.
    Plain torch, not the fused LoRA op: the op's fusion needs the layer's input and output, which a
    parameter read inside someone else's forward does not give.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        param = self.get_param()
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"{type(self.owner).__name__}.{parameter_name} is not a parameter")
        if param.dim() not in (2, 3):
            raise ValueError(
                f"LoRA on parameters takes 2-D ([out, in]) or 3-D ([experts, in, out]) parameters, as PEFT; "
                f"{parameter_name} has shape {tuple(param.shape)}"
            )
        if param.dtype not in PARAM_DTYPES:
            raise ValueError(
                f"LoRA on parameters needs an fp32 / fp16 / bf16 parameter; {parameter_name} is {param.dtype}"
            )
        self.is_transposed = bool(getattr(self.owner, "is_transposed", False))
        if param.dim() == 2:
            self.num_experts, (self.out_features, self.in_features) = 1, tuple(param.shape)
        else:
            self.num_experts, d1, d2 = tuple(param.shape)
            self.in_features, self.out_features = (d1, d2) if self.is_transposed else (d2, d1)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter (below any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParamWrapper):
            module = module.base_layer
        return module

    @property
    def weight(self) -> torch.Tensor:
        return self.get_param()

    def get_param(self) -> torch.Tensor:
        """The frozen parameter W itself (never W + ΔW)."""
        return self.owner._parameters[self.parameter_name]

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``: A [E·r, in] and B [out, E·r] as ``nn.Linear`` weights, PEFT's init."""
        self._check_adapter(adapter_name, r, lora_alpha)
        if lora_dropout or use_dora:
            raise ValueError("LoRA on parameters does not work with lora_dropout != 0 or use_dora=True (as in PEFT)")
        device = self.get_param().device
        width = r * self.num_experts
        self.lora_A[adapter_name] = nn.Linear(self.in_features, width, bias=False, device=device)
        self.lora_B[adapter_name] = nn.Linear(width, self.out_features, bias=False, device=device)
        self._record(adapter_name, r, lora_alpha, use_rslora)
        _reset_factors(self.lora_A[adapter_name], self.lora_B[adapter_name], init_lora_weights, r)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight]

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}

    def delete_adapter(self, adapter_name: str) -> None:
        for table in (self.lora_A, self.lora_B):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[adapter_name]
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def _experts_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A per expert [E, r, in], B per expert [E, out, r]) in PEFT's layout."""
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        experts = self.num_experts
        per_b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)
        return lora_a.reshape(experts, -1, lora_a.shape[-1]), per_b

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s·ΔW of one adapter, shaped and typed as the parameter."""
        param = self.get_param()
        lora_a, lora_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        scale = self.scaling[adapter_name]
        if param.dim() == 2:
            # As PEFT's Linear.get_delta_weight: fp16 / bf16 factors on a CPU multiply in fp32.
            upcast = lora_b.device.type == "cpu" and lora_b.dtype in (torch.float16, torch.bfloat16)
            if upcast:
                delta = ((lora_b.float() @ lora_a.float()) * scale).to(lora_b.dtype)
            else:
                delta = (lora_b @ lora_a) * scale
        else:
            per_a, per_b = self._experts_factors(adapter_name)
            delta = per_b @ per_a  # [E, out, in]
            delta = (delta.transpose(-2, -1) if self.is_transposed else delta) * scale
        return delta.to(param.device, param.dtype)

    def adapted_parameter(self, active: list[str]) -> torch.Tensor:
        """W + Σ s·ΔW over ``active`` (in W's dtype), what the module computes with."""
        param = self.get_param()
        if len(active) == 1 and self.num_experts > 1:
            # One adapter on experts: W + s·lhs·rhs in one baddbmm in W's dtype (PEFT's factor proxy),
            # never a second [E, d1, d2] tensor; autocast off, as the parameter keeps its dtype.
            per_a, per_b = self._experts_factors(active[0])
            lhs, rhs = (per_a.transpose(-2, -1), per_b.transpose(-2, -1)) if self.is_transposed else (per_b, per_a)
            with torch.autocast(device_type=param.device.type, enabled=False):
                return torch.baddbmm(param, lhs.to(param.dtype), rhs.to(param.dtype), alpha=self.scaling[active[0]])
        delta = None
        for name in active:
            delta = self.delta_weight(name) if delta is None else delta + self.delta_weight(name)
        return param + delta

    def forward(self, *args, **kwargs):
        if kwargs.pop("adapter_names", None):
            raise ValueError(MIXED_PARAMETERS_REFUSED)
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return self.base_layer(*args, **kwargs)
        owner, name = self.owner, self.parameter_name
        frozen = owner._parameters[name]
        # The module reads W + ΔW under the parameter's own name for this call (PEFT: a parametrization).
        owner._parameters[name] = self.adapted_parameter(active)
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            owner._parameters[name] = frozen

    def merge(self) -> None:
        """Fold the active adapters into the parameter (in its dtype), as PEFT's ``ParamWrapper.merge``."""
        param = self.get_param()
        with torch.no_grad():
            for name in [] if self.disable_adapters else self.active_adapters:
                param.data += self.delta_weight(name).detach()

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, {super().extra_repr()}"
