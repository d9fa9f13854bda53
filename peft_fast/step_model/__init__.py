"""The step model: one training step of a Hugging Face causal LM, traced on fake CUDA tensors, priced as on an H200.

For a config (default: Llama-3-8B's dimensions) each stack — peft_fast's QLoRA and PEFT +
bitsandbytes — is built on fake CUDA tensors (:mod:`.stacks`), one step (forward with labels under
bf16 autocast, then backward) runs under a dispatch mode that records every op (:mod:`.trace`),
each op is priced by a roofline of the H200 (:mod:`.costs`, :mod:`.custom_op_costs`), and device
memory is followed storage by storage (:mod:`.memory`). :mod:`.report` writes the tables and finds
the longest sequence that fits a memory budget.

    >>> from peft_fast import step_model
    >>> result = step_model.run(stack="peft_fast", seq=2048, checkpointing=True)
    >>> result.ms, result.kernels, result.peak_bytes / 1e9
    >>> step_model.compare(seq=2048)["ratios"]

A model, not a measurement: launch gaps, allocator fragmentation, library workspaces, L2 effects
and the optimizer step are not in it; GEMMs run at the measured bf16 rate (the static Hopper
report's ratios are applied to peft_fast's QLoRA ops in ``ms``, not in ``roofline_ms``).
``python -m peft_fast.step_model`` prints the tables and writes JSON + markdown.
"""

from peft_fast.step_model.costs import BF16_FLOPS_PER_S, COPY_BYTES_PER_S
from peft_fast.step_model.report import longest_context, write_report
from peft_fast.step_model.runner import KindTotals, StepResult, compare, one_layer, run
from peft_fast.step_model.stacks import STACKS, llama3_8b_config

__all__ = [
    "BF16_FLOPS_PER_S",
    "COPY_BYTES_PER_S",
    "STACKS",
    "KindTotals",
    "StepResult",
    "compare",
    "llama3_8b_config",
    "longest_context",
    "one_layer",
    "run",
    "write_report",
]
