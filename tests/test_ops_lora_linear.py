"""The ``peft_fast::lora_linear`` op: float64 reference, autograd, dropout, memory, bad input.

Each test runs on the torch backend and, where marked, on the Triton backend (the interpreter
on CPU, the GPU when there is one). The Triton kernels' own exhaustive shape matrix is in
``test_kernel_lora_linear.py``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from peft_fast.benchmark import saved_bytes
from peft_fast.layers import LoraLinear, NF4Linear
from peft_fast.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from peft_fast.ops import backend_name, base_linear, dropout_mask, lora_linear, merge_lora

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch, kernel_device) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm().clamp_min(1e-30))


def make_case(m, k, n, r, dtype, base_kind, bias, device="cpu", requires_grad=True):
    """Random inputs; the LoRA term is as large as the base term, so neither can hide."""
    x = torch.randn(m, k, device=device).to(dtype).requires_grad_(requires_grad)
    weight = torch.randn(n, k, device=device) / k**0.5
    if base_kind == "dense":
        base = weight.to(dtype)
    else:
        base = quantize_nf4(weight, blocksize=64, double_quant=base_kind == "nf4-dq")
    lora_a = (torch.randn(r, k, device=device) / k**0.5).to(dtype).requires_grad_(requires_grad)
    lora_b = (torch.randn(n, r, device=device) / r**0.5).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(n, device=device).to(dtype).requires_grad_(requires_grad) if bias else None
    return x, base, lora_a, lora_b, b


def float64_reference(x, base, lora_a, lora_b, bias, scale, keep=None, p=0.0):
    """The formula in float64, from the same (already rounded) inputs; returns y and the grads of sum(y·g)."""
    w = dequantize_nf4(base, torch.float64) if isinstance(base, NF4Weight) else base.double()
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    x64, a64, b64 = leaves
    dropped = x64 if keep is None else x64 * keep.double() / (1 - p)
    y = x64 @ w.t() + scale * (dropped @ a64.t()) @ b64.t()
    bias64 = None
    if bias is not None:
        bias64 = bias.detach().double().requires_grad_()
        y = y + bias64
    return y, leaves + ([bias64] if bias64 is not None else [])


def check_against_float64(case, scale=0.75, p=0.0, seed=0, training=True):
    x, base, lora_a, lora_b, bias = case
    y = lora_linear(x, base, lora_a, lora_b, bias, scale=scale, dropout_p=p, training=training, seed=seed)
    keep = dropout_mask(seed, x.shape[0], x.shape[1], p, x.device) if p > 0 and training else None
    want, leaves64 = float64_reference(x, base, lora_a, lora_b, bias, scale, keep, p)
    tol = TOLERANCE[x.dtype]
    assert y.dtype == x.dtype and y.shape == want.shape
    assert relative_error(y, want) <= tol, ("forward", relative_error(y, want))
    grad_out = torch.randn_like(want)
    (y.double() * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    ours = [x.grad, lora_a.grad, lora_b.grad] + ([bias.grad] if bias is not None else [])
    for name, got, ref in zip(["dX", "dA", "dB", "dbias"], ours, leaves64, strict=False):
        assert got is not None, name
        assert relative_error(got, ref.grad) <= tol, (name, relative_error(got, ref.grad))


@pytest.mark.parametrize(
    ("m", "r", "base_kind", "bias"),
    list(itertools.product([1, 3, 17, 64], [1, 8, 16, 64], ["dense", "nf4", "nf4-dq"], [True, False])),
)
def test_torch_backend_matches_float64(monkeypatch, m, r, base_kind, bias):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    check_against_float64(make_case(m, 72, 40, r, torch.float32, base_kind, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("base_kind", ["dense", "nf4-dq"])
def test_both_backends_match_float64_per_dtype(backend, dtype, base_kind):
    if dtype == torch.float16 and backend == "torch":
        pytest.skip("CPU torch has no fp16 matmul worth testing; the kernels cover fp16")
    case = make_case(17, 96, 33, 8, dtype, base_kind, True, device=device_for(backend))
    check_against_float64(case)


@pytest.mark.parametrize("m", [1, 3, 64])
def test_triton_backend_shapes_and_dropout(backend, m):
    case = make_case(m, 72, 40, 16, torch.float32, "nf4", m != 3, device=device_for(backend))
    check_against_float64(case, p=0.25, seed=1234)


def test_gradcheck_float64_torch_backend(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: lora_linear(t[0], dense, t[1], t[2], t[3], scale=0.7, dropout_p=0.3, seed=3), (x, a, b, bias)
    )
    # NF4 base, float64 activations: W is dequantized to float64 in both passes
    nf4 = quantize_nf4(torch.randn(4, 64))
    x64 = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    a64 = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lora_linear(t[0], nf4, t[1], t[2], None, scale=2.0), (x64, a64, b64))


def test_float64_runs_the_reference_on_every_backend(monkeypatch):
    """The public checks accept float64 activations; the kernels compute in fp32 / bf16 / fp16, so
    float64 runs the torch reference on the Triton backend too (it used to refuse it there)."""
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(8, 32, dtype=torch.float64)
    a = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PEFT_FAST_BACKEND", backend)
        y = lora_linear(x, dense, a, b, None, scale=0.5)
        (gx, ga, gb) = torch.autograd.grad(y.sum(), (x, a, b))
        outputs[backend] = (y, gx, ga, gb)
    assert outputs["triton"][0].dtype == torch.float64
    for t, r in zip(outputs["triton"], outputs["torch"], strict=True):
        assert torch.equal(t, r)
    from peft_fast.ops import rms_norm

    w = torch.randn(32, dtype=torch.float64)
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    triton_norm = rms_norm(x.detach(), w, 1e-6)
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    assert torch.equal(triton_norm, rms_norm(x.detach(), w, 1e-6))


def test_leading_dims_and_non_contiguous_inputs(backend):
    device = device_for(backend)
    x, base, lora_a, lora_b, bias = make_case(12, 64, 24, 8, torch.float32, "nf4", True, device=device)
    x3 = x.detach().reshape(3, 4, 64)
    strided = torch.randn(3, 64, 4, device=device).transpose(1, 2).copy_(x3)  # non-contiguous
    a_t = lora_a.detach().t().contiguous().t()  # same values, transposed strides
    assert not strided.is_contiguous() and not a_t.is_contiguous()
    y = lora_linear(strided, base, a_t, lora_b.detach(), bias.detach(), scale=0.5)
    y_ref = lora_linear(x.detach(), base, lora_a.detach(), lora_b.detach(), bias.detach(), scale=0.5)
    assert y.shape == (3, 4, 24)
    torch.testing.assert_close(y.reshape(12, 24), y_ref, rtol=1e-5, atol=1e-5)


# -- dropout ------------------------------------------------------------------------------


def test_dropout_zero_equals_no_dropout_exactly(backend):
    case = make_case(17, 64, 24, 8, torch.float32, "nf4-dq", True, device=device_for(backend), requires_grad=False)
    x, base, a, b, bias = case
    no_dropout = lora_linear(x, base, a, b, bias, scale=2.0)
    assert torch.equal(lora_linear(x, base, a, b, bias, scale=2.0, dropout_p=0.0, seed=99), no_dropout)
    # eval mode: dropout is off whatever p says
    assert torch.equal(lora_linear(x, base, a, b, bias, scale=2.0, dropout_p=0.5, training=False), no_dropout)


def test_dropout_mask_is_a_function_of_the_seed(backend):
    device = device_for(backend)
    m1 = dropout_mask(7, 32, 64, 0.3, device)
    assert torch.equal(m1, dropout_mask(7, 32, 64, 0.3, device))
    assert not torch.equal(m1, dropout_mask(8, 32, 64, 0.3, device))
    kept = float(dropout_mask(11, 256, 256, 0.3, device).float().mean())
    assert abs(kept - 0.7) < 5 * (0.3 * 0.7 / 65536) ** 0.5


def test_dropout_mean_over_calls_equals_no_dropout(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    x, base, a, b, _bias = make_case(4, 64, 16, 8, torch.float32, "dense", False, requires_grad=False)
    b = b * 10  # make the LoRA term dominate, so a wrong expectation would show
    expected = lora_linear(x, base, a, b, None, scale=1.0)
    calls = 600
    samples = torch.stack([lora_linear(x, base, a, b, None, scale=1.0, dropout_p=0.2) for _ in range(calls)])
    lora_term = expected - x @ base.t()
    stderr = samples.std(0) / calls**0.5
    assert ((samples.mean(0) - expected).abs() <= 5 * stderr + 1e-6).all()
    assert samples.std(0).mean() > 0.01 * lora_term.abs().mean()  # dropout really happened


def test_backward_uses_the_forward_mask(backend):
    """Gradients equal the float64 formula evaluated with the replayed mask (not a fresh one)."""
    case = make_case(9, 64, 20, 4, torch.float32, "dense", False, device=device_for(backend))
    check_against_float64(case, scale=1.5, p=0.5, seed=2024)


# -- gradients through shared inputs, adapters, merging ------------------------------------


def test_gradients_accumulate_when_one_x_feeds_q_k_v(backend):
    device = device_for(backend)
    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    layers = []
    for _ in range(3):
        _, base, a, b, _ = make_case(1, 64, 32, 8, torch.float32, "nf4", False, device=device)
        layers.append((base, a, b))
    outs = [lora_linear(x, base, a, b, scale=0.5, dropout_p=0.1, seed=i) for i, (base, a, b) in enumerate(layers)]
    sum(o.square().sum() for o in outs).backward()
    x_ref = x.detach().double().requires_grad_()
    total = 0
    for i, (base, a, b) in enumerate(layers):
        keep = dropout_mask(i, 10, 64, 0.1, device).reshape(2, 5, 64).double()
        w = dequantize_nf4(base, torch.float64)
        y = x_ref @ w.t() + 0.5 * ((x_ref * keep / 0.9) @ a.detach().double().t()) @ b.detach().double().t()
        total = total + y.square().sum()
    total.backward()
    assert relative_error(x.grad, x_ref.grad) < 1e-5


def test_multiple_adapters_and_disabled_path(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    base = NF4Linear(quantize_nf4(torch.randn(24, 64) * 0.1), torch.randn(24))
    layer = LoraLinear(base)
    layer.update_layer("one", r=4, lora_alpha=8, init_lora_weights=False)
    layer.update_layer("two", r=8, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 64)
    w = base.dequantized_weight(torch.float32)
    delta = {n: layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight for n in ("one", "two")}
    with torch.no_grad():
        assert layer.active_adapters == ["one"]
        torch.testing.assert_close(layer(x), x @ (w + delta["one"]).t() + base.bias)
        layer.set_adapter("two")
        torch.testing.assert_close(layer(x), x @ (w + delta["two"]).t() + base.bias)
        layer.set_adapter(["one", "two"])
        torch.testing.assert_close(layer(x), x @ (w + delta["one"] + delta["two"]).t() + base.bias)
        torch.testing.assert_close(layer.merged_weight(torch.float32), w + delta["one"] + delta["two"])
        layer.disable_adapters = True
        torch.testing.assert_close(layer(x), x @ w.t() + base.bias)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("three")


def test_base_only_path_never_saves_the_dequantized_weight():
    nf4 = quantize_nf4(torch.randn(48, 64))
    x = torch.randn(5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = base_linear(x, nf4)
    assert not any(t.shape == (48, 64) for t in saved)
    y.sum().backward()
    torch.testing.assert_close(x.grad, dequantize_nf4(nf4, torch.float32).sum(0).expand(5, 64))


def test_merge_dense_and_requantized():
    weight = torch.randn(16, 64)
    a, b = torch.randn(4, 64), torch.randn(16, 4)
    torch.testing.assert_close(merge_lora(weight, a, b, 0.5), weight + 0.5 * b @ a)
    nf4 = quantize_nf4(weight, 64, True)
    merged = merge_lora(nf4, a, b, 0.5, dtype=torch.float32)
    torch.testing.assert_close(merged, dequantize_nf4(nf4, torch.float32) + 0.5 * b @ a)
    requantized = merge_lora(nf4, a, b, 0.5, requantize=True)
    assert isinstance(requantized, NF4Weight) and requantized.double_quant and requantized.blocksize == 64
    assert relative_error(dequantize_nf4(requantized, torch.float32), merged.double()) < 0.12
    with pytest.raises(ValueError, match="cannot merge"):
        merge_lora(weight, b, a, 1.0)


# -- memory -------------------------------------------------------------------------------


def test_saved_memory_three_qlora_layers_vs_peft_bitsandbytes(monkeypatch):
    """q, k, v over one X, NF4 base, dropout 0.1: we save X + 3·H; PEFT + bnb saves far more."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    tokens, hidden, r = 256, 256, 16
    x = torch.randn(tokens, hidden, requires_grad=True)
    dense_layers = [torch.nn.Linear(hidden, hidden, bias=False) for _ in range(3)]

    ours = []
    for dense in dense_layers:
        layer = LoraLinear(NF4Linear(quantize_nf4(dense.weight.detach(), 64, True)))
        layer.update_layer("default", r=r, lora_alpha=32, lora_dropout=0.1, init_lora_weights=False)
        ours.append(layer.train())
    our_bytes = saved_bytes(lambda: [layer(x) for layer in ours], torch.nn.ModuleList(ours))
    h_bytes = tokens * r * 4
    x_bytes = tokens * hidden * 4
    assert our_bytes <= x_bytes + 3 * h_bytes + 1024, our_bytes

    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("q", "k", "v"):
                setattr(self, name, bnb.nn.Linear4bit(hidden, hidden, bias=False, compute_dtype=torch.float32,
                                                      compress_statistics=True, quant_type="nf4"))  # fmt: skip

    qkv = QKV()
    for name, dense in zip(("q", "k", "v"), dense_layers, strict=False):
        getattr(qkv, name).load_state_dict(dense.state_dict())
    qkv = qkv.to("cpu")
    config = peft.LoraConfig(r=r, lora_alpha=32, lora_dropout=0.1, target_modules=["q", "k", "v"])
    peft_model = peft.get_peft_model(qkv, config).train()
    theirs = saved_bytes(lambda: [getattr(peft_model.base_model.model, n)(x) for n in "qkv"], peft_model)
    print(f"bytes saved for backward: peft_fast {our_bytes}, PEFT + bitsandbytes {theirs}")
    assert our_bytes <= 0.6 * theirs


