"""Fused RMSNorm (+ residual add): ``peft_fast/ops/rms_norm.py`` and ``peft_fast/kernels/rms_norm.py``.

Against Hugging Face's own modules (Llama, Mistral, Qwen3, Phi-3, Gemma, Gemma 2), forward and
backward, on both backends (the torch reference and the Triton kernels, under the interpreter
without a GPU); with the residual variant against HF's ``residual + hidden_states`` then the norm.
Then the edges: odd D and row counts, strided rows, dtype promotion, outputs written in full,
NaN / Inf staying in their row, deterministic dw, opcheck, torch.compile and autocast.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from peft_fast.kernels import rms_norm as kernels
from peft_fast.ops.rms_norm import _rms_norm_backward_op, _rms_norm_op, rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# name -> (HF module class, casting, offset, x's shape): Qwen3's is its q_norm's, over head_dim.
MODULES = {
    "llama": (LlamaRMSNorm, "llama", 0.0, (3, 7, 96)),
    "mistral": (MistralRMSNorm, "llama", 0.0, (3, 7, 96)),
    "qwen3": (Qwen3RMSNorm, "llama", 0.0, (2, 3, 4, 64)),
    "phi3": (Phi3RMSNorm, "llama", 0.0, (3, 7, 96)),
    "gemma": (GemmaRMSNorm, "gemma", 1.0, (3, 7, 96)),
    "gemma2": (Gemma2RMSNorm, "gemma", 1.0, (3, 7, 96)),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


class KeepFloat64(TorchFunctionMode):
    """HF's modules cast their input to fp32 even when it is fp64 (``.to(torch.float32)``,
    ``.float()``); inside this mode those casts leave an fp64 tensor alone, so the module's own
    formula runs in fp64 — as the op computes fp64 inputs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.float) and args[0].dtype == torch.float64:
            target = kwargs.get("dtype", args[1] if len(args) > 1 else None)
            if func is torch.Tensor.float or target == torch.float32:
                return args[0]
        return func(*args, **kwargs)


def make_module(name: str, d: int, weight_dtype: torch.dtype) -> torch.nn.Module:
    cls, casting, _, _ = MODULES[name]
    module = cls(d, eps=EPS).to(DEVICE)
    # Gemma's weight is a delta on 1; Llama's multiplies. Random either way, far from the init.
    init = 0.5 * torch.randn(d) + (0.0 if casting == "gemma" else 1.0)
    module.weight.data = init.to(device=DEVICE, dtype=weight_dtype)
    return module


def run(fn, x, residual, grad_y, grad_s, weight):
    """fn(x, residual) -> (y, s or None); gradients of Σ y·grad_y + s·grad_s w.r.t. x, residual, weight."""
    x = x.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    weight.grad = None
    y, s = fn(x, residual)
    outputs, grads = ((y,), (grad_y,)) if s is None else ((y, s), (grad_y, grad_s))
    torch.autograd.backward(outputs, grads)
    return {
        "y": y.detach(),
        "s": None if s is None else s.detach(),
        "dx": x.grad,
        "dres": None if residual is None else residual.grad,
        "dw": weight.grad.clone(),
    }


def hf_fn(module):
    def fn(x, residual):
        if residual is None:
            return module(x), None
        s = residual + x  # the decoder layer's add
        return module(s), s

    return fn


def op_fn(module, casting: str, offset: float):
    def fn(x, residual):
        out = rms_norm(x, module.weight, EPS, offset=offset, casting=casting, residual=residual)
        return (out, None) if residual is None else out

    return fn


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_matches(got: dict, want: dict, dtype: torch.dtype) -> None:
    """Same dtypes and shapes, and values within the tolerance of ``dtype``, the inputs' precision."""
    for key, expected in want.items():
        actual = got[key]
        if expected is None:
            assert actual is None, key
            continue
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
        if dtype == torch.bfloat16:
            assert rel_err(actual, expected) <= 1e-2, (key, rel_err(actual, expected))
            # Both backends round where HF's modules and autograd round: the bits agree, but for
            # the odd element a different summation order tips (a skipped rounding flips > 10%).
            flipped = float((actual != expected).float().mean())
            assert flipped <= 0.03 or actual.dtype != torch.bfloat16, (key, flipped)
        else:
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=key)


