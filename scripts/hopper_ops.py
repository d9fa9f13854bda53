"""The hot ops the Hopper report covers: shapes, how to call each launcher, floors and goals.

Every op is a :class:`OpCase`: ``run()`` builds its inputs (fake CUDA tensors inside
``launch_capture.capture``) and calls the public launcher exactly as the library does; the
floor is analytic (op FLOPs at the bf16 rate vs the fewest bytes at the HBM rate). Shapes are
Llama's (hidden 4096, MLP 14336), bf16, NF4 with blocksize 64 and double quantization, LoRA
rank 16, scale 2.0, dropout 0.1 where it applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

R = 16
SCALE = 2.0
DROPOUT = 0.1
# A seed that is not a multiple of 16 (nor 1): the JIT specialises ints on divisibility by 16,
# which a random seed hits only one time in 16.
SEED = 12345
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
BF16 = 2  # bytes per element


@dataclass(frozen=True)
class Goal:
    """An acceptance goal: ``kind`` is "ratio_max", "hbm_fraction_min" or "copy_fraction_min"."""

    kind: str
    target: float

    def met(self, op: dict[str, Any]) -> bool | None:
        value = op.get(
            {"ratio_max": "ratio", "hbm_fraction_min": "hbm_fraction", "copy_fraction_min": "copy_fraction"}[self.kind]
        )
        if value is None:
            return None
        return value <= self.target if self.kind == "ratio_max" else value >= self.target

    def describe(self) -> str:
        return {
            "ratio_max": f"ratio ≤ {self.target:.2f}",
            "hbm_fraction_min": f"≥ {self.target:.0%} of HBM bw",
            "copy_fraction_min": f"≥ {self.target:.0%} of copy bw",
        }[self.kind]


@dataclass
class OpCase:
    """One op at one shape."""

    op: str
    M: int
    N: int
    K: int
    r: int
    base: str  # "nf4", "nf4dq" or "dense"
    dropout: float
    run: Callable[[], Any]
    flops: float  # the op's useful FLOPs
    bytes: float  # the fewest bytes the op must move (inputs once, outputs once)
    floor_flops: float | None = None  # FLOPs the floor is stated against, if not ``flops``
    goal: Goal | None = None
    note: str = ""
    dtype: str = "bf16"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.op} M={self.M} N={self.N} K={self.K}"


# -- fake inputs (call inside launch_capture.capture) ---------------------------------------------


def fake(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


def fake_nf4(n: int, k: int):
    """An NF4Weight [n, k] with double quantization, blocksize 64: the shapes bitsandbytes stores."""
    from peft_fast.nf4 import NF4Weight

    numel = n * k
    n_blocks = math.ceil(numel / BLOCKSIZE)
    return NF4Weight(
        packed=fake((numel + 1) // 2, 1, dtype=torch.uint8),
        absmax=fake(n_blocks, dtype=torch.uint8),
        shape=torch.Size((n, k)),
        dtype=torch.bfloat16,
        blocksize=BLOCKSIZE,
        nested_absmax=fake(math.ceil(n_blocks / NESTED_BLOCKSIZE), dtype=torch.float32),
        nested_offset=torch.empty((), dtype=torch.float32, device="cuda"),
    )


def nf4dq_bytes(n: int, k: int) -> int:
    """Bytes of an NF4 + DQ weight: packed codes, uint8 absmax, fp32 nested scales and offset."""
    n_blocks = math.ceil(n * k / BLOCKSIZE)
    return (n * k + 1) // 2 + n_blocks + 4 * math.ceil(n_blocks / NESTED_BLOCKSIZE) + 4


# -- the ops -------------------------------------------------------------------------------------


def _forward_bytes(m: int, n: int, k: int, r: int) -> int:
    # x, W, A, B in; y and h out
    return BF16 * (m * k + r * k + n * r + m * n + m * r) + nf4dq_bytes(n, k)


def qlora_forward(m: int, k: int, n: int, goal: float) -> OpCase:
    def run() -> None:
        from peft_fast.kernels.lora_linear import lora_linear_forward

        lora_linear_forward(fake(m, k), fake_nf4(n, k), fake(R, k), fake(n, R), None, SCALE, DROPOUT, SEED)

    return OpCase(
        "qlora_forward",
        m,
        n,
        k,
        R,
        "nf4dq",
        DROPOUT,
        run,
        flops=2.0 * m * n * k + 2.0 * m * k * R + 2.0 * m * R * n,
        bytes=_forward_bytes(m, n, k, R),
        goal=Goal("ratio_max", goal),
    )


def qlora_backward(m: int = 4096, k: int = 4096, n: int = 4096) -> OpCase:
    def run() -> None:
        from peft_fast.kernels.lora_linear import lora_linear_backward

        lora_linear_backward(
            fake(m, n),
            fake(m, k),
            fake(m, R),
            fake_nf4(n, k),
            fake(R, k),
            fake(n, R),
            SCALE,
            DROPOUT,
            SEED,
            True,
            True,
            True,
        )

    # dX = dY·W, dH = s·dY·B, dB = s·dYᵀ·H, dA = dHᵀ·drop(X), dX += (dH·A)⊙mask
    flops = 2.0 * m * n * k + 2.0 * m * n * R * 2 + 2.0 * m * k * R * 2
    nbytes = BF16 * (m * n + m * k + m * R + R * k + n * R) + nf4dq_bytes(n, k) + BF16 * (m * k + R * k + n * R)
    return OpCase(
        "qlora_backward",
        m,
        n,
        k,
        R,
        "nf4dq",
        DROPOUT,
        run,
        flops=flops,
        bytes=nbytes,
        floor_flops=2.0 * m * n * k,
        goal=Goal("ratio_max", 1.30),
        note="floor = ONE dense M×N×K GEMM at the bf16 rate (2MNK / rate), as the goal is stated",
    )


def qlora_decode(m: int, k: int = 4096, n: int = 4096) -> OpCase:
    def run() -> None:
        from peft_fast.kernels.lora_linear import lora_linear_forward

        lora_linear_forward(fake(m, k), fake_nf4(n, k), fake(R, k), fake(n, R), None, SCALE, 0.0, SEED)

    return OpCase(
        "qlora_decode",
        m,
        n,
        k,
        R,
        "nf4dq",
        0.0,
        run,
        flops=2.0 * m * n * k + 2.0 * m * k * R + 2.0 * m * R * n,
        bytes=_forward_bytes(m, n, k, R),
        goal=Goal("hbm_fraction_min", 0.50),
    )


def nf4_dequantize(n: int = 4096, k: int = 4096) -> OpCase:
    def run() -> None:
        from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton

        dequantize_nf4_triton(fake_nf4(n, k), torch.bfloat16)

    return OpCase(
        "nf4_dequantize",
        0,
        n,
        k,
        0,
        "nf4dq",
        0.0,
        run,
        flops=0.0,
        bytes=nf4dq_bytes(n, k) + BF16 * n * k,
        goal=Goal("copy_fraction_min", 0.85),
        note="M = 0: no activations; bytes = NF4 weight read + bf16 weight written",
    )


def ia3_forward(m: int = 4096, k: int = 4096, n: int = 4096) -> OpCase:
    def run() -> None:
        from peft_fast.kernels.ia3 import ia3_linear_forward

        ia3_linear_forward(fake(m, k), fake_nf4(n, k), fake(n, dtype=torch.float32), None, False)

    # output scaling (attention k/v): x, W, l in; y and y0 (kept for the backward) out
    nbytes = BF16 * (m * k + 2 * m * n) + 4 * n + nf4dq_bytes(n, k)
    return OpCase(
        "ia3_forward",
        m,
        n,
        k,
        0,
        "nf4dq",
        0.0,
        run,
        flops=2.0 * m * n * k,
        bytes=nbytes,
        goal=Goal("ratio_max", 1.30),
        note="output scaling (k/v projections): Y and Y0 written",
    )


def adapter_forward(m: int = 4096, d: int = 4096, b: int = 64) -> OpCase:
    def run() -> None:
        from peft_fast.kernels.adapter import bottleneck_adapter_forward

        bottleneck_adapter_forward(
            fake(m, d), None, None, None, 1e-5, fake(b, d), fake(b), fake(d, b), fake(d), SCALE, "relu", DROPOUT, SEED
        )

    nbytes = BF16 * (m * d + 2 * b * d + b + d + m * d + m * b)  # x, Wd, bd, Wu, bu in; y, z out
    return OpCase(
        "adapter_forward",
        m,
        d,
        d,
        b,
        "dense",
        DROPOUT,
        run,
        flops=2.0 * 2 * m * d * b,
        bytes=nbytes,
        goal=Goal("ratio_max", 1.30),
        note="serial adapter (R = X), no LayerNorm, relu; r = bottleneck width; N = K = hidden",
    )


def dense_tutorial_gemm(m: int = 4096, n: int = 4096, k: int = 4096) -> OpCase:
    def run() -> None:
        from dense_tutorial_gemm import matmul

        matmul(fake(m, k), fake(k, n))

    return OpCase(
        "dense_tutorial_gemm",
        m,
        n,
        k,
        0,
        "dense",
        0.0,
        run,
        flops=2.0 * m * n * k,
        bytes=BF16 * (m * k + k * n + m * n),
        note="calibration: the Triton tutorial GEMM 128×128×64, 8 warps, 3 stages; expect ≈1.0–1.05",
    )


def dequant_then_cublas(m: int, k: int, n: int) -> OpCase:
    def run() -> None:
        from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton

        w = dequantize_nf4_triton(fake_nf4(n, k), torch.bfloat16)
        _ = fake(m, k) @ w.t()

    return OpCase(
        "dequant_then_cublas",
        m,
        n,
        k,
        0,
        "nf4dq",
        0.0,
        run,
        flops=2.0 * m * n * k,
        bytes=BF16 * (m * k + m * n) + nf4dq_bytes(n, k),
        note="baseline: the dequant kernel, then a bf16 torch.mm at roofline (no LoRA)",
    )


def all_ops() -> list[OpCase]:
    """Every op of the report, in report order."""
    return [
        dense_tutorial_gemm(),
        qlora_forward(512, 4096, 4096, 1.30),
        qlora_forward(4096, 4096, 4096, 1.15),
        qlora_forward(4096, 4096, 14336, 1.15),
        qlora_forward(4096, 14336, 4096, 1.15),
        dequant_then_cublas(512, 4096, 4096),
        dequant_then_cublas(4096, 4096, 4096),
        dequant_then_cublas(4096, 4096, 14336),
        dequant_then_cublas(4096, 14336, 4096),
        qlora_backward(),
        qlora_decode(1),
        qlora_decode(16),
        nf4_dequantize(),
        ia3_forward(),
        adapter_forward(),
    ]