# -- robustness ---------------------------------------------------------------------------


def test_outputs_are_fresh_buffers_no_nan_leaks(backend):
    device = device_for(backend)
    x, base, a, b, bias = make_case(17, 96, 40, 8, torch.float32, "nf4-dq", True, device=device)
    for _ in range(3):  # fill the allocator's free lists with NaN buffers of the output's size
        poison = torch.full((17 * 40 + 17 * 96,), float("nan"), device=device)
        del poison
    y = lora_linear(x, base, a, b, bias, scale=0.5, dropout_p=0.1, seed=3)
    y.sum().backward()
    for t in (y, x.grad, a.grad, b.grad, bias.grad):
        assert torch.isfinite(t).all()


def test_nan_and_inf_in_x_propagate_like_the_reference(backend):
    device = device_for(backend)
    x, base, a, b, bias = make_case(6, 64, 16, 4, torch.float32, "nf4", True, device=device, requires_grad=False)
    x[1, 3] = float("nan")
    x[4, 10] = float("inf")
    y = lora_linear(x, base, a, b, bias, scale=1.0)
    reference = x @ dequantize_nf4(base, torch.float32).t() + (x @ a.t()) @ b.t() + bias
    assert torch.equal(torch.isnan(y), torch.isnan(reference))
    assert torch.isfinite(y[[0, 2, 3, 5]]).all()


