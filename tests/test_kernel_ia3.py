"""Triton kernels of the (IA)³ linear (``peft_fast/kernels/ia3.py``) against float64.

Dense, NF4 and double-quantized NF4 bases; output scaling (attention k / v) and input scaling
(feed-forward); row counts 1, 17 and 64 and sizes no tile divides.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from peft_fast.kernels import ia3 as kernels
from peft_fast.kernels import plans
from peft_fast.kernels.ia3 import ia3_linear_backward, ia3_linear_forward, ia3_linear_reference_forward
from peft_fast.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
BASES = ["dense", "nf4", "nf4_dq"]


def make_case(m, k, n, dtype=torch.float32, base_kind="dense", scale_input=False, bias=True, blocksize=64):
    device = KERNEL_DEVICE
    weight = torch.randn(n, k, device=device) / k**0.5
    if base_kind == "dense":
        base = weight.to(dtype)
    else:
        base = quantize_nf4(weight, blocksize, double_quant=base_kind == "nf4_dq")
    return {
        "x": torch.randn(m, k, device=device).to(dtype),
        "base": base,
        # Far from 1, so that a kernel skipping the scale fails.
        "ia3_scale": 1.0 + torch.randn(k if scale_input else n, device=device),
        "bias": torch.randn(n, device=device).to(dtype) if bias else None,
        "scale_input": scale_input,
    }


def formula64(case, grad_y):
    """y and the gradients of sum(y·grad_y) w.r.t. x and l, in float64."""
    base = case["base"]
    w = dequantize_nf4(base, torch.float64) if isinstance(base, NF4Weight) else base.double()
    x = case["x"].double().requires_grad_()
    scale = case["ia3_scale"].double().requires_grad_()
    bias = case["bias"].double() if case["bias"] is not None else 0.0
    y = (x * scale) @ w.t() + bias if case["scale_input"] else (x @ w.t() + bias) * scale
    (y * grad_y.double()).sum().backward()
    return y.detach(), x.grad, scale.grad


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def run(case, grad_y, needs_dx=True, needs_dl=True):
    y, y0 = ia3_linear_forward(**case)
    saved = case["x"] if case["scale_input"] else y0
    dx, dl = ia3_linear_backward(
        grad_y, saved, case["base"], case["ia3_scale"], case["scale_input"], needs_dx, needs_dl
    )
    return y, y0, dx, dl


def check_against_formula(case):
    dtype = case["x"].dtype
    grad_y = torch.randn(case["x"].shape[0], case["base"].shape[0], device=KERNEL_DEVICE).to(dtype)
    y, _, dx, dl = run(case, grad_y)
    y64, dx64, dl64 = formula64(case, grad_y)
    tol = TOLERANCE[dtype]
    for name, actual, expected in (("y", y, y64), ("dx", dx, dx64), ("dl", dl, dl64)):
        assert actual.shape == expected.shape, name
        assert rel_err(actual, expected) <= tol, (name, rel_err(actual, expected))
    assert dl.dtype == torch.float32 and y.dtype == dx.dtype == dtype


@pytest.mark.parametrize(
    ("m", "base_kind", "scale_input"),
    list(itertools.product([1, 17, 64], BASES, [False, True])),
)
def test_fp32_shapes_bases_and_modes(m, base_kind, scale_input):
    check_against_formula(make_case(m, 96, 33, base_kind=base_kind, scale_input=scale_input, bias=m != 17))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_half_precision_over_nf4(dtype, scale_input):
    check_against_formula(make_case(33, 72, 40, dtype, "nf4_dq", scale_input))


def test_blocks_spanning_rows_and_wider_than_rows():
    # K = 72 is no multiple of the 64-wide NF4 block (blocks span rows); K = 48 < blocksize 128.
    check_against_formula(make_case(17, 72, 40, base_kind="nf4_dq", scale_input=True))
    check_against_formula(make_case(17, 48, 20, base_kind="nf4", blocksize=128))


def test_torch_reference_matches_kernels():
    for dtype, scale_input in ((torch.float32, False), (torch.bfloat16, True)):
        case = make_case(20, 72, 40, dtype, "nf4_dq", scale_input)
        y, _ = ia3_linear_forward(**case)
        expected, _ = ia3_linear_reference_forward(**case)
        assert rel_err(y, expected.double()) <= (1e-6 if dtype == torch.float32 else TOLERANCE[dtype])


def test_output_scaling_keeps_the_unscaled_output():
    case = make_case(17, 72, 40, base_kind="nf4")
    y, y0 = ia3_linear_forward(**case)
    ones = dict(case, ia3_scale=torch.ones_like(case["ia3_scale"]))
    assert torch.equal(y0, ia3_linear_forward(**ones)[0])
    torch.testing.assert_close(y, y0 * case["ia3_scale"], rtol=1e-6, atol=1e-6)


def test_dl_without_dx_and_requested_gradients_only():
    for scale_input in (False, True):
        case = make_case(17, 72, 40, scale_input=scale_input)
        grad_y = torch.randn(17, 40, device=KERNEL_DEVICE)
        _, _, dx, dl = run(case, grad_y)
        _, _, no_dx, only_dl = run(case, grad_y, needs_dx=False)
        _, _, only_dx, no_dl = run(case, grad_y, needs_dl=False)
        assert no_dx is None and no_dl is None
        torch.testing.assert_close(only_dl, dl, rtol=1e-6, atol=1e-6)
        assert torch.equal(only_dx, dx)


def test_outputs_are_fully_written(monkeypatch):
    def poisoned_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned_empty)
    for m, scale_input in ((3, False), (40, True), (70, False)):
        case = make_case(m, 72, 40, base_kind="nf4_dq", scale_input=scale_input)
        for t in run(case, torch.randn(m, 40, device=KERNEL_DEVICE)):
            assert not t.isnan().any()


def test_empty_batch():
    case = make_case(0, 72, 40, scale_input=True)
    y, _, dx, dl = run(case, torch.empty(0, 40, device=KERNEL_DEVICE))
    assert y.shape == (0, 40) and dx.shape == (0, 72)
    assert torch.equal(dl, torch.zeros(72, device=KERNEL_DEVICE))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"ia3_scale": torch.ones(72)}, ValueError, r"N \(output scaling\) = 40"),
        ({"ia3_scale": torch.ones(40, dtype=torch.float16)}, ValueError, "float32 vector"),
        ({"x": torch.randn(4, 71)}, ValueError, "K=71"),
        ({"bias": torch.randn(40, dtype=torch.float64)}, TypeError, "bias must have the dtype"),
        ({"base": "weight"}, TypeError, "base must be a torch.Tensor or an NF4Weight"),
    ],
    ids=["scale_length", "scale_dtype", "x_features", "bias_dtype", "base_type"],
)
def test_bad_inputs_raise_clear_errors(change, error, message):
    case = make_case(4, 72, 40)
    case.update({k: v.to(KERNEL_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=message):
        ia3_linear_forward(**case)


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_large_m_dequantizes_once_then_runs_dense(monkeypatch, scale_input):
    """Blocks spanning rows: the (IA)3 GEMMs stream deq(W) from a scratch buffer (dX from the dX switch points on)."""
    calls = []
    original = kernels.dequantize_nf4_triton
    monkeypatch.setattr(kernels, "dequantize_nf4_triton", lambda *a: calls.append(a) or original(*a))
    monkeypatch.setattr(plans, "DX_LIBRARY_MIN_M", 32)
    monkeypatch.setattr(plans, "IA3_DX_DEQUANT_MIN_M", 32)
    check_against_formula(make_case(33, 72, 40, torch.bfloat16, "nf4_dq", scale_input))
    # Forward and backward (output scaling's backward leads with the library path, which dequantizes too).
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("base_kind", ["nf4", "nf4_dq"])
@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("m", [1, 17, 40])
def test_row_streaming_nf4_forward(monkeypatch, m, scale_input, base_kind, dtype):
    """K a multiple of the block: the forward streams W rows (nf4_gemm._ia3_rows_fwd_kernel)."""
    launched = []
    kernel = kernels._ia3_rows_fwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(grid) or kernel[grid](*a, **kw)

    monkeypatch.setattr(kernels, "_ia3_rows_fwd_kernel", Recorder())
    monkeypatch.setenv("PEFT_FAST_FORCE", f"ia3_forward={plans.ROWS}")  # not the plan's head over NF4 any more
    case = make_case(m, 128, 45, dtype, base_kind, scale_input, bias=m != 17)
    check_against_formula(case)
    assert len(launched) == 1
    y, y0 = ia3_linear_forward(**case)
    fused_y, fused_y0 = kernels._fwd_fused(**case)
    # The same roundings as the general kernel: only the fp32 summation order differs.
    assert rel_err(y, fused_y.double()) <= (1e-6 if dtype == torch.float32 else 8e-3)
    if not scale_input:
        assert rel_err(y0, fused_y0.double()) <= (1e-6 if dtype == torch.float32 else 8e-3)
