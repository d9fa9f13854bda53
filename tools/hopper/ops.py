"""The ops the toolkit covers, and :data:`REGISTRY`, the one list the report and the compile sweep read.

Each :class:`OpEntry` names an op and gives

* ``report()``: its cases at Llama shapes (hidden 4096, MLP 14336; bf16; NF4 + double
  quantization), each with an analytic floor (the op's FLOPs at the bf16 rate vs the fewest bytes
  at the HBM rate) and, where the issue states one, a goal;
* ``sweep(dtype)``: representative cases in one activation dtype ("fp32", "fp16", "bf16") that
  together reach every kernel the op launches and every variant of it (base kinds, rank chunks,
  split or unsplit reductions, ...). The compile sweep records their launches and compiles every
  autotune config of each, so a new kernel is covered as soon as an op entry launches it.

Adding an op is one entry (see bench/hopper/README.md, "How to add an op"). The builders below
call the library's public launchers exactly as the library does, on inputs from
:mod:`tools.hopper.cases` (fake CUDA tensors when captured, real ones when timed).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from tools.hopper import fused_ops
from tools.hopper.cases import (
    BASES,
    BLOCKSIZE,
    DROPOUT,
    DTYPES,
    SCALE,
    SEED,
    Goal,
    OpCase,
    OpEntry,
    R,
    element_size,
    fake,
    fake_base,
    fake_nf4,
    weight_bytes,
)

# Representative rows for the sweep: decode (M <= 16, split-K), mid (the fused NF4 GEMMs) and large
# (dequantize once, then dense). None is a multiple of 16, so M compiles without the divisibility
# hint (the general case); their autotune buckets (16, 512, 4096) all are, so a kernel the
# regimes share is one binary per config, not one per regime. LARGE_SPLIT_M is large enough that H
# needs no split over K (H then written in the activation dtype, not as fp32 partials).
DECODE_M, MID_M, LARGE_M, LARGE_SPLIT_M = 13, 300, 4100, 16390
HIDDEN, MLP = 4096, 14336
RANKS = (16, 64)  # the smallest and the largest rank chunk (BLOCK_R) the kernels compile


# -- the LoRA linear -------------------------------------------------------------------------------


def _forward_bytes(m: int, n: int, k: int, r: int, base: str, dtype: str, blocksize: int) -> int:
    # x, W, A, B in; y and h out
    return element_size(dtype) * (m * k + r * k + n * r + m * n + m * r) + weight_bytes(base, n, k, dtype, blocksize)


def qlora_forward(
    m: int,
    k: int,
    n: int,
    goal: float | None = None,
    *,
    dtype: str = "bf16",
    base: str = "nf4dq",
    r: int = R,
    dropout: float = DROPOUT,
    bias: bool = False,
    blocksize: int = BLOCKSIZE,
    op: str = "qlora_forward",
) -> OpCase:
    """``lora_linear_forward`` (Y = X·deq(W)ᵀ + b + s·drop(X)·Aᵀ·Bᵀ), M×K activations, N out-features."""
    torch_dtype = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.lora_linear import lora_linear_forward

        lora_linear_forward(
            fake(m, k, dtype=torch_dtype), fake_base(base, n, k, torch_dtype, blocksize), fake(r, k, dtype=torch_dtype),
            fake(n, r, dtype=torch_dtype), fake(n, dtype=torch_dtype) if bias else None, SCALE, dropout, SEED,
        )  # fmt: skip

    return OpCase(
        op,
        m,
        n,
        k,
        r,
        base,
        dropout,
        run,
        flops=2.0 * m * n * k + 2.0 * m * k * r + 2.0 * m * r * n,
        bytes=_forward_bytes(m, n, k, r, base, dtype, blocksize),
        goal=None if goal is None else Goal("ratio_max", goal),
        dtype=dtype,
    )


def qlora_decode(m: int, k: int = HIDDEN, n: int = HIDDEN) -> OpCase:
    """The forward without grad at decode sizes (no dropout), scored against the HBM rate."""
    case = qlora_forward(m, k, n, dropout=0.0, op="qlora_decode")
    case.goal, case.bandwidth = Goal("hbm_fraction_min", 0.50), "hbm"
    return case


def _backward_run(m: int, k: int, n: int, dtype: str, base: str, r: int, dropout: float, blocksize: int,
                  needs: tuple[bool, bool, bool]):  # fmt: skip
    """The report's call of ``lora_linear_backward`` asking for (dX, dA, dB) as ``needs`` says."""
    torch_dtype = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.lora_linear import lora_linear_backward

        t = lambda *shape: fake(*shape, dtype=torch_dtype)
        lora_linear_backward(
            t(m, n), t(m, k), t(m, r), fake_base(base, n, k, torch_dtype, blocksize), t(r, k), t(n, r),
            SCALE, dropout, SEED, *needs,
        )  # fmt: skip

    return run