def make_inputs(shape, dtype, residual: bool, out_dtype=None):
    x = (2 * torch.randn(shape)).to(device=DEVICE, dtype=dtype)
    res = torch.randn(shape).to(device=DEVICE, dtype=dtype) if residual else None
    grad_y = torch.randn(shape).to(device=DEVICE, dtype=out_dtype or dtype)
    grad_s = torch.randn(shape).to(device=DEVICE, dtype=dtype) if residual else None
    return x, res, grad_y, grad_s


# -- against Hugging Face's modules ----------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("name", list(MODULES))
def test_matches_hf_module(name, dtype, residual, backend):
    _, casting, offset, shape = MODULES[name]
    module = make_module(name, shape[-1], dtype)
    x, res, grad_y, grad_s = make_inputs(shape, dtype, residual)
    with KeepFloat64():
        want = run(hf_fn(module), x, res, grad_y, grad_s, module.weight)
    got = run(op_fn(module, casting, offset), x, res, grad_y, grad_s, module.weight)
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_torch_forward_is_bit_identical_to_hf(dtype, monkeypatch):
    """The torch reference replays HF's ops one for one: same bits, not just close ones."""
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    for name, (_, casting, offset, shape) in MODULES.items():
        module = make_module(name, shape[-1], dtype)
        x, res, _, _ = make_inputs(shape, dtype, True)
        with torch.no_grad():
            assert torch.equal(rms_norm(x, module.weight, EPS, offset=offset, casting=casting), module(x)), name
            y, s = rms_norm(x, module.weight, EPS, offset=offset, casting=casting, residual=res)
            assert torch.equal(s, res + x) and torch.equal(y, module(res + x)), name


def test_float16(backend):
    for name in ("llama", "gemma"):
        _, casting, offset, shape = MODULES[name]
        module = make_module(name, shape[-1], torch.float16)
        x, res, grad_y, grad_s = make_inputs(shape, torch.float16, True)
        want = run(hf_fn(module), x, res, grad_y, grad_s, module.weight)
        got = run(op_fn(module, casting, offset), x, res, grad_y, grad_s, module.weight)
        for key in want:
            assert got[key].dtype == torch.float16 and rel_err(got[key], want[key]) <= 1e-3, key


