"""Tests of the fused LoRA linear kernels (peft_fast/kernels/lora_linear.py).

Kernels run under the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1), or on the
GPU when there is one. Every result is compared with a float64 evaluation of the formula
``Y = X·Wᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ`` and of its gradients, by relative Frobenius error.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from peft_fast.kernels import lora_linear as kernels
from peft_fast.kernels import plans
from peft_fast.kernels.dropout import philox4x32
from peft_fast.kernels.lora_linear import (
    dropout_mask,
    lora_linear_backward,
    lora_linear_forward,
    lora_linear_reference_forward,
)
from peft_fast.kernels.nf4_gemm import base_kind as base_kind_of
from peft_fast.nf4 import dequantize_nf4, quantize_nf4

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = list(TOLERANCE)
BASES = ["dense", "nf4", "nf4_dq"]
SEED = 1234
# The GPU when there is one, else CPU tensors under the interpreter (as in conftest.py).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- helpers ----------------------------------------------------------------------------------


def make_case(m, k, n, rank, dtype=torch.float32, base_kind="dense", bias=True, blocksize=64, scale=0.7):
    """Random operands on the kernel device, plus W in float64 (what the kernels multiply by).

    Scales are chosen so the base, bias and LoRA terms are all of order one: a comparison that
    ignored any of them would fail.
    """
    dev = KERNEL_DEVICE
    weight = torch.randn(n, k, device=dev) / math.sqrt(k)
    if base_kind == "dense":
        base = weight.to(dtype)
        w64 = base.double()
    else:
        base = quantize_nf4(weight, blocksize=blocksize, double_quant=base_kind == "nf4_dq")
        w64 = dequantize_nf4(base, torch.float32).double()
    return {
        "x": torch.randn(m, k, device=dev).to(dtype),
        "base": base,
        "lora_a": (torch.randn(rank, k, device=dev) / math.sqrt(k)).to(dtype),
        "lora_b": (torch.randn(n, rank, device=dev) / math.sqrt(rank)).to(dtype),
        "bias": torch.randn(n, device=dev).to(dtype) if bias else None,
        "scale": scale,
        "w64": w64,
    }


def forward(case, p=0.0, seed=SEED):
    return lora_linear_forward(
        case["x"], case["base"], case["lora_a"], case["lora_b"], case["bias"], case["scale"], p, seed
    )


def backward(case, grad_y, h, p=0.0, seed=SEED, needs=(True, True, True)):
    return lora_linear_backward(
        grad_y, case["x"], h, case["base"], case["lora_a"], case["lora_b"], case["scale"], p, seed, *needs
    )


def formula64(case, grad_y, p=0.0, seed=SEED):
    """y, h, the LoRA term and (dx, da, db), all in float64, with the kernels' dropout mask."""
    x, a, b = case["x"].double(), case["lora_a"].double(), case["lora_b"].double()
    s = case["scale"]
    keep = dropout_mask(seed, x.shape[0], x.shape[1], p, x.device)

    def drop(t):
        return torch.where(keep, t, 0.0) / (1.0 - p)

    h = drop(x) @ a.t()
    lora = s * (h @ b.t())
    y = x @ case["w64"].t() + lora
    if case["bias"] is not None:
        y = y + case["bias"].double()
    dy = grad_y.double()
    dh = s * (dy @ b)
    grads = (dy @ case["w64"] + drop(dh @ a), dh.t() @ drop(x), s * (dy.t() @ h))
    return y, h, lora, grads


def rel_err(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def assert_close(actual, expected, dtype, what):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]}"


def check_against_formula(case, p=0.0, seed=SEED):
    dtype = case["x"].dtype
    m, n = case["x"].shape[0], case["lora_b"].shape[0]
    y, h = forward(case, p, seed)
    grad_y = torch.randn(m, n, device=KERNEL_DEVICE).to(dtype)
    dx, da, db = backward(case, grad_y, h, p, seed)
    y64, h64, lora64, (dx64, da64, db64) = formula64(case, grad_y, p, seed)
    # The LoRA path must matter, or a kernel that dropped it would pass.
    assert lora64.norm() > 0.1 * y64.norm()
    for actual, expected, what in ((y, y64, "y"), (h, h64, "h"), (dx, dx64, "dx"), (da, da64, "da"), (db, db64, "db")):
        assert_close(actual, expected, dtype, what)


