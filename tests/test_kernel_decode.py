"""Tests of the one-launch small-M LoRA forward (peft_fast/kernels/lora_decode.py, candidate ``decode_fused``).

Forced through ``PEFT_FAST_FORCE`` as a user would force it, and compared with the torch
reference, the library reference and float64; H must equal ``_lora_down``'s H (the backward
regenerates its dropout mask), the counters must be left zero, and every output written.
"""

from __future__ import annotations

import math

import pytest
import torch

from peft_fast.kernels import common, lora_decode, plans
from peft_fast.kernels import lora_linear as kernels
from peft_fast.kernels.lora_decode import decode_applies, lora_decode_forward, lora_decode_reference
from peft_fast.kernels.lora_linear import dropout_mask, lora_linear_forward, lora_linear_reference_forward
from peft_fast.nf4 import dequantize_nf4, quantize_nf4

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SEED = 4321
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _force_decode(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_FORCE", f"lora_forward={plans.DECODE}")


def make_case(m, k, n, rank, dtype, bias=True, double_quant=True, blocksize=64, scale=0.7):
    """Operands of order-one base, bias and LoRA terms (a kernel that dropped one would fail)."""
    dev = KERNEL_DEVICE
    weight = torch.randn(n, k, device=dev) / math.sqrt(k)
    base = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    return {
        "x": torch.randn(m, k, device=dev).to(dtype),
        "base": base,
        "lora_a": (torch.randn(rank, k, device=dev) / math.sqrt(k)).to(dtype),
        "lora_b": (torch.randn(n, rank, device=dev) / math.sqrt(rank)).to(dtype),
        "bias": torch.randn(n, device=dev).to(dtype) if bias else None,
        "scale": scale,
    }


def run(case, p):
    return lora_linear_forward(
        case["x"], case["base"], case["lora_a"], case["lora_b"], case["bias"], case["scale"], p, SEED
    )


def float64(case, p):
    x, a, b = case["x"].double(), case["lora_a"].double(), case["lora_b"].double()
    keep = dropout_mask(SEED, x.shape[0], x.shape[1], p, x.device)
    h = torch.where(keep, x, 0.0) / (1.0 - p) @ a.t()
    y = x @ dequantize_nf4(case["base"], torch.float32).double().t() + case["scale"] * (h @ b.t())
    if case["bias"] is not None:
        y = y + case["bias"].double()
    return y, h, case["scale"] * (h @ b.t())


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def check(case, p):
    dtype = case["x"].dtype
    y, h = run(case, p)
    y64, h64, lora64 = float64(case, p)
    assert lora64.norm() > 0.1 * y64.norm()  # the LoRA term matters
    assert y.dtype == h.dtype == dtype
    assert y.shape == y64.shape and h.shape == h64.shape
    assert rel_err(y, y64) <= TOLERANCE[dtype], "y vs float64"
    assert rel_err(h, h64) <= TOLERANCE[dtype], "h vs float64"
    keep = dropout_mask(SEED, *case["x"].shape, p, case["x"].device) if p > 0 else None
    args = (case["x"], case["base"], case["lora_a"], case["lora_b"], case["bias"], case["scale"], keep, p)
    y_ref, h_ref = lora_decode_reference(*args)
    assert rel_err(y, y_ref) <= TOLERANCE[dtype], "y vs the decode reference"
    assert rel_err(h, h_ref) <= TOLERANCE[dtype], "h vs the decode reference"
    y_lib, _ = lora_linear_reference_forward(*args)
    assert rel_err(y, y_lib) <= 2 * TOLERANCE[dtype] + (2e-2 if dtype != torch.float32 else 0), "y vs the library ref"
    # The H every other candidate computes (and whose dropout mask the backward regenerates).
    h_down = kernels._lora_down(case["x"], case["lora_a"], p, SEED)
    assert rel_err(h, h_down) <= (1e-6 if dtype == torch.float32 else 1e-2)
    if dtype != torch.float32:
        # The same fp32 sum up to order, rounded once: at most one ulp apart. (The interpreter
        # truncates fp32 -> bf16 where the GPU rounds to nearest, and _lora_down's split-K sum is
        # rounded by torch, so bf16 often differs by that one ulp on CPU.)
        ulp = h_down.float().abs() * torch.finfo(dtype).eps
        assert ((h.float() - h_down.float()).abs() <= ulp + torch.finfo(dtype).tiny).all()
    return y, h


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m, rank", [(1, 16), (2, 4), (5, 16), (16, 4)])
def test_against_float64_and_references(m, rank, dtype, p):
    check(make_case(m, 192, 61, rank, dtype, bias=(m != 5)), p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 5])