def qlora_backward(
    m: int = HIDDEN,
    k: int = HIDDEN,
    n: int = HIDDEN,
    *,
    dtype: str = "bf16",
    base: str = "nf4dq",
    r: int = R,
    dropout: float = DROPOUT,
    blocksize: int = BLOCKSIZE,
) -> OpCase:
    """``lora_linear_backward`` with every gradient (dX with the LoRA term, dA, dB, dH)."""
    run = _backward_run(m, k, n, dtype, base, r, dropout, blocksize, needs=(True, True, True))
    # dX = dY·W, dH = s·dY·B, dB = s·dYᵀ·H, dA = dHᵀ·drop(X), dX += (dH·A)⊙mask
    flops = 2.0 * m * n * k + 2.0 * m * n * r * 2 + 2.0 * m * k * r * 2
    size = element_size(dtype)
    nbytes = size * (m * n + m * k + m * r + r * k + n * r) + weight_bytes(base, n, k, dtype, blocksize)
    nbytes += size * (m * k + r * k + n * r)
    return OpCase(
        "qlora_backward",
        m,
        n,
        k,
        r,
        base,
        dropout,
        run,
        flops=flops,
        bytes=nbytes,
        floor_flops=2.0 * m * n * k,
        goal=Goal("ratio_max", 1.30),
        note="floor = ONE dense M×N×K GEMM at the bf16 rate (2MNK / rate), as the goal is stated",
        dtype=dtype,
    )


def _lora_forward_variants(dtype: str) -> list[OpCase]:
    cases = [
        qlora_forward(m, HIDDEN, HIDDEN, dtype=dtype, base=base, r=r, bias=True)
        for base in BASES
        for r in RANKS
        for m in (DECODE_M, MID_M, LARGE_M, LARGE_SPLIT_M)
    ]
    # NF4 blocks narrower than the row-streaming kernels' K tile take the general NF4 loaders
    # (the tiled GEMM at mid M, the split-K GEMV at decode); the dense cases above cover both ranks.
    cases += [
        qlora_forward(m, HIDDEN, HIDDEN, dtype=dtype, base=base, bias=True, blocksize=32)
        for base in ("nf4", "nf4dq")
        for m in (DECODE_M, MID_M)
    ]
    return cases


def _lora_backward_variants(dtype: str) -> list[OpCase]:
    # MID_M: dX over the NF4 (or dense) base, dA in one M range; LARGE_M: dX over deq(W), dA split over M.
    return [
        qlora_backward(m, HIDDEN, HIDDEN, dtype=dtype, base=base, r=r)
        for base in BASES
        for r in RANKS
        for m in (MID_M, LARGE_M)
    ]


def dequant_then_cublas(m: int, k: int, n: int) -> OpCase:
    """The baseline PEFT + bitsandbytes stand for: the dequant kernel, then a bf16 torch.mm (no LoRA)."""

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
        bytes=element_size("bf16") * (m * k + m * n) + weight_bytes("nf4dq", n, k),
        note="baseline: the dequant kernel, then a bf16 torch.mm at roofline (no LoRA)",
    )


# -- NF4 dequantization, (IA)³, bottleneck adapters --------------------------------------------------


def nf4_dequantize(n: int = HIDDEN, k: int = HIDDEN, *, dtype: str = "bf16", base: str = "nf4dq") -> OpCase:
    """``dequantize_nf4_triton`` of an [n, k] weight into ``dtype``: bandwidth-bound, scored against copy."""

    def run() -> None:
        from peft_fast.kernels.nf4_dequant import dequantize_nf4_triton

        dequantize_nf4_triton(fake_nf4(n, k, double_quant=base == "nf4dq"), DTYPES[dtype])

    return OpCase(
        "nf4_dequantize",
        0,
        n,
        k,
        0,
        base,
        0.0,
        run,
        flops=0.0,
        bytes=weight_bytes(base, n, k) + element_size(dtype) * n * k,
        goal=Goal("copy_fraction_min", 0.85),
        note="M = 0: no activations; bytes = NF4 weight read + bf16 weight written",
        dtype=dtype,
        bandwidth="copy",
    )


