"""peft_fast: fused Triton kernels for LoRA / QLoRA fine-tuning of Hugging Face models."""

from peft_fast.adapters import BottleneckAdapter, load_adapters, patch_adapters, save_adapters, unpatch_adapters
from peft_fast.config import AdapterConfig, IA3Config, LoraConfig
from peft_fast.distributed import shard
from peft_fast.front_doors import (
    add_adapter,
    disable_adapters,
    load_adapter,
    merge,
    patch,
    print_trainable_parameters,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unpatch,
)
from peft_fast.ia3 import IA3Linear, load_ia3, merge_ia3, patch_ia3, save_ia3, unpatch_ia3
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from peft_fast.ops import bottleneck_adapter, ia3_linear, lora_linear, merge_lora
from peft_fast.prompt_methods import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    load_prompt_adapter,
    patch_prompt,
    save_prompt_adapter,
    unpatch_prompt,
)
from peft_fast.quantize import quantize_model
from peft_fast.version import __version__

__all__ = [
    "AdapterConfig",
    "AdaptionPromptConfig",
    "BottleneckAdapter",
    "IA3Config",
    "IA3Linear",
    "LoraConfig",
    "LoraLinear",
    "NF4Linear",
    "NF4Weight",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "__version__",
    "add_adapter",
    "bottleneck_adapter",
    "dequantize_nf4",
    "disable_adapters",
    "ia3_linear",
    "load_adapter",
    "load_adapters",
    "load_ia3",
    "load_prompt_adapter",
    "lora_linear",
    "merge",
    "merge_ia3",
    "merge_lora",
    "patch",
    "patch_adapters",
    "patch_ia3",
    "patch_prompt",
    "print_trainable_parameters",
    "quantize_model",
    "quantize_nf4",
    "save_adapter",
    "save_adapters",
    "save_ia3",
    "save_prompt_adapter",
    "set_adapter",
    "shard",
    "trainable_parameters",
    "unpatch",
    "unpatch_adapters",
    "unpatch_ia3",
    "unpatch_prompt",
]