# -- forward and backward against float64 -----------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [3, 17], ids=["split_k", "tiled"])
def test_dtype_and_base_matrix(m, dtype, base_kind, p):
    case = make_case(m, 72, 40, 8, dtype, base_kind, bias=True)
    check_against_formula(case, p)


# (K, N, blocksize): K not a multiple of the 64-wide K tiles nor of the NF4 block (blocks then
# span rows), K a multiple of a block narrower than the row loader's tiles (the general loader
# with one scale per tile row), and a block wider than a row.
SHAPES = [(72, 40, 64), (96, 33, 32), (64, 20, 128)]


@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("k,n,blocksize", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_fp32_shapes(m, k, n, blocksize, base_kind):
    case = make_case(m, k, n, 16, torch.float32, base_kind, bias=m != 3, blocksize=blocksize)
    check_against_formula(case)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 8, 16, 80])  # 80: a full 64-wide rank chunk and a partial one
def test_fp32_ranks(rank, bias, p):
    case = make_case(64, 96, 33, rank, torch.float32, "nf4_dq", bias=bias, blocksize=32)
    check_against_formula(case, p)


def test_many_tiles_in_both_directions():
    # More row tiles than GROUP_M (8 of the GPU's 128 rows) and several column tiles: the swizzled
    # tile order must still cover every tile exactly once.
    case = make_case(1100, 48, 300, 4, torch.float32, "nf4_dq")
    check_against_formula(case, p=0.1)


H200 = lambda device: 2 * 132  # two programs per SM, as _programs_wanted asks of an H200