def ia3_forward(
    m: int = HIDDEN,
    k: int = HIDDEN,
    n: int = HIDDEN,
    *,
    dtype: str = "bf16",
    base: str = "nf4dq",
    scale_input: bool = False,
    bias: bool = False,
) -> OpCase:
    """``ia3_linear_forward``: output scaling (k/v projections) unless ``scale_input`` (the MLP's down-projection)."""
    torch_dtype = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.ia3 import ia3_linear_forward

        ia3_linear_forward(
            fake(m, k, dtype=torch_dtype), fake_base(base, n, k, torch_dtype),
            fake(k if scale_input else n, dtype=torch.float32), fake(n, dtype=torch_dtype) if bias else None,
            scale_input,
        )  # fmt: skip

    size = element_size(dtype)
    # x, W, l in; y (and y0, kept for the backward of output scaling) out
    nbytes = size * (m * k + (1 if scale_input else 2) * m * n) + 4 * (k if scale_input else n)
    return OpCase(
        "ia3_forward",
        m,
        n,
        k,
        0,
        base,
        0.0,
        run,
        flops=2.0 * m * n * k,
        bytes=nbytes + weight_bytes(base, n, k, dtype),
        goal=Goal("ratio_max", 1.30),
        note="output scaling (k/v projections): Y and Y0 written",
        dtype=dtype,
    )


def ia3_backward(
    m: int = HIDDEN, k: int = HIDDEN, n: int = HIDDEN, *, dtype: str = "bf16", base: str = "nf4dq", scale_input: bool
) -> OpCase:
    """``ia3_linear_backward`` with dX and dl (sweep only: the report has no (IA)³ backward yet)."""
    torch_dtype = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.ia3 import ia3_linear_backward

        saved = fake(m, k if scale_input else n, dtype=torch_dtype)  # X for input scaling, Y0 for output
        l_vector = fake(k if scale_input else n, dtype=torch.float32)
        ia3_linear_backward(
            fake(m, n, dtype=torch_dtype), saved, fake_base(base, n, k, torch_dtype), l_vector, scale_input, True, True
        )

    size = element_size(dtype)
    nbytes = size * (m * n + m * (k if scale_input else n) + m * k) + weight_bytes(base, n, k, dtype)
    return OpCase("ia3_backward", m, n, k, 0, base, 0.0, run, flops=2.0 * m * n * k, bytes=nbytes, dtype=dtype)


def _ia3_forward_variants(dtype: str) -> list[OpCase]:
    return [
        ia3_forward(MID_M, HIDDEN, HIDDEN, dtype=dtype, base=base, scale_input=scale_input, bias=True)
        for base in BASES
        for scale_input in (False, True)
    ]


def _ia3_backward_variants(dtype: str) -> list[OpCase]:
    return [
        ia3_backward(MID_M, HIDDEN, HIDDEN, dtype=dtype, base=base, scale_input=scale_input)
        for base in BASES
        for scale_input in (False, True)
    ]


def adapter_forward(
    m: int = HIDDEN,
    d: int = HIDDEN,
    b: int = 64,
    *,
    dtype: str = "bf16",
    layer_norm: bool = False,
    residual: bool = False,
    activation: str = "relu",
) -> OpCase:
    """``bottleneck_adapter_forward``: serial (R = X) without LayerNorm takes the one fused pass."""
    torch_dtype = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.adapter import bottleneck_adapter_forward

        t = lambda *shape: fake(*shape, dtype=torch_dtype)
        ln = (t(d), t(d)) if layer_norm else (None, None)
        bottleneck_adapter_forward(
            t(m, d), t(m, d) if residual else None, *ln, 1e-5, t(b, d), t(b), t(d, b), t(d),
            SCALE, activation, DROPOUT, SEED,
        )  # fmt: skip

    size = element_size(dtype)
    nbytes = size * (m * d + 2 * b * d + b + d + m * d + m * b)  # x, Wd, bd, Wu, bu in; y, z out
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
        bytes=nbytes + (size * m * d if residual else 0),
        goal=Goal("ratio_max", 1.30),
        note="serial adapter (R = X), no LayerNorm, relu; r = bottleneck width; N = K = hidden",
        dtype=dtype,
    )


