"""peft_fast: fused Triton kernels for LoRA / QLoRA fine-tuning of Hugging Face models."""

__version__ = "0.1.0"

from peft_fast.layers import NF4Linear
from peft_fast.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from peft_fast.quantize import quantize_model

__all__ = [
    "NF4Linear",
    "NF4Weight",
    "__version__",
    "dequantize_nf4",
    "quantize_model",
    "quantize_nf4",
]
