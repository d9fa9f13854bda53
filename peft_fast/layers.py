"""nn.Modules that replace Hugging Face layers.

``NF4Linear`` is a frozen linear layer whose weight lives in NF4. Its state dict uses exactly
the keys of a bitsandbytes ``Linear4bit`` (``weight``, ``weight.absmax``, ``weight.quant_map``,
...), so a checkpoint written by transformers + bitsandbytes loads into it and back.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_fast.nf4 import NF4Weight, dequantize_nf4

__all__ = ["NF4Linear"]

# NF4Weight fields kept as (non-persistent) buffers so that .to(), .cuda() and friends move them.
_NF4_BUFFERS = ("packed", "absmax", "nested_absmax", "nested_offset")


class NF4Linear(nn.Module):
    """``y = x · deq(W)ᵀ + b`` for a frozen NF4 weight W [out_features, in_features]."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _set_weight(self, weight: NF4Weight) -> None:
        self.weight_dtype = weight.dtype
        self.blocksize = weight.blocksize
        for name in _NF4_BUFFERS:
            self.register_buffer(f"weight_{name}", getattr(weight, name), persistent=False)

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

        return base_linear(x, self.nf4, self.bias)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_nested_absmax is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}{dq}"
        )

    # bitsandbytes-compatible (de)serialisation -----------------------------------------

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
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
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