def adapter_backward(m: int, d: int, b: int, *, dtype: str, layer_norm: bool, activation: str = "gelu") -> OpCase:
    """``bottleneck_adapter_backward`` of a serial adapter, every gradient (sweep only)."""
    torch_dtype = DTYPES[dtype]

    def run() -> None:
        from peft_fast.kernels.adapter import bottleneck_adapter_backward

        t = lambda *shape: fake(*shape, dtype=torch_dtype)
        stats = fake(m if layer_norm else 0, dtype=torch.float32), fake(m if layer_norm else 0, dtype=torch.float32)
        ln = (t(d), t(d)) if layer_norm else (None, None)
        bottleneck_adapter_backward(
            t(m, d), t(m, d), t(m, b), *stats, *ln, t(b, d), t(d, b), SCALE, activation, DROPOUT, SEED,
            True, True, True, True, True,
        )  # fmt: skip

    nbytes = element_size(dtype) * (3 * m * d + 2 * m * b + 4 * b * d)
    return OpCase(
        "adapter_backward", m, d, d, b, "dense", DROPOUT, run, flops=8.0 * m * d * b, bytes=nbytes, dtype=dtype
    )


def _adapter_forward_variants(dtype: str) -> list[OpCase]:
    # LayerNorm, or a separate residual (parallel adapter): the two-kernel path; neither: the fused pass.
    layouts = ((True, False), (False, True), (False, False))
    return [
        adapter_forward(MID_M, HIDDEN, b, dtype=dtype, layer_norm=ln, residual=res, activation="gelu")
        for b in RANKS
        for ln, res in layouts
    ]


def _adapter_backward_variants(dtype: str) -> list[OpCase]:
    return [adapter_backward(MID_M, HIDDEN, b, dtype=dtype, layer_norm=ln) for b in RANKS for ln in (True, False)]


# -- the calibration GEMM ----------------------------------------------------------------------------


def dense_tutorial_gemm(m: int = HIDDEN, n: int = HIDDEN, k: int = HIDDEN) -> OpCase:
    """The Triton tutorial's GEMM (:mod:`tools.hopper.tutorial_gemm`): the cost model's yardstick."""

    def run() -> None:
        from tools.hopper.tutorial_gemm import matmul

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
        bytes=element_size("bf16") * (m * k + k * n + m * n),
        note="calibration: the Triton tutorial GEMM 128×128×64, 8 warps, 3 stages; expect ≈1.0–1.05",
    )


# -- the candidates of a runtime choice, each as its own op ----------------------------------------
#
# "<op>:<candidate>" is the op run with that candidate forced (PEFT_FAST_FORCE, as a user would):
# tests/test_kernel_plans.py holds each plan's static order, and its switch points, to these
# predictions. Shapes: the switch points' buckets on either side, and the large-M forward.

CANDIDATE_SHAPE = (HIDDEN, HIDDEN)  # N, K


def _forced(case: OpCase, choice_op: str, candidate: str, name: str) -> OpCase:
    inner = case.run

    def run() -> None:
        before = os.environ.get("PEFT_FAST_FORCE")
        os.environ["PEFT_FAST_FORCE"] = f"{choice_op}={candidate}"
        try:
            inner()
        finally:
            if before is None:
                del os.environ["PEFT_FAST_FORCE"]
            else:
                os.environ["PEFT_FAST_FORCE"] = before

    return dataclasses.replace(case, op=f"{name}:{candidate}", run=run, goal=None, note=f"forced: {candidate}")


def qlora_dx(m: int, k: int = HIDDEN, n: int = HIDDEN, *, dtype: str = "bf16", base: str = "nf4dq") -> OpCase:
    """``lora_linear_backward`` asked for dX only (dY·deq(W) + the LoRA term): what the dX choice decides."""
    run = _backward_run(m, k, n, dtype, base, R, DROPOUT, BLOCKSIZE, needs=(True, False, False))
    size = element_size(dtype)
    nbytes = size * (m * n + 2 * m * k + m * R + R * k + n * R) + weight_bytes(base, n, k, dtype, BLOCKSIZE)
    flops = 2.0 * m * n * k + 4.0 * m * n * R + 2.0 * m * k * R
    return OpCase("qlora_dx", m, n, k, R, base, DROPOUT, run, flops=flops, bytes=nbytes, dtype=dtype)