def test_dropout_mask_is_lora_downs_bit_for_bit(m, dtype):
    """A = rows of the identity: H[i, j] = drop(X)[i, k_j]/(1-p) exactly, so H's zeros are the mask.

    64 ranks per call, three calls cover every column of K = 192: a mask drawn at other indices
    (another row stride, tile origin or half-word) would zero other entries.
    """
    k, p = 192, 0.4
    case = make_case(m, k, 70, 64, dtype)
    case["x"] = case["x"].masked_fill(case["x"] == 0, 1.0)  # no zero of X can pose as a dropped one
    keep = dropout_mask(SEED, m, k, p, case["x"].device)
    for first in range(0, k, 64):
        columns = torch.arange(first, first + 64, device=case["x"].device)
        case["lora_a"] = torch.nn.functional.one_hot(columns, k).to(dtype)
        _, h = run(case, p)
        assert torch.equal(h != 0, keep[:, columns])
        h_down = kernels._lora_down(case["x"], case["lora_a"], p, SEED)
        assert torch.equal(h_down != 0, keep[:, columns])
        if dtype == torch.float32:
            assert torch.equal(h, h_down)  # one product per sum: the same bits


@pytest.mark.parametrize("k, n, rank, bias, double_quant, blocksize", [
    (128, 37, 16, False, False, 64),
    (256, 130, 64, True, True, 128),   # two N tiles of 128 in the interpreter? N = 130 -> one of 256
    (320, 200, 5, True, True, 64),
])  # fmt: skip
@pytest.mark.parametrize("m", [1, 5])
def test_odd_shapes_ranks_and_layouts(m, k, n, rank, bias, double_quant, blocksize):
    check(make_case(m, k, n, rank, torch.float32, bias, double_quant, blocksize), 0.1)


def test_counters_left_zero_and_a_second_call_is_correct():
    case = make_case(3, 256, 150, 8, torch.float32)
    first_y, first_h = check(case, 0.2)
    counters = common._COUNTERS[common._stream_key(case["x"].device)]
    assert (counters == 0).all()
    second_y, second_h = run(case, 0.2)
    assert torch.equal(first_y, second_y) and torch.equal(first_h, second_h)  # deterministic
    other = make_case(1, 192, 90, 4, torch.float32)
    check(other, 0.0)
    assert (counters == 0).all()


def test_several_k_slices_are_reduced(monkeypatch):
    """The interpreter's device model splits K; assert the split really happens (and is summed)."""
    shapes = []
    original = lora_decode._empty
    monkeypatch.setattr(lora_decode, "_empty", lambda shape, *a: shapes.append(shape) or original(shape, *a))
    check(make_case(2, 512, 40, 8, torch.float32), 0.0)
    y_part = shapes[2]
    assert y_part[0] > 1, f"expected K split into several slices, got partials {y_part}"


def test_outputs_are_fully_written(monkeypatch):
    def poisoned_empty(shape, dtype, device):
        torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(lora_decode, "_empty", poisoned_empty)
    for m, p in ((1, 0.0), (7, 0.3), (16, 0.0)):
        y, h = check(make_case(m, 192, 70, 8, torch.float32), p)
        assert not y.isnan().any() and not h.isnan().any()


