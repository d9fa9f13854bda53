"""Microbenchmark of one QLoRA / LoRA linear: peft_fast vs PEFT (+ bitsandbytes), same run.

    python bench/bench_lora_linear.py [--quick] [--out DIR]

On CUDA: Llama shapes, bf16, r=16, ``triton.testing.do_bench``. On CPU: small shapes, fp32, the
torch backend (the Triton interpreter is a correctness tool, not a speed one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import RESULTS_DIR, peak_memory_bytes, time_ms, write_results
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.nf4 import quantize_nf4

GPU_SHAPES = [(4096, 4096), (4096, 11008), (4096, 14336), (14336, 4096)]
GPU_M = [1, 16, 512, 4096, 16384]
CPU_SHAPES = [(1024, 1024), (1024, 2816)]
CPU_M = [1, 16, 256]
RANK = 16


def ours(dense: torch.nn.Linear, quantized: bool) -> torch.nn.Module:
    base = NF4Linear(quantize_nf4(dense.weight.detach(), 64, True)) if quantized else dense
    layer = LoraLinear(base)
    layer.update_layer("default", r=RANK, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False)
    return layer.to(dense.weight.dtype)


def peft_model(dense: torch.nn.Linear, quantized: bool) -> torch.nn.Module:
    import peft

    holder = torch.nn.Module()
    if quantized:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dense.weight.dtype,
                                  compress_statistics=True, quant_type="nf4")  # fmt: skip
        layer.load_state_dict(dense.state_dict())
        holder.proj = layer.to(dense.weight.device)
    else:
        holder.proj = dense
    config = peft.LoraConfig(r=RANK, lora_alpha=32, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False)
    model = peft.get_peft_model(holder, config)
    return model.base_model.model.proj.to(dense.weight.dtype)


def implementations(dense: torch.nn.Linear, device: str) -> dict[str, torch.nn.Module]:
    impls = {"peft_fast qlora": ours(dense, True), "peft_fast lora": ours(dense, False)}
    try:
        impls["peft+bnb qlora"] = peft_model(dense, True)
    except Exception as exc:
        print(f"skipping PEFT + bitsandbytes: {exc}", file=sys.stderr)
    impls["peft lora"] = peft_model(torch.nn.Linear(dense.in_features, dense.out_features, bias=False,
                                                    device=device, dtype=dense.weight.dtype), False)  # fmt: skip
    return impls


def bench(quick: bool) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes, ms = (GPU_SHAPES, GPU_M) if device == "cuda" else (CPU_SHAPES, CPU_M)
    if quick:
        shapes, ms = shapes[:1], ms[:2] + ms[-1:]
    rows = []
    for k, n in shapes:
        dense = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        impls = implementations(dense, device)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(m, n, device=device, dtype=dtype)
            flops = 2 * m * n * k + 2 * m * RANK * (n + k)
            for name, module in impls.items():
                module.train()
                forward = lambda module=module, x=x: module(x)
                step = lambda module=module, x=x, grad=grad: module(x).backward(grad)
                for phase, fn, phase_flops in (("fwd", forward, flops), ("fwd+bwd", step, 3 * flops)):
                    timing = time_ms(fn, device)
                    rows.append({"op": "lora_linear", "impl": name, "phase": phase, "M": m, "K": k, "N": n,
                                 "r": RANK, "dtype": str(dtype).removeprefix("torch."), **timing,
                                 "tflops": phase_flops / timing["ms"] / 1e9,
                                 "peak_mem_bytes": peak_memory_bytes(fn, device)})  # fmt: skip
                    print(f"{name:16s} {phase:8s} M={m:<6d} K={k} N={n}: {timing['ms']:.3f} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one shape, three batch sizes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    json_path, md_path = write_results("lora_linear", bench(args.quick), args.out)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