def test_hf_rounds_float64_through_float32():
    """Why KeepFloat64 exists: HF's fp64 output carries fp32 rounding; the op's does not."""
    module = make_module("llama", 96, torch.float64)
    x = torch.randn(5, 96, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        ours = rms_norm(x, module.weight, EPS)
        with KeepFloat64():
            assert rel_err(ours, module(x)) < 1e-14
        assert 1e-12 < rel_err(ours, module(x)) < 1e-6


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_float32_weight_over_bfloat16_promotes(residual, backend):
    """LlamaRMSNorm with an fp32 weight over bf16 x returns fp32 (``weight * n`` promotes);
    an fp32 residual stream plus a bf16 x is an fp32 s."""
    module = make_module("llama", 96, torch.float32)
    x, res, _, grad_s = make_inputs((4, 96), torch.bfloat16, residual)
    if residual:
        res, grad_s = res.float(), grad_s.float()
    grad_y = torch.randn(4, 96, device=DEVICE)
    want = run(hf_fn(module), x, res, grad_y, grad_s, module.weight)
    got = run(op_fn(module, "llama", 0.0), x, res, grad_y, grad_s, module.weight)
    assert got["y"].dtype == torch.float32 and got["dx"].dtype == torch.bfloat16
    assert_matches(got, want, torch.bfloat16)
    if not residual:  # n is rounded to bf16 before the fp32 multiply: y is not the fp32 norm
        assert rel_err(got["y"], rms_norm(x.float(), module.weight, EPS)) > 1e-4


def test_gemma_offset_is_general(backend):
    """offset is any constant added to w in fp32 (gemma casting), against the formula in fp64."""
    x, res, grad_y, grad_s = make_inputs((6, 40), torch.float32, True)
    weight = torch.randn(40, device=DEVICE, requires_grad=True)
    got = run(lambda x, r: rms_norm(x, weight, EPS, offset=0.25, casting="gemma", residual=r),
              x, res, grad_y, grad_s, weight)  # fmt: skip

    def formula(x, r):
        s = r.double() + x.double()
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * (0.25 + weight.double())
        return y.float(), s.float()

    want = run(formula, x, res, grad_y, grad_s, weight)
    assert_matches(got, want, torch.float32)


# -- shapes, strides, edges -------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("d", [1, 7, 96, 257])
def test_odd_shapes(d, rows, monkeypatch):
    """Kernels vs HF at fp32 for D and row counts no tile divides; one SM's worth of backward
    programs, so each loops over several row blocks and the last range is ragged."""
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    for name, residual in (("llama", False), ("gemma", True)):
        _, casting, offset, _ = MODULES[name]
        module = make_module(name, d, torch.float32)
        x, res, grad_y, grad_s = make_inputs((rows, d), torch.float32, residual)
        want = run(hf_fn(module), x, res, grad_y, grad_s, module.weight)
        got = run(op_fn(module, casting, offset), x, res, grad_y, grad_s, module.weight)
        assert_matches(got, want, torch.float32)


def test_strided_rows_are_read_in_place(backend):
    """Row views (any row stride, unit stride along D) are not copied; results match HF's."""
    d = 96
    x_store = torch.randn(2, 9, d + 13, device=DEVICE)
    res_store = torch.randn(2, 9, 2 * d, device=DEVICE)
    x, res = x_store[..., 5 : 5 + d], res_store[..., d:]
    for view in (x, res):
        assert kernels._as_rows(view).data_ptr() == view.data_ptr()
    # A transposed batch has no single row stride: that one is copied.
    transposed = torch.randn(9, 2, d, device=DEVICE).transpose(0, 1)
    assert kernels._as_rows(transposed).is_contiguous()
    module = make_module("gemma", d, torch.float32)
    grad_y, grad_s = torch.randn(2, 9, d, device=DEVICE), torch.randn(2, 9, d, device=DEVICE)
    for inputs in ((x, res), (transposed, None)):
        want = run(hf_fn(module), *inputs, grad_y, grad_s, module.weight)
        got = run(op_fn(module, "gemma", 1.0), *inputs, grad_y, grad_s, module.weight)
        assert_matches(got, want, torch.float32)


def test_broadcast_gradient(backend):
    """y.sum().backward() hands the op an expanded gradient (stride 0 along D)."""
    module = make_module("llama", 64, torch.float32)
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    rms_norm(x, module.weight, EPS).sum().backward()
    got = (x.grad.clone(), module.weight.grad.clone())
    x.grad = module.weight.grad = None
    module(x).sum().backward()
    torch.testing.assert_close(got, (x.grad, module.weight.grad), rtol=1e-5, atol=1e-5)


def test_outputs_are_fully_written(monkeypatch):
    """Every buffer the kernels write starts as NaN: none survives (partial dw rows included)."""
    monkeypatch.setattr(kernels, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))  # fmt: skip
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    for rows, d, casting in ((3, 7, "llama"), (17, 257, "gemma"), (40, 96, "llama"), (1, 1, "gemma")):
        x, res, grad_y, grad_s = make_inputs((rows, d), torch.bfloat16, True)
        weight = torch.randn(d, device=DEVICE)
        y, s, rstd = kernels.rms_norm_forward(x, weight, res, EPS, 1.0, casting)
        dx, dw = kernels.rms_norm_backward(grad_y.to(y.dtype), grad_s, s, weight, rstd, 1.0, casting, True, True)
        for t in (y, s, rstd, dx, dw):
            assert not t.isnan().any(), (rows, d, casting)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf·0 in the interpreter's numpy
def test_nan_and_inf_stay_in_their_row(backend):
    module = make_module("llama", 32, torch.float32)
    x, _, grad_y, _ = make_inputs((6, 32), torch.float32, False)
    x[1, 3], x[4, 0] = float("nan"), float("inf")
    want = run(hf_fn(module), x, None, grad_y, None, module.weight)
    got = run(op_fn(module, "llama", 0.0), x, None, grad_y, None, module.weight)
    clean = [0, 2, 3, 5]
    for key in ("y", "dx"):
        assert got[key][clean].isfinite().all() and not got[key][[1, 4]].isfinite().all(), key
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got["dw"].isnan().all() == want["dw"].isnan().all()


