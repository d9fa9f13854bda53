"""The ``peft-fast`` command line: ``info`` (and, as they land, train / merge / bench)."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from peft_fast import __version__


def nf4_self_check(device: str, seconds: float = 1.0) -> dict[str, float | bool | int]:
    """Quantize/dequantize random weights for about ``seconds``; check error and idempotence.

    A round trip of an N(0, 1) weight through NF4 has a relative error near 0.1; quantizing the
    dequantized weight again must reproduce the very same bytes.
    """
    from peft_fast.nf4 import dequantize_nf4, quantize_nf4

    generator = torch.Generator().manual_seed(0)
    start, rounds, worst, idempotent = time.perf_counter(), 0, 0.0, True
    while rounds == 0 or time.perf_counter() - start < seconds:
        weight = torch.randn(256, 320, generator=generator).to(device)
        nf4 = quantize_nf4(weight, blocksize=64, double_quant=rounds % 2 == 0)
        restored = dequantize_nf4(nf4, torch.float32)
        worst = max(worst, float((restored - weight).norm() / weight.norm()))
        again = quantize_nf4(restored, blocksize=64, double_quant=nf4.double_quant)
        idempotent &= torch.equal(again.packed, nf4.packed)
        rounds += 1
    return {"rounds": rounds, "max_relative_error": worst, "idempotent": idempotent, "ok": idempotent and worst < 0.15}


def triton_self_check(device: str) -> str:
    """Compare the Triton dequantization kernel with the torch path, where a backend exists."""
    from peft_fast.ops import backend_name

    if backend_name(device) == "torch-cpu":
        return "skipped (no CUDA; set PEFT_FAST_BACKEND=triton to use the interpreter)"
    from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton
    from peft_fast.nf4 import dequantize_nf4, quantize_nf4

    nf4 = quantize_nf4(torch.randn(64, 320, device=device), blocksize=64, double_quant=True)
    same = all(
        torch.equal(dequantize_nf4_triton(nf4, dtype), dequantize_nf4(nf4, dtype))
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    )
    return "bit-exact with the torch path" if same else "MISMATCH with the torch path"


def cmd_info(args: argparse.Namespace) -> int:
    from peft_fast.ops import backend_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"peft-fast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}", end="")
    except ImportError:
        print(", triton not installed", end="")
    import transformers

    print(f", transformers {transformers.__version__}")
    print(f"backend: {backend_name(device)}")
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    check = nf4_self_check(device, seconds=args.seconds)
    print(
        f"NF4 round trip: {check['rounds']} rounds, max relative error {check['max_relative_error']:.4f}, "
        f"re-quantization {'identical' if check['idempotent'] else 'DIFFERENT'}: {'ok' if check['ok'] else 'FAILED'}"
    )
    print(f"NF4 Triton kernel: {triton_self_check(device)}")
    return 0 if check["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, backend, device and an NF4 self-check")
    info.add_argument("--seconds", type=float, default=1.0, help="how long the NF4 self-check runs")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