@pytest.mark.parametrize("m,splits", [(1100, 2), (2100, 3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_da_split_over_m_matches_formula(monkeypatch, dtype, m, splits):
    # dA's reduction over M split in ranges (fp32 partials, summed in order), the last one ragged;
    # dropout rows must keep their global index across splits. The device model is an H200's.
    monkeypatch.setattr(kernels, "_programs_wanted", H200)
    case = make_case(m, 40, 24, 8, dtype, "nf4_dq")
    dh = torch.randn(m, 8, device=KERNEL_DEVICE).to(dtype)
    p = 0.2
    keep = dropout_mask(SEED, m, 40, p, KERNEL_DEVICE)
    expected = dh.double().t() @ (torch.where(keep, case["x"].double(), 0.0) / (1.0 - p))
    partials = []
    original = kernels._empty
    monkeypatch.setattr(kernels, "_empty", lambda shape, *a: partials.append(shape) or original(shape, *a))
    assert_close(kernels._lora_da(dh, case["x"], p, SEED), expected, dtype, "da")
    assert (splits, 8, 40) in partials


def test_da_split_policy_fills_an_h100():
    """At Llama shapes dA has few tiles (r x K): the reduction over M is split to fill the SMs."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(kernels, "_programs_wanted", H200)
        device = torch.device("cpu")
        splits = kernels._da_splits(16384, 4096, 16, device)
        tiles = 4096 // 64
        assert splits > 1 and tiles * splits >= 2 * 132
        assert kernels._da_splits(256, 4096, 16, device) == 1  # too few rows to be worth splitting
        assert kernels._da_splits(16384, 4096 * 8, 16, device) == 1  # enough column tiles already


def test_split_k_policy_balances_an_h200():
    """Decode: the split count leaves no SM with twice the weight stream of another."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(kernels, "_programs_wanted", H200)
        device = torch.device("cpu")
        for m, n, k in ((1, 4096, 4096), (16, 4096, 4096), (1, 14336, 4096), (1, 4096, 14336)):
            k_slice = kernels._split_k_slice(m, n, k, device)
            assert k_slice % 64 == 0
            programs = triton.cdiv(n, 128) * triton.cdiv(k, k_slice)
            steps_per_program = k_slice // 64
            busiest = triton.cdiv(programs, 132) * steps_per_program
            ideal = triton.cdiv(n, 128) * triton.cdiv(k, 64) / 132
            assert busiest <= 1.25 * ideal, (m, n, k, k_slice, busiest, ideal)
        assert kernels._split_k_slice(1, 4096, 4096, device) == 1024  # 4 splits: 128 programs


def test_split_policies_split_small_shapes_on_a_small_device_model():
    """The CPU's device model (8 programs) splits a decode GEMV and H over K with the GPU's constants."""
    device = torch.device("cpu")
    assert kernels._programs_wanted(device) == 8
    assert triton.cdiv(1024, kernels._split_k_slice(1, 40, 1024, device)) > 1
    calls = []
    original = kernels._empty
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(kernels, "_empty", lambda shape, *a: calls.append(shape) or original(shape, *a))
        patched.setenv("PEFT_FAST_FORCE", f"lora_forward={plans.SPLITK}")  # the split-K GEMV, whatever leads
        case = make_case(3, 512, 40, 8, torch.float32, "nf4")
        check_against_formula(case, p=0.3)
    assert any(len(shape) == 3 and shape[1:] == (3, 8) for shape in calls)  # H's fp32 partials per K slice
    assert any(len(shape) == 3 and shape[1:] == (3, 40) for shape in calls)  # the GEMV's partials


def test_torch_reference_matches_kernels():
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(20, 72, 40, 8, dtype, "nf4_dq")
        args = (case["x"], case["base"], case["lora_a"], case["lora_b"], case["bias"], case["scale"])
        y, _ = lora_linear_forward(*args, 0.3, SEED)
        keep = dropout_mask(SEED, *case["x"].shape, 0.3, case["x"].device)
        expected, _ = lora_linear_reference_forward(*args, keep, 0.3)
        assert rel_err(y, expected.double()) <= TOLERANCE[dtype]


# -- the small-M (split-K) path ---------------------------------------------------------------


@pytest.mark.parametrize("base_kind", BASES)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_small_m_path_matches_tiled_path(m, base_kind):
    case = make_case(m, 72, 40, 8, torch.float32, base_kind)
    h = kernels._lora_down(case["x"], case["lora_a"], 0.0, SEED)
    args = (case["x"], case["base"], h, case["lora_b"], case["bias"], case["scale"])
    small = kernels._y_splitk(*args)
    tiled = kernels._y_fused(*args)
    assert rel_err(small, tiled.double()) <= 1e-6
    # A fixed-order reduction: the same inputs give the same bits.
    assert torch.equal(small, kernels._y_splitk(*args))


def test_forward_follows_the_plan(monkeypatch):
    calls = []
    for name, run in list(kernels._FORWARD_IMPLEMENTATIONS.items()):
        spy = lambda *a, _name=name, _run=run: calls.append(_name) or _run(*a)
        monkeypatch.setitem(kernels._FORWARD_IMPLEMENTATIONS, name, spy)
    # Every NF4 regime at interpreter sizes: one-launch decode (row layout) and split-K (general
    # layout), literal library, rows, library accumulating into C.
    monkeypatch.setattr(plans, "ROWS_MIN_M", 32)
    monkeypatch.setattr(plans, "LIBRARY_ACCUMULATE_MIN_M", 64)
    expected = []
    for m in (kernels.SMALL_M_MAX, kernels.SMALL_M_MAX + 1, 32, 64):
        for k, base_kind in ((128, "nf4"), (72, "nf4"), (32, "dense")):  # the row loader's layout, blocks span rows
            case = make_case(m, k, 16, 4, base_kind=base_kind)
            forward(case)
            kind = base_kind_of(case["base"])
            expected.append(plans.lora_forward_plan(m, 16, k, kind, torch.float32, 4, 0.0)[0])
    assert calls == expected  # each launch is its plan's head (off the GPU nothing is timed)
    assert set(expected) == {plans.DECODE, plans.SPLITK, plans.LIBRARY_ADDMM, plans.ROWS, plans.LIBRARY, plans.FUSED}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base_kind", ["nf4", "nf4_dq"])
def test_general_layout_dequantizes_once_then_runs_dense(monkeypatch, base_kind, dtype):
    """Blocks spanning rows: the forward streams deq(W) from a scratch buffer, dX from DX_LIBRARY_MIN_M on."""
    case = make_case(40, 96, 33, 8, dtype, base_kind, bias=True, blocksize=32)
    dequantized = []
    original = kernels.dequantize_nf4_triton
    monkeypatch.setattr(kernels, "dequantize_nf4_triton", lambda *a: dequantized.append(a) or original(*a))
    monkeypatch.setattr(plans, "DX_LIBRARY_MIN_M", 32)
    check_against_formula(case, 0.3)
    assert len(dequantized) == 2  # forward and dX, nowhere else
    monkeypatch.setattr(plans, "DX_LIBRARY_MIN_M", 128)  # above M's bucket (64)
    check_against_formula(case, 0.3)
    assert len(dequantized) == 3  # the forward only


@pytest.mark.parametrize("base_kind", ["nf4", "nf4_dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 16, 17, 40])
def test_row_streaming_nf4_kernels(m, dtype, base_kind):
    """K a multiple of the block: the forward streams W rows (nf4_gemm.py) in both M regimes."""
    case = make_case(m, 128, 45, 8, dtype, base_kind, bias=True, blocksize=64)
    assert base_kind_of(case["base"]) == "nf4_rows"
    check_against_formula(case, 0.3)


def test_row_streaming_kernels_are_the_ones_launched(monkeypatch):
    launched = []
    for name in (
        "_nf4_rows_fwd_kernel",
        "_nf4_rows_splitk_kernel",
        "_lora_linear_fwd_kernel",
        "_splitk_partial_kernel",
    ):
        kernel = getattr(kernels, name)

        class Recorder:
            def __getitem__(self, grid, _name=name, _kernel=kernel):
                return lambda *a, **kw: launched.append(_name) or _kernel[grid](*a, **kw)

        monkeypatch.setattr(kernels, name, Recorder())
    # Forced (the static order leads with the library path over NF4): each candidate's own kernel runs.
    monkeypatch.setenv("PEFT_FAST_FORCE", f"lora_forward={plans.SPLITK}")
    forward(make_case(3, 128, 45, 8, torch.float32, "nf4"))
    monkeypatch.setenv("PEFT_FAST_FORCE", f"lora_forward={plans.ROWS}")
    forward(make_case(17, 128, 45, 8, torch.float32, "nf4_dq"))
    monkeypatch.setenv("PEFT_FAST_FORCE", f"lora_forward={plans.DEQUANT_FUSED}")
    forward(make_case(17, 72, 45, 8, torch.float32, "nf4"))  # blocks span rows: dequantized, the general kernel
    assert launched == ["_nf4_rows_splitk_kernel", "_nf4_rows_fwd_kernel", "_lora_linear_fwd_kernel"]


# -- dropout ----------------------------------------------------------------------------------


def test_zero_dropout_is_no_dropout():
    case = make_case(17, 72, 40, 8, torch.float32, "nf4")
    grad_y = torch.randn(17, 40, device=KERNEL_DEVICE)
    y, h = forward(case, 0.0, seed=1)
    grads = backward(case, grad_y, h, 0.0, seed=1)
    y2, h2 = forward(case, 0.0, seed=2)
    grads2 = backward(case, grad_y, h2, 0.0, seed=2)
    # A tiny p keeps every element (checked) and scales by fp32(1/(1-p)) == 1: the dropout code
    # path must then give the very same bits as the no-dropout path.
    tiny = 1e-9
    assert dropout_mask(3, 17, 72, tiny, KERNEL_DEVICE).all()
    y3, h3 = forward(case, tiny, seed=3)
    grads3 = backward(case, grad_y, h3, tiny, seed=3)
    for other in ((y2, h2, *grads2), (y3, h3, *grads3)):
        for actual, expected in zip(other, (y, h, *grads), strict=True):
            assert torch.equal(actual, expected)


@pytest.mark.parametrize("seed", [7, 2**40 + 3])
def test_kernels_use_exactly_dropout_mask(seed):
    """Identity operands make each kernel output its dropout mask, scaled by 1/(1-p)."""
    m, k, p = 40, 64, 0.3
    dev = KERNEL_DEVICE
    keep = dropout_mask(seed, m, k, p, dev)
    expected = keep.float() * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    x = torch.ones(m, k, device=dev)
    eye = torch.eye(k, device=dev)
    zero_w = torch.zeros(k, k, device=dev)
    # H = drop(1)·I ; with dY = I[:m] (B = I, s = 1, so dH = dY): dA[:m] = drop(1).
    _, h = lora_linear_forward(x, zero_w, eye, eye, None, 1.0, p, seed)
    assert torch.equal(h, expected)
    _, da, _ = lora_linear_backward(eye[:m].contiguous(), x, h, zero_w, eye, eye, 1.0, p, seed, False, True, False)
    assert torch.equal(da[:m], expected)
    assert torch.equal(da[m:], torch.zeros_like(da[m:]))
    # dH·A = 1 when only dY[:, 0] and A[0, :] are non-zero: dX = mask/(1-p).
    a = torch.zeros(k, k, device=dev)
    a[0] = 1.0
    grad_y = torch.zeros(m, k, device=dev)
    grad_y[:, 0] = 1.0
    dx, _, _ = lora_linear_backward(grad_y, x, h, zero_w, a, eye, 1.0, p, seed, True, False, False)
    assert torch.equal(dx, expected)


@triton.jit
def _randint4x_kernel(out_ptr, seed, first_offset, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c0, c1, c2, c3 = tl.randint4x(seed, first_offset + offs.to(tl.int64))
    for i, word in enumerate((c0, c1, c2, c3)):
        tl.store(out_ptr + i * n + offs, word.to(tl.int64) & 0xFFFFFFFF, mask=offs < n)


@pytest.mark.parametrize("seed,first_offset", [(0, 0), (99, 2**32 - 100), (2**35 + 1, 5)])
def test_torch_philox_is_tl_randint4x(seed, first_offset):
    # Includes counters across 2**32, where the high word of the Philox counter starts to count.
    n = 300
    out = torch.empty(4, n, dtype=torch.int64, device=KERNEL_DEVICE)
    _randint4x_kernel[(triton.cdiv(n, 128),)](out, seed, first_offset, n, BLOCK=128)
    counters = torch.arange(first_offset, first_offset + n, device=KERNEL_DEVICE)
    assert torch.equal(torch.stack(philox4x32(seed, counters)), out)


def test_dropout_mask_statistics_and_seeds():
    p, m, k = 0.3, 1000, 1000
    keep = dropout_mask(5, m, k, p, KERNEL_DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (m, k)
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Rows and columns are not degenerate: every row and column keeps about 1-p.
    assert keep.float().mean(1).sub(1 - p).abs().max() < 0.1
    assert keep.float().mean(0).sub(1 - p).abs().max() < 0.1
    assert torch.equal(keep, dropout_mask(5, m, k, p, KERNEL_DEVICE))
    disagree = (keep != dropout_mask(6, m, k, p, KERNEL_DEVICE)).float().mean().item()
    assert abs(disagree - 2 * p * (1 - p)) < 0.01
    assert dropout_mask(5, 3, 4, 0.0, KERNEL_DEVICE).all()


# -- the library forward: C = b + s·H·Bᵀ first, then cuBLAS adds X·deq(W)ᵀ into it ----------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("m", "n", "rank", "bias", "p"),
    [
        (37, 72, 8, True, 0.3),
        (5, 72, 80, False, 0.0),  # rank 80: two rank chunks of H, H through memory
        (130, 72, 80, True, 0.3),
        (5, 520, 8, True, 0.3),  # several N tiles (not a tile multiple) for one row block
        (37, 520, 80, True, 0.0),
    ],
)
def test_library_forward_writes_c_then_accumulates(monkeypatch, m, n, rank, bias, p, dtype):
    def poisoned_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned_empty)
    monkeypatch.setenv("PEFT_FAST_FORCE", f"lora_forward={plans.LIBRARY}")
    case = make_case(m, 128, n, rank, dtype, "nf4_dq", bias=bias)
    grad_y = torch.randn(m, n, device=KERNEL_DEVICE)
    y, h = forward(case, p)
    y64, h64, _, _ = formula64(case, grad_y, p)
    assert rel_err(y, y64) <= TOLERANCE[dtype]
    assert rel_err(h, h64) <= TOLERANCE[dtype]
    # H is what every other candidate computes (the same dropout mask; summation order may differ).
    assert rel_err(h, kernels._lora_down(case["x"], case["lora_a"], p, SEED).double()) <= TOLERANCE[dtype] / 10


# -- every output element is written; NaN and Inf propagate -----------------------------------


def test_outputs_are_fully_written(monkeypatch):
    def poisoned_empty(shape, dtype, device):
        # Also leave NaNs in the allocator's free memory for the next real allocation.
        torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned_empty)
    for m, base_kind, p in ((3, "nf4_dq", 0.0), (17, "nf4", 0.3), (64, "dense", 0.3)):
        case = make_case(m, 72, 40, 8, torch.float32, base_kind)
        y, h = forward(case, p)
        grads = backward(case, torch.randn(m, 40, device=KERNEL_DEVICE), h, p)
        for t in (y, h, *grads):
            assert not t.isnan().any()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, under the interpreter
@pytest.mark.parametrize("base_kind", ["dense", "nf4_dq"])
@pytest.mark.parametrize("m", [3, 17])
def test_nan_and_inf_in_x_propagate(m, base_kind):
    case = make_case(m, 72, 40, 8, torch.float32, base_kind)
    case["x"][0, 5] = float("nan")
    case["x"][2, 70] = float("inf")
    grad_y = torch.randn(m, 40, device=KERNEL_DEVICE)
    y, h = forward(case)
    y64, h64, _, _ = formula64(case, grad_y)
    for actual, expected in ((y, y64), (h, h64)):
        assert torch.equal(actual.isnan(), expected.isnan())
        assert torch.equal(actual.isinf(), expected.isinf())
        assert torch.equal(actual.isposinf(), expected.isposinf())
        finite = expected.isfinite()
        assert finite[1].all() and not finite[0].any()
        assert rel_err(actual[finite], expected[finite]) <= 1e-5


# -- layouts, empty batches, flags ------------------------------------------------------------


def test_non_contiguous_inputs_are_handled():
    case = make_case(17, 72, 40, 8, torch.float32, "dense")
    y, h = forward(case)
    strided = dict(case)
    strided["x"] = case["x"].t().contiguous().t()
    strided["base"] = case["base"].t().contiguous().t()
    strided["lora_a"] = case["lora_a"].t().contiguous().t()
    strided["lora_b"] = case["lora_b"].t().contiguous().t()
    assert not strided["x"].is_contiguous()
    y2, h2 = forward(strided)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    grad_y = torch.randn(17, 40, device=KERNEL_DEVICE)
    grads = backward(case, grad_y, h)
    grads2 = backward(strided, grad_y.t().contiguous().t(), h)
    for a, b in zip(grads, grads2, strict=True):
        assert torch.equal(a, b)


def test_empty_batch():
    case = make_case(0, 72, 40, 8, torch.float32, "nf4")
    y, h = forward(case)
    assert y.shape == (0, 40) and h.shape == (0, 8)
    dx, da, db = backward(case, torch.empty(0, 40, device=KERNEL_DEVICE), h)
    assert dx.shape == (0, 72)
    assert torch.equal(da, torch.zeros(8, 72, device=KERNEL_DEVICE))
    assert torch.equal(db, torch.zeros(40, 8, device=KERNEL_DEVICE))


def test_only_requested_gradients_are_computed():
    case = make_case(17, 72, 40, 8)
    _, h = forward(case, 0.2)
    grad_y = torch.randn(17, 40, device=KERNEL_DEVICE)
    full = backward(case, grad_y, h, 0.2)
    for needs in ((True, False, False), (False, True, False), (False, False, True), (False, False, False)):
        partial = backward(case, grad_y, h, 0.2, needs=needs)
        for got, want, needed in zip(partial, full, needs, strict=True):
            assert (got is None) != needed
            if needed:
                assert torch.equal(got, want)


# -- bad inputs -------------------------------------------------------------------------------


def _with(**changes):
    def mutate(args):
        args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})

    return mutate


BAD_INPUTS = [
    ("x_1d", _with(x=lambda a: a["x"][0]), ValueError, "x must be 2-D"),
    ("x_int", _with(x=lambda a: a["x"].long()), TypeError, "x must be float32"),
    ("x_k", _with(x=lambda a: a["x"][:, :-1]), ValueError, "K=71"),
    ("a_k", _with(lora_a=lambda a: a["lora_a"][:, :-1]), ValueError, "lora_a"),
    ("b_rank", _with(lora_b=lambda a: a["lora_b"][:, :-1]), ValueError, "rank of lora_a"),
    ("b_rows", _with(lora_b=lambda a: a["lora_b"][:-1]), ValueError, "N=40 rows"),
    ("bias_len", _with(bias=lambda a: a["bias"][:-1]), ValueError, "bias must be 1-D with N=40"),
    ("bias_dtype", _with(bias=lambda a: a["bias"].double()), TypeError, "bias must have the dtype"),
    ("a_dtype", _with(lora_a=lambda a: a["lora_a"].half()), TypeError, "lora_a must have the dtype"),
    ("base_dtype", _with(base=lambda a: a["base"].half()), TypeError, "base weight must have the dtype"),
    ("base_type", _with(base="weight"), TypeError, "base must be a torch.Tensor or an NF4Weight"),
    ("p_one", _with(dropout_p=1.0), ValueError, "dropout_p"),
    ("p_negative", _with(dropout_p=-0.1), ValueError, "dropout_p"),
    ("seed_negative", _with(seed=-1), ValueError, "seed"),
    ("seed_float", _with(seed=1.5), TypeError, "seed"),
    ("device", _with(bias=lambda a: a["bias"].to("meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("mutate,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(mutate, error, message):
    case = make_case(4, 72, 40, 8)
    args = {k: case[k] for k in ("x", "base", "lora_a", "lora_b", "bias", "scale")}
    args.update(dropout_p=0.1, seed=SEED)
    mutate(args)
    with pytest.raises(error, match=message):
        lora_linear_forward(**args)


def test_bad_backward_inputs_raise_clear_errors():
    case = make_case(4, 72, 40, 8)
    y, h = forward(case)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        backward(case, torch.zeros(4, 41, device=KERNEL_DEVICE), h)
    with pytest.raises(TypeError, match="h must have the dtype"):
        backward(case, torch.zeros_like(y), h.double())
    with pytest.raises(ValueError, match="h must have shape"):
        backward(case, torch.zeros_like(y), h[:, :-1])


@pytest.mark.parametrize("poison", ["nan_grad_y", "inf_a"])
def test_zero_scale_keeps_a_nan_as_the_reference_does(poison):
    """scale = 0 with a NaN in dY (or an Inf in A): dA and dB are NaN, as in the torch reference and float64.

    (A library addmm with alpha = 0 skips the product and would give exact zeros.)
    """
    torch.manual_seed(0)
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    a, b = torch.randn(2, 32), torch.randn(8, 2)
    grad_y = torch.randn(4, 8)
    if poison == "nan_grad_y":
        grad_y[1, 3] = float("nan")
    else:
        a[0, 5] = float("inf")
    h = x @ a.t()
    got = lora_linear_backward(grad_y, x, h, w, a, b, 0.0, 0.0, SEED, True, True, True)
    want = kernels.lora_linear_reference_backward(grad_y, x, h, w, a, b, 0.0, None, 0.0, True, True, True)
    for name, g, r in zip(("dx", "da", "db"), got, want, strict=True):
        assert torch.equal(g.isnan(), r.isnan()), name
    assert got[2].isnan().any() or got[1].isnan().any()
