"""nn.Modules that replace Hugging Face layers, one module per layer kind (this package re-exports them).

``NF4Linear`` is a frozen linear layer whose weight lives in NF4. Its state dict uses exactly
the keys of a bitsandbytes ``Linear4bit`` (``weight``, ``weight.absmax``, ``weight.quant_map``,
...), so a checkpoint written by transformers + bitsandbytes loads into it and back.
"""

from peft_fast.layers.base import (
    BASE_ROWS,
    MIXED_PARAMETERS_REFUSED,
    AdapterLayer,
    DoraMagnitude,
    LoraLayer,
    check_mixed_batch,
)
from peft_fast.layers.lora_embedding import LoraEmbedding
from peft_fast.layers.lora_linear import LoraLinear
from peft_fast.layers.nf4_linear import NF4_FIELDS, NF4Linear
from peft_fast.layers.param_wrapper import PARAM_DTYPES, LoraParamWrapper

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
