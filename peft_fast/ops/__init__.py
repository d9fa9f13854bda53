"""The custom ops, one module per fused op: each a ``torch.library`` custom op with a fake and an autograd formula.

Every op runs the Triton kernels of ``peft_fast/kernels/<op>.py`` on CUDA (or under the
interpreter) and that module's torch reference elsewhere; :mod:`peft_fast.ops._common` holds
what they share (the backend choice, autocast, seeds and dropout masks).
"""

from peft_fast.ops._common import (
    autocast_dtype,
    autocast_inputs,
    backend_name,
    check_input,
    dropout_mask,
    no_autocast,
)
from peft_fast.ops.adapter import bottleneck_adapter
from peft_fast.ops.cross_entropy import linear_cross_entropy
from peft_fast.ops.dora import dora_linear, dora_scale, dora_weight_norm
from peft_fast.ops.glu import glu, glu_packed
from peft_fast.ops.ia3 import ia3_linear
from peft_fast.ops.lora_linear import lora_linear, merge_lora
from peft_fast.ops.lora_mixed import AdapterStack, AdapterStackCache, group_rows, lora_mixed_batch, stack_adapters
from peft_fast.ops.nf4 import base_linear
from peft_fast.ops.rms_norm import rms_norm
from peft_fast.ops.rope import apply_rope

__all__ = [
    "AdapterStack",
    "AdapterStackCache",
    "apply_rope",
    "autocast_dtype",
    "autocast_inputs",
    "backend_name",
    "base_linear",
    "bottleneck_adapter",
    "check_input",
    "dora_linear",
    "dora_scale",
    "dora_weight_norm",
    "dropout_mask",
    "glu",
    "glu_packed",
    "group_rows",
    "ia3_linear",
    "linear_cross_entropy",
    "lora_linear",
    "lora_mixed_batch",
    "merge_lora",
    "no_autocast",
    "rms_norm",
    "stack_adapters",
]