def _candidate_cases() -> list[OpCase]:
    from peft_fast.kernels import plans

    n, k = CANDIDATE_SHAPE
    bf16 = torch.bfloat16
    groups = [
        ("qlora_forward", "lora_forward", (1, 16, 32, 64, 128, 256, 512, 4096),
         lambda m: qlora_forward(m, k, n), lambda m: plans.lora_forward_plan(m, n, k, "nf4_rows", bf16, R, DROPOUT)),
        ("qlora_dx", "lora_dx", (64, 128, 512, 4096),
         lambda m: qlora_dx(m, k, n), lambda m: plans.lora_dx_plan(m, n, k, "nf4_rows", bf16, R, DROPOUT)),
        ("qlora_backward", "lora_dh_db", (512, 1024, 2048, 4096),
         lambda m: dataclasses.replace(qlora_backward(m), goal=None), lambda m: plans.lora_dh_db_plan(m, n, bf16, R)),
        ("ia3_forward_out", "ia3_forward", (16, 32, 64, 128, 256, 512, 4096),
         lambda m: dataclasses.replace(ia3_forward(m, k, n), op="ia3_forward_out"),
         lambda m: plans.ia3_forward_plan(m, n, k, "nf4_rows", bf16, False)),
        ("ia3_backward_in", "ia3_backward", (64, 128, 256, 512, 4096),
         lambda m: dataclasses.replace(ia3_backward(m, k, n, scale_input=True), op="ia3_backward_in"),
         lambda m: plans.ia3_backward_plan(m, n, k, "nf4_rows", bf16, True)),
    ]  # fmt: skip
    return [
        _forced(make(m), choice_op, candidate, name)
        for name, choice_op, ms, make, plan in groups
        for m in ms
        for candidate in plan(m)
    ]


# -- the registry ------------------------------------------------------------------------------------


REGISTRY: list[OpEntry] = [
    OpEntry("dense_tutorial_gemm", lambda: [dense_tutorial_gemm()]),
    OpEntry(
        "qlora_forward",
        lambda: [
            qlora_forward(512, HIDDEN, HIDDEN, 1.30),
            qlora_forward(4096, HIDDEN, HIDDEN, 1.15),
            qlora_forward(4096, HIDDEN, MLP, 1.15),
            qlora_forward(4096, MLP, HIDDEN, 1.15),
        ],
        _lora_forward_variants,
    ),
    OpEntry(
        "dequant_then_cublas",
        lambda: [
            dequant_then_cublas(512, HIDDEN, HIDDEN),
            dequant_then_cublas(4096, HIDDEN, HIDDEN),
            dequant_then_cublas(4096, HIDDEN, MLP),
            dequant_then_cublas(4096, MLP, HIDDEN),
        ],
    ),
    OpEntry(
        "qlora_backward",
        # M = 512 without a goal (the goal is stated at M = 4096): what dora_backward compares with there.
        lambda: [dataclasses.replace(qlora_backward(512), goal=None), qlora_backward()],
        _lora_backward_variants,
    ),
    OpEntry("qlora_decode", lambda: [qlora_decode(1), qlora_decode(16)]),
    OpEntry(
        "nf4_dequantize",
        lambda: [nf4_dequantize()],
        lambda dtype: [nf4_dequantize(dtype=dtype, base=base) for base in ("nf4", "nf4dq")],
    ),
    OpEntry("ia3_forward", lambda: [ia3_forward()], _ia3_forward_variants),
    OpEntry("ia3_backward", lambda: [], _ia3_backward_variants),
    OpEntry("adapter_forward", lambda: [adapter_forward()], _adapter_forward_variants),
    OpEntry("adapter_backward", lambda: [], _adapter_backward_variants),
    *fused_ops.ENTRIES,
    OpEntry("candidates", _candidate_cases),
]


def all_ops() -> list[OpCase]:
    """Every report case, in report order (the registry's order)."""
    return [case for entry in REGISTRY for case in entry.report()]


def sweep_cases(dtypes: tuple[str, ...] = tuple(DTYPES)) -> list[OpCase]:
    """Every compile-sweep case: each entry's representative cases in each activation dtype."""
    return [case for dtype in dtypes for entry in REGISTRY for case in entry.sweep(dtype)]
