"""``NF4Linear``: a frozen linear layer whose weight lives in NF4.

Its state dict uses exactly the keys of a bitsandbytes ``Linear4bit`` (``weight``, ``weight.absmax``,
``weight.quant_map``, ...), so a checkpoint written by transformers + bitsandbytes loads into it and back.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.nf4 import NF4Weight, dequantize_nf4

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
