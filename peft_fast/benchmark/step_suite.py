"""The ``step_model`` suite of ``peft-fast bench``: both stacks' training step on the H200 roofline model.

Rows are modelled, never measured (``backend`` says so, on any machine: the step is traced on fake
tensors on the CPU), so their op is ``step_model``, not ``train_step``: the targets that compare
measured train steps never read them.
"""

from __future__ import annotations

__all__ = ["bench_step_model"]

_IMPL = {"peft_fast": "peft_fast qlora", "peft_bnb": "peft+bnb qlora"}


def _row(result) -> dict:
    return {
        "op": "step_model", "impl": _IMPL[result.stack], "backend": "H200 roofline model", "model": result.model,
        "layers": result.layers, "depth": result.depth, "batch": result.batch, "seq": result.seq,
        "M": result.batch * result.seq, "grad_ckpt": result.checkpointing, "dtype": "bfloat16", "ms": result.ms,
        "roofline_ms": result.roofline_ms, "flop_floor_ms": result.flop_floor_ms, "ops": result.ops,
        "kernels": result.kernels, "tflops": result.flops / result.ms / 1e9 if result.ms else None,
        "gb_per_s": result.bytes / result.ms / 1e6 if result.ms else None, "peak_mem_bytes": result.peak_bytes,
        "peak_at": result.peak_at.split(" (")[0], "saved_bytes": result.saved_bytes,
    }  # fmt: skip


def bench_step_model(quick: bool = False) -> list[dict]:
    """Rows for Llama-3-8B's dimensions, batch 1: S 2048 and 16384, checkpointing on and off, both stacks.

    ``quick``: S 2048 with checkpointing only, extrapolated from 2- and 3-layer traces (seconds, not minutes).
    """
    from peft_fast import step_model

    seqs, checkpointing = ((2048,), (True,)) if quick else ((2048, 16384), (True, False))
    rows = []
    for ckpt in checkpointing:
        for seq in seqs:
            for stack in ("peft_bnb", "peft_fast"):
                rows.append(_row(step_model.run(stack=stack, seq=seq, checkpointing=ckpt, extrapolate=quick)))
    return rows