def test_nan_in_x_propagates():
    case = make_case(2, 128, 40, 4, torch.float32)
    case["x"][1, 5] = float("nan")
    y, h = run(case, 0.0)
    assert y[1].isnan().all() and h[1].isnan().all()
    assert not y[0].isnan().any() and not h[0].isnan().any()


def test_plan_puts_it_first_where_it_applies():
    bf16 = torch.bfloat16
    for m in (1, 16):
        assert plans.lora_forward_plan(m, 4096, 4096, "nf4_rows", bf16, 16, 0.0)[0] == plans.DECODE
    assert plans.DECODE not in plans.lora_forward_plan(17, 4096, 4096, "nf4_rows", bf16, 16, 0.0)
    assert plans.DECODE not in plans.lora_forward_plan(1, 4096, 4096, "nf4", bf16, 16, 0.0)
    assert plans.DECODE not in plans.lora_forward_plan(1, 4096, 4096, "nf4_rows", bf16, 128, 0.0)
    assert plans.SPLITK in plans.lora_forward_plan(1, 4096, 4096, "nf4_rows", bf16, 16, 0.0)


def test_refuses_what_it_does_not_handle():
    case = make_case(17, 128, 40, 4, torch.float32)
    assert not decode_applies(17, case["base"], 4)
    with pytest.raises(ValueError, match="one-launch decode kernel"):
        lora_decode_forward(case["x"], case["base"], case["lora_a"], case["lora_b"], None, 1.0, 0.0, SEED)
    dense = torch.randn(40, 128, device=KERNEL_DEVICE)
    assert not decode_applies(1, dense, 4)
    narrow = quantize_nf4(torch.randn(40, 128, device=KERNEL_DEVICE), blocksize=32)
    assert not decode_applies(1, narrow, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, p, bias", [(1, 0.25, True), (5, 0.0, False), (16, 0.25, False)])
def test_through_the_op_forward_and_backward(monkeypatch, m, p, bias, dtype):
    """``peft_fast.ops.lora_linear`` on the Triton backend: the decode kernel runs the forward and
    the backward, fed the H it returned, gives float64's gradients (with the replayed mask)."""
    from peft_fast.ops import lora_linear

    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    returned = []

    def spy(*args):
        y, h = lora_decode_forward(*args)
        returned.append(h)
        return y, h

    monkeypatch.setitem(kernels._FORWARD_IMPLEMENTATIONS, plans.DECODE, spy)
    case = make_case(m, 192, 70, 16, dtype, bias=bias)
    x, a, b = (case[name].requires_grad_() for name in ("x", "lora_a", "lora_b"))
    bias_t = case["bias"].requires_grad_() if bias else None
    y = lora_linear(x, case["base"], a, b, bias_t, scale=case["scale"], dropout_p=p, training=True, seed=SEED)
    assert len(returned) == 1, "the forward did not run the decode kernel"
    grad_y = torch.randn_like(y)
    (y.float() * grad_y.float()).sum().backward()

    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    x64, a64, b64 = leaves
    keep = dropout_mask(SEED, m, x.shape[1], p, x.device).double()
    h64 = (x64 * keep / (1.0 - p)) @ a64.t()
    y64 = x64 @ dequantize_nf4(case["base"], torch.float32).double().t() + case["scale"] * h64 @ b64.t()
    if bias:
        y64 = y64 + bias_t.detach().double()
    (y64 * grad_y.double()).sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(y.detach(), y64.detach()) <= tolerance
    for name, got, want in zip(("dX", "dA", "dB"), (x.grad, a.grad, b.grad), leaves, strict=True):
        assert rel_err(got, want.grad) <= tolerance, name
    # dB = s·dYᵀ·H is computed from the H the decode kernel returned.
    db_from_h = case["scale"] * grad_y.double().t() @ returned[0].double()
    assert rel_err(b.grad, db_from_h) <= tolerance
    if bias:
        assert rel_err(bias_t.grad, grad_y.double().sum(0)) <= tolerance