def test_zero_size_batch_returns_empty(backend):
    device = device_for(backend)
    _, base, a, b, bias = make_case(1, 64, 16, 4, torch.float32, "nf4", True, device=device)
    x = torch.randn(0, 64, device=device, requires_grad=True)
    y = lora_linear(x, base, a, b, bias, scale=1.0)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda c: {**c, "x": torch.randn(3, 65)}, ValueError, "x has 65 features"),
        (lambda c: {**c, "lora_a": torch.randn(4, 63)}, ValueError, "lora_A must be"),
        (lambda c: {**c, "lora_b": torch.randn(16, 5)}, ValueError, "lora_B must be"),
        (lambda c: {**c, "bias": torch.randn(15)}, ValueError, "bias must be"),
        (lambda c: {**c, "lora_a": torch.randn(4, 64, dtype=torch.float64)}, TypeError, "lora_A is torch.float64"),
        (lambda c: {**c, "x": torch.randint(0, 3, (3, 64))}, TypeError, "float tensor"),
        (lambda c: {**c, "lora_b": torch.randn(16, 4, device="meta")}, ValueError, "lora_B is on meta"),
        (lambda c: {**c, "base": "weight"}, TypeError, "NF4Weight"),
        (lambda c: {**c, "dropout_p": 1.0}, ValueError, "dropout_p"),
        (lambda c: {**c, "seed": -1, "dropout_p": 0.1}, ValueError, "seed"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, error, match):
    case = {
        "x": torch.randn(3, 64), "base": quantize_nf4(torch.randn(16, 64)), "lora_a": torch.randn(4, 64),
        "lora_b": torch.randn(16, 4), "bias": torch.randn(16), "dropout_p": 0.0, "seed": None,
    }  # fmt: skip
    with pytest.raises(error, match=match):
        lora_linear(**mutate(case))