def test_dweight_is_deterministic(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    x, res, grad_y, grad_s = make_inputs((37, 257), torch.bfloat16, True)
    weight = torch.randn(257, device=DEVICE)
    y, s, rstd = kernels.rms_norm_forward(x, weight, res, EPS, 0.0, "llama")
    grad_y = grad_y.to(y.dtype)
    runs = [kernels.rms_norm_backward(grad_y, grad_s, s, weight, rstd, 0.0, "llama", True, True) for _ in range(2)]
    assert torch.equal(runs[0][1].view(torch.int32), runs[1][1].view(torch.int32))
    assert torch.equal(runs[0][0], runs[1][0])
    reference = kernels.rms_norm_reference_backward(grad_y, grad_s, s, weight, rstd, 0.0, "llama", True, True)
    assert rel_err(runs[0][1], reference[1]) < 1e-5


def test_only_the_gradients_asked_for(backend):
    module = make_module("gemma", 48, torch.bfloat16)
    x, res, grad_y, grad_s = make_inputs((5, 48), torch.bfloat16, True)
    full = run(op_fn(module, "gemma", 1.0), x, res, grad_y, grad_s, module.weight)
    module.weight.requires_grad_(False)  # a frozen norm, as under LoRA: no dw
    xr = x.clone().requires_grad_()
    y, s = rms_norm(xr, module.weight, EPS, offset=1.0, casting="gemma", residual=res)
    torch.autograd.backward((y, s), (grad_y, grad_s))
    assert torch.equal(xr.grad, full["dx"])
    module.weight.requires_grad_(True)
    module.weight.grad = None
    y, s = rms_norm(x, module.weight, EPS, offset=1.0, casting="gemma", residual=res)  # dw only
    torch.autograd.backward((y, s), (grad_y, grad_s))
    assert torch.equal(module.weight.grad, full["dw"])


def test_empty_batch(backend):
    weight = torch.randn(16, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y, s = rms_norm(x, weight, EPS, residual=torch.randn(0, 16, device=DEVICE))
    (y.sum() + s.sum()).backward()
    assert y.shape == s.shape == x.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros(16, device=DEVICE))


def test_bad_inputs_are_clear_errors():
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.randn(7), EPS)
    with pytest.raises(ValueError, match="casting must be"):
        rms_norm(x, w, EPS, casting="t5")
    with pytest.raises(ValueError, match="residual must be"):
        rms_norm(x, w, EPS, residual=torch.randn(3, 9))
    with pytest.raises(TypeError, match="float tensor"):
        rms_norm(x.long(), w, EPS)
    with pytest.raises(ValueError, match="up to 65536 features"):
        kernels._tile(1, 65537)


# -- torch.library, torch.compile, autocast ---------------------------------------------------------


def test_the_custom_ops_pass_opcheck():
    x = torch.randn(2, 3, 24, requires_grad=True)
    res = torch.randn(2, 3, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=True)
    # Plain; fused residual (gemma); a bf16 residual under an fp64 weight (promotions, fp64 math).
    for w, residual, casting in ((weight, None, "llama"), (weight, res, "gemma"),
                                 (weight.double(), res.bfloat16(), "llama")):  # fmt: skip
        torch.library.opcheck(_rms_norm_op, (x, w, residual, EPS, 1.0, casting))
    # The backward op is never differentiated: its operands require no gradient.
    _, s, rstd = _rms_norm_op(x.detach(), torch.randn(24), res.detach(), EPS, 0.0, "llama")
    grad = torch.randn(2, 3, 24)
    for grad_s, needs in ((None, (True, True)), (grad, (False, True))):
        torch.library.opcheck(_rms_norm_backward_op, (grad, grad_s, s, torch.randn(24), rstd, 0.0, "llama", *needs))


def test_compiles_with_fullgraph(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    x, res, _, _ = make_inputs((4, 6, 32), torch.float32, True)
    weight = torch.randn(32, requires_grad=True, device=DEVICE)

    def step(x, res, weight):
        y, s = rms_norm(x, weight, EPS, offset=1.0, casting="gemma", residual=res)
        return rms_norm(s, weight, EPS, offset=1.0, casting="gemma").square().sum() + y.sum()

    inputs = [t.clone().requires_grad_() for t in (x, res)] + [weight]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*inputs).backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    step(*inputs).backward()
    torch.testing.assert_close(grads, [t.grad for t in inputs])


def test_autocast_leaves_the_norm_in_its_dtypes(backend):
    """HF's RMSNorm is not an autocast op: under bf16 autocast an fp32 stream stays fp32."""
    module = make_module("llama", 32, torch.float32)
    x, res, grad_y, grad_s = make_inputs((5, 32), torch.float32, True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        want = run(hf_fn(module), x, res, grad_y, grad_s, module.weight)
        got = run(op_fn(module, "llama", 0.0), x, res, grad_y, grad_s, module.weight)
    assert got["y"].dtype == want["y"].dtype == torch.float32
    assert_matches(got, want, torch.float32)
