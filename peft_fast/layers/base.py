"""What every adapter layer shares: ``AdapterLayer`` (LoRA's and (IA)³'s base), ``LoraLayer`` (PEFT's module layout),
DoRA's ``DoraMagnitude``, and PEFT's mixed-batch names and checks.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.layers.nf4_linear import NF4Linear
from peft_fast.nf4 import NF4Weight

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