def test_custom_op_compiles_as_one_op(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    x, base, a, b, bias = make_case(8, 64, 16, 4, torch.float32, "nf4-dq", True)

    def step(x, a, b, bias):
        return lora_linear(x, base, a, b, bias, scale=0.5, dropout_p=0.1, seed=5).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, a, b, bias)
    loss.backward()
    grads = [t.grad.clone() for t in (x, a, b, bias)]
    for t in (x, a, b, bias):
        t.grad = None
    step(x, a, b, bias).backward()
    for got, t in zip(grads, (x, a, b, bias), strict=False):
        torch.testing.assert_close(got, t.grad)


def test_opcheck_registration():
    x = torch.randn(4, 64)
    nf4 = quantize_nf4(torch.randn(8, 64))
    args = (x, nf4.packed, nf4.absmax, nf4.nested_absmax, nf4.nested_offset, 64,
            torch.randn(2, 64, requires_grad=True), torch.randn(8, 2, requires_grad=True), None, 1.0, 0.0,
            torch.tensor([0]))  # fmt: skip
    torch.library.opcheck(torch.ops.peft_fast.lora_linear.default, args)


def test_backend_names(monkeypatch):
    monkeypatch.setenv("PEFT_FAST_BACKEND", "torch")
    assert backend_name("cpu") == "torch-cpu"
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    assert backend_name("cpu") == "triton-interpreter"
