"""What PEFT + bitsandbytes' QLoRA layer would take at the report's shapes: the launches it runs, at roofline.

The baseline each LoRA-linear op is compared with (``speedup_vs_peft_bnb`` in the report). PEFT's
``lora.bnb.Linear4bit.forward`` runs bitsandbytes' ``Linear4bit`` (``MatMul4Bit``), clones the
result, then ``lora_B(lora_A(dropout(x))) * scaling`` and adds it; bitsandbytes' ``dequantize_4bit``
first rebuilds the double-quantized absmax (``dequantize_blockwise``, then ``absmax += offset``)
and then writes deq(W) in the activation dtype, which one cuBLAS GEMM multiplies. A single-row
input without grad (decode at M = 1) takes bitsandbytes' ``gemv_4bit`` instead of dequantize +
GEMM. The backward is autograd's: the scaling's multiply, the two LoRA GEMMs of each of B and A,
the dropout mask applied to the gradient, deq(W) rebuilt the same way and one GEMM for dX, and
the add of the two dX terms. (Those call sequences are read from PEFT 0.x's and bitsandbytes
0.4x's sources; the library's own timing harness times the real stack beside ours on a GPU.)

Every launch is costed at roofline like the report's library calls — GEMMs at 790 TFLOP/s,
everything else (bitsandbytes' kernels included) at the HBM rate — and the op pays the same launch
gap per launch after the first as ours. So this is a lower bound of PEFT + bitsandbytes as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tools.hopper import cost_model
from tools.hopper.cases import BLOCKSIZE, OpCase, element_size
from tools.hopper.cost_model import H200, Ceilings

OPS = ("qlora_forward", "qlora_decode", "qlora_backward")


@dataclass(frozen=True)
class Step:
    """One launch of the baseline: its name, FLOPs and bytes (costed at roofline)."""

    name: str
    flops: float
    bytes: float

    def us(self, ceil: Ceilings = H200) -> float:
        return cost_model.roofline_us(self.flops, self.bytes, ceil)


@dataclass(frozen=True)
class Layer:
    """The baseline's launches for one op case."""

    steps: tuple[Step, ...]

    @property
    def predicted_us(self) -> float:
        return sum(step.us() for step in self.steps) + cost_model.launch_gaps_us(len(self.steps))

    def rows(self) -> list[dict[str, float | str]]:
        """The launches as report rows."""
        return [{"kernel": s.name, "flops": s.flops, "bytes": s.bytes, "predicted_us": round(s.us(), 3)}
                for s in self.steps]  # fmt: skip


def gemm(name: str, m: int, n: int, k: int, elem: int) -> Step:
    """An [m, k] × [k, n] GEMM in the activation dtype."""
    return Step(name, 2.0 * m * n * k, elem * (m * k + k * n + m * n))


def elementwise(name: str, elements: int, reads: int, writes: int, elem: int) -> Step:
    """An elementwise kernel reading ``reads`` and writing ``writes`` tensors of ``elements``."""
    return Step(name, 0.0, elem * elements * (reads + writes))


def dequantize(n: int, k: int, elem: int, double_quant: bool) -> list[Step]:
    """bitsandbytes' ``dequantize_4bit`` of an [n, k] NF4 weight: absmax first under double quantization."""
    blocks = math.ceil(n * k / BLOCKSIZE)
    steps = []
    if double_quant:
        steps.append(Step("bnb dequantize_blockwise (absmax)", 0.0, blocks * (1 + 4)))
        steps.append(Step("absmax += offset", 0.0, blocks * 4 * 2))
    steps.append(Step("bnb dequantize_4bit", 0.0, (n * k + 1) // 2 + 4 * blocks + elem * n * k))
    return steps


def forward(m: int, n: int, k: int, r: int, dropout: float, elem: int, double_quant: bool, grad: bool) -> list[Step]:
    """PEFT + bitsandbytes' forward: base layer, clone, dropout, lora_A, lora_B, scale, add."""
    if m == 1 and not grad:  # bitsandbytes' inference GEMV: NF4 read once, no deq(W) written
        blocks = math.ceil(n * k / BLOCKSIZE)
        base = dequantize(n, k, elem, double_quant)[:-1]
        base.append(Step("bnb gemv_4bit", 2.0 * n * k, (n * k + 1) // 2 + 4 * blocks + elem * (k + n)))
    else:
        base = [*dequantize(n, k, elem, double_quant), gemm("cuBLAS X·deq(W)ᵀ", m, n, k, elem)]
    steps = [*base, elementwise("clone", m * n, 1, 1, elem)]
    if dropout > 0:
        steps.append(Step("dropout (+ mask)", 0.0, elem * m * k * 2 + m * k))
    steps += [
        gemm("lora_A", m, r, k, elem),
        gemm("lora_B", m, n, r, elem),
        elementwise("× scaling", m * n, 1, 1, elem),
        elementwise("result + lora", m * n, 2, 1, elem),
    ]
    return steps


def backward(m: int, n: int, k: int, r: int, dropout: float, elem: int, double_quant: bool) -> list[Step]:
    """Autograd through PEFT + bitsandbytes' layer: every gradient (dX, dA, dB)."""
    steps = [
        elementwise("grad × scaling", m * n, 1, 1, elem),
        gemm("dH = g·B", m, r, n, elem),
        gemm("dB = gᵀ·H", n, r, m, elem),
        gemm("d drop(X) = dH·A", m, k, r, elem),
        gemm("dA = dHᵀ·drop(X)", r, k, m, elem),
    ]
    if dropout > 0:
        steps.append(Step("dropout backward (mask)", 0.0, elem * m * k * 2 + m * k))
    steps += [*dequantize(n, k, elem, double_quant), gemm("cuBLAS dY·deq(W)", m, k, n, elem)]
    steps.append(elementwise("dX = base + lora", m * k, 2, 1, elem))
    return steps


def layer_for(case: OpCase) -> Layer | None:
    """The baseline for ``case`` (None: not a QLoRA layer op, or not over an NF4 weight)."""
    if case.op not in OPS or case.base not in ("nf4", "nf4dq"):
        return None
    elem, dq = element_size(case.dtype), case.base == "nf4dq"
    if case.op == "qlora_backward":
        steps = backward(case.M, case.N, case.K, case.r, case.dropout, elem, dq)
    else:
        steps = forward(case.M, case.N, case.K, case.r, case.dropout, elem, dq, grad=case.op != "qlora_decode")
    return Layer(tuple(steps))
