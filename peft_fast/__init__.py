"""peft_fast: fused Triton kernels for LoRA / QLoRA fine-tuning of Hugging Face models."""

__version__ = "0.1.0"

from peft_fast.config import LoraConfig
from peft_fast.io import load_adapter, save_adapter
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from peft_fast.ops import lora_linear, merge_lora
from peft_fast.patch import (
    add_adapter,
    disable_adapters,
    merge,
    patch,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unpatch,
)
from peft_fast.quantize import quantize_model

__all__ = [
    "LoraConfig",
    "LoraLinear",
    "NF4Linear",
    "NF4Weight",
    "__version__",
    "add_adapter",
    "dequantize_nf4",
    "disable_adapters",
    "load_adapter",
    "lora_linear",
    "merge",
    "merge_lora",
    "patch",
    "print_trainable_parameters",
    "quantize_model",
    "quantize_nf4",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unpatch",
]
