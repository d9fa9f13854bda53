"""``peft-fast bench``: peft_fast against PEFT + bitsandbytes, side by side, in one run.

Suites: NF4 dequantization (vs bitsandbytes and a plain copy of the same output size), the QLoRA
linear forward and forward+backward (vs PEFT over bnb ``Linear4bit``, PEFT over a dense Linear and
the plain matmul), dense-base LoRA (vs PEFT), bytes saved for backward per layer and per model,
peak memory of streaming quantization, and a whole training step of a Llama-architecture model.

CUDA times come from ``triton.testing.do_bench`` (L2 cleared, median with p20/p80); CPU times from
``torch.utils.benchmark``. Every row carries op, shapes, dtype, backend, implementation, time,
TFLOP/s, GB/s and peak memory; the file carries the run's metadata (device, library versions,
git commit, date). Output: ``<date>-<device>-bench.json`` + ``.md`` + ``.png`` in ``out``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from peft_fast.benchmark.harness import TARGETS as TARGETS
from peft_fast.benchmark.harness import markdown_table as markdown_table
from peft_fast.benchmark.harness import peak_memory_bytes as peak_memory_bytes
from peft_fast.benchmark.harness import plot as plot
from peft_fast.benchmark.harness import run_metadata, saved_bytes, target_checks, time_ms, write_results
from peft_fast.benchmark.harness import timed_row as timed_row
from peft_fast.benchmark.step_suite import bench_step_model as bench_step_model
from peft_fast.benchmark.suites import RANK as RANK
from peft_fast.benchmark.suites import bench_dequantize as bench_dequantize
from peft_fast.benchmark.suites import bench_lora_linear as bench_lora_linear
from peft_fast.benchmark.suites import bench_quantize_memory as bench_quantize_memory
from peft_fast.benchmark.suites import bench_saved_bytes as bench_saved_bytes
from peft_fast.benchmark.suites import bench_train_step as bench_train_step
from peft_fast.benchmark.suites import model_saved_bytes as model_saved_bytes
from peft_fast.benchmark.suites import peft_fast_lora_layer as peft_fast_lora_layer
from peft_fast.benchmark.suites import peft_lora_layer as peft_lora_layer
from peft_fast.benchmark.suites import quantize_peak_rss as quantize_peak_rss
from peft_fast.benchmark.suites import tiny_llama_config as tiny_llama_config
from peft_fast.benchmark.suites import write_random_llama_checkpoint as write_random_llama_checkpoint

__all__ = ["run_benchmarks", "run_metadata", "saved_bytes", "target_checks", "time_ms", "write_results"]

GPU_SHAPES = [(4096, 4096), (4096, 11008), (4096, 14336), (14336, 4096)]
GPU_M = [1, 16, 512, 4096, 16384]
CPU_SHAPES = [(1024, 1024), (1024, 2816)]
CPU_M = [1, 16, 256]


# -- running and writing ------------------------------------------------------------------------


SUITES = ("dequantize", "lora_linear", "saved_bytes", "train_step", "quantize_memory", "step_model")


def run_benchmarks(
    quick: bool = False,
    suites: tuple[str, ...] | None = None,
    after_suite: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every suite (or those named) on the GPU if there is one, else on the CPU.

    A suite that raises (out of memory, a library missing) adds a ``suite_error`` row and the run
    goes on with the next. ``after_suite(rows so far)`` runs after each suite, so a caller can
    write partial results that survive a run killed by a time limit.
    """
    chosen = suites or SUITES
    unknown = [suite for suite in chosen if suite not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SUITES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes, ms = (GPU_SHAPES, GPU_M) if device == "cuda" else (CPU_SHAPES, CPU_M)
    if quick:
        shapes, ms = shapes[:1], [ms[0], ms[-1]]
    run_suite = {
        "dequantize": lambda: bench_dequantize(shapes, device, dtype),
        "lora_linear": lambda: bench_lora_linear(shapes, ms, device, dtype),
        "saved_bytes": lambda: bench_saved_bytes(device),
        "train_step": lambda: bench_train_step(device, quick),
        "quantize_memory": lambda: bench_quantize_memory(quick),
        "step_model": lambda: bench_step_model(quick),
    }
    rows: list[dict] = []
    for suite in chosen:
        print(f"[bench] {suite} on {device} ...", flush=True)
        try:
            rows += run_suite[suite]()
        except Exception as exc:
            print(f"[bench] {suite} failed: {exc!r}", file=sys.stderr, flush=True)
            rows.append({"op": "suite_error", "impl": suite, "error": repr(exc)[:500]})
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()  # the next suite starts from free memory
        if after_suite is not None:
            after_suite(rows)
    return rows
