"""``peft_fast.ops.glu.glu`` / ``glu_packed`` (and their kernels) against Hugging Face's gated-MLP expressions.

The references are the modelling code's own lines: ``ACT2FN[hidden_act](gate) * up`` (Llama's
``act_fn(gate_proj(x)) * up_proj(x)``, with ``silu``, Gemma's ``gelu_pytorch_tanh`` and exact
``gelu``) and Phi3MLP's ``gate, up = gate_up.chunk(2, dim=-1); up * act(gate)``, with autograd
through them. Both backends (``PEFT_FAST_BACKEND=torch``; ``triton``: the kernels, under the
interpreter without a GPU), fp64 / fp32 / bf16, widths 1, 7 and 257, odd row counts, strided
halves of one buffer, NaN / ±inf propagation, NaN-poisoned outputs, what is saved for backward,
opcheck and ``torch.compile``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from peft_fast.kernels import glu as kernels
from peft_fast.ops.glu import (
    ACTIVATIONS,
    _glu_backward_op,
    _glu_op,
    _glu_packed_backward_op,
    _glu_packed_op,
    glu,
    glu_packed,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
HF_NAMES = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# ‖error‖ / ‖expected‖ on the kernel backend: fp64 / fp32 differ from torch's exp / erf / tanh in the last bits
# only; bf16 by its rounding (HF rounds act(gate) and the product, the kernel once). The torch backend is HF's
# expression itself: bit for bit.
TOLERANCE = {torch.float64: 1e-13, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("PEFT_FAST_BACKEND", request.param)
    return request.param


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def hf_glu(gate, up, activation):
    return ACT2FN[HF_NAMES[activation]](gate) * up


def hf_phi3(gate_up, activation):
    gate, up_states = gate_up.chunk(2, dim=-1)
    return up_states * ACT2FN[HF_NAMES[activation]](gate)


def inputs(shape, dtype, scale=3.0):
    """Values over the activations' curved range (|g| up to ~10), in ``dtype``, requiring grad."""
    return (torch.randn(shape, device=DEVICE, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def forward_backward(fn, tensors, grad_seed=1):
    for t in tensors:
        t.grad = None
    y = fn(*tensors)
    generator = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    y.backward(grad)
    return [y.detach(), *(t.grad for t in tensors)]


def assert_matches(actual, expected, backend, dtype):
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        if backend == "torch":
            assert torch.equal(a, e)
        else:
            assert rel_err(a, e) <= TOLERANCE[dtype], rel_err(a, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (17, 257), (2, 1)], ids=["3x5x7", "17x257", "2x1"])
def test_matches_hf(backend, activation, dtype, shape):
    """act(gate)·up and the gradients of gate and up, for odd widths (7, 257, 1) and row counts (15, 17, 2)."""
    gate, up = inputs(shape, dtype), inputs(shape, dtype)
    expected = forward_backward(lambda g, u: hf_glu(g, u, activation), (gate, up))
    actual = forward_backward(lambda g, u: glu(g, u, activation), (gate, up))
    assert_matches(actual, expected, backend, dtype)
    assert actual[0].is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_packed_matches_phi3(backend, activation, dtype):
    """Phi-3's gate_up [..., 2I]: gate is the first half; one [..., 2I] gradient."""
    gate_up = inputs((2, 9, 2 * 257), dtype)
    expected = forward_backward(lambda gu: hf_phi3(gu, activation), (gate_up,))
    actual = forward_backward(lambda gu: glu_packed(gu, activation), (gate_up,))
    assert_matches(actual, expected, backend, dtype)


def test_strided_inputs(backend):
    """gate and up as column halves of one padded buffer (row stride > I) are read in place; a feature stride
    other than 1 is copied first; both give HF's result."""
    buffer = inputs((11, 2 * 7 + 3), torch.float32)
    halves = lambda b: (b[:, :7], b[:, 7:14])
    expected = forward_backward(lambda b: hf_glu(*halves(b), "silu"), (buffer,))
    actual = forward_backward(lambda b: glu(*halves(b), "silu"), (buffer,))
    assert_matches(actual, expected, backend, torch.float32)
    assert torch.equal(actual[1][:, 14:], torch.zeros(11, 3, device=DEVICE))
    every_other = lambda b: (b[:, 0:14:2], b[:, 1:14:2])
    expected = forward_backward(lambda b: hf_glu(*every_other(b), "gelu_tanh"), (buffer,))
    actual = forward_backward(lambda b: glu(*every_other(b), "gelu_tanh"), (buffer,))
    assert_matches(actual, expected, backend, torch.float32)
    # Phi-3's packed output from a padded (row-strided) buffer.
    expected = forward_backward(lambda b: hf_phi3(b[:, :14], "gelu"), (buffer,))
    actual = forward_backward(lambda b: glu_packed(b[:, :14], "gelu"), (buffer,))
    assert_matches(actual, expected, backend, torch.float32)


def test_only_the_inputs_are_saved(backend):
    """Saved for backward: gate and up (gate_up for the packed op) themselves, nothing computed."""
    gate, up = inputs((4, 8), torch.float32), inputs((4, 8), torch.float32)
    gate_up = inputs((4, 16), torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        glu(gate, up, "silu")
        glu_packed(gate_up, "silu")
    assert len(saved) == 3 and all(s is a for s, a in zip(saved, (gate, up, gate_up), strict=True))


def test_gradient_of_one_input_only(backend):
    gate, up = inputs((5, 7), torch.float64), inputs((5, 7), torch.float64)
    expected = hf_glu(gate, up, "gelu")
    for needs in ((True, False), (False, True)):
        g, u = gate.detach().requires_grad_(needs[0]), up.detach().requires_grad_(needs[1])
        (target,) = [t for t, n in zip((g, u), needs, strict=True) if n]
        (reference,) = [t for t, n in zip((gate, up), needs, strict=True) if n]
        grad = torch.autograd.grad(glu(g, u, "gelu").sum(), target)[0]
        torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), reference, retain_graph=True)[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf / NaN
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_propagate_as_in_hf(backend, activation):
    """NaN / ±inf in gate or up give NaN / inf exactly where HF's expression does, in the output and both gradients."""
    gate, up = inputs((3, 6), torch.float32), inputs((3, 6), torch.float32)
    with torch.no_grad():
        gate[0, 1], gate[1, 2], gate[2, 3] = float("nan"), float("inf"), -float("inf")
        up[0, 4], up[2, 5] = float("nan"), float("inf")
    expected = forward_backward(lambda g, u: hf_glu(g, u, activation), (gate, up))
    actual = forward_backward(lambda g, u: glu(g, u, activation), (gate, up))
    if (
        backend == "triton"
        and activation == "gelu"
        and torch.nn.functional.gelu(torch.full((64,), float("inf"), device=DEVICE)).isnan().any()
    ):
        # torch's CPU gelu gives NaN at +inf (its vectorised erf); the limit, which the kernel returns, is +inf.
        assert actual[0][1, 2].isinf()
        for a, e in zip(actual, expected, strict=True):
            e[1, 2] = a[1, 2]
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf())
        finite = e.isfinite()
        torch.testing.assert_close(a[finite], e[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter): exp overflows to inf, as intended
def test_poisoned_buffers(monkeypatch):
    """Every buffer the kernels write (y, d_gate, d_up, the packed d_gate_up) comes NaN-filled: results unchanged."""
    monkeypatch.setenv("PEFT_FAST_BACKEND", "triton")
    gate, up, gate_up = (
        inputs((9, 257), torch.bfloat16),
        inputs((9, 257), torch.bfloat16),
        inputs((9, 514), torch.bfloat16),
    )
    cases = [
        (lambda g, u: glu(g, u, "silu"), (gate, up)),
        (lambda g: glu(g, up.detach(), "gelu"), (gate,)),
        (lambda u: glu(gate.detach(), u, "gelu_tanh"), (up,)),
        (lambda gu: glu_packed(gu, "silu"), (gate_up,)),
    ]
    clean = [forward_backward(fn, args) for fn, args in cases]
    monkeypatch.setattr(
        kernels, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    poisoned = [forward_backward(fn, args) for fn, args in cases]
    for results, expected in zip(poisoned, clean, strict=True):
        for a, e in zip(results, expected, strict=True):
            assert torch.equal(a, e)


def test_mixed_dtypes_compute_in_the_promoted_dtype(backend):
    gate, up = inputs((4, 7), torch.bfloat16), inputs((4, 7), torch.float32)
    y = glu(gate, up, "silu").detach()
    expected = hf_glu(gate, up, "silu").detach()
    assert y.dtype == expected.dtype == torch.float32
    assert rel_err(y, expected) <= 1e-2


def test_opcheck(backend):
    gate, up = inputs((5, 7), torch.float32), inputs((5, 7), torch.float32)
    gate_up = inputs((2, 3, 14), torch.float32)
    grad = torch.randn(5, 7, device=DEVICE)
    for activation in ACTIVATIONS:
        torch.library.opcheck(_glu_op, (gate, up, activation))
        torch.library.opcheck(_glu_packed_op, (gate_up, activation))
    torch.library.opcheck(_glu_backward_op, (grad, gate.detach(), up.detach(), "silu", True, False))
    torch.library.opcheck(
        _glu_packed_backward_op, (grad.reshape(5, 7)[:2].reshape(2, 1, 7).expand(2, 3, 7), gate_up.detach(), "gelu")
    )


@pytest.mark.parametrize("packed", [False, True], ids=["glu", "glu_packed"])
def test_torch_compile_fullgraph(backend, packed):
    """A gated MLP compiled with fullgraph under aot_eager: values and gradients as eager HF's."""
    torch._dynamo.reset()
    x = inputs((2, 5, 8), torch.float64, scale=1.0)
    w_gate_up = inputs((8, 2 * 12), torch.float64, scale=0.5)
    w_down = torch.randn(12, 8, device=DEVICE, dtype=torch.float64)

    def mlp(act):
        def run(x, w):
            gate_up = x @ w
            y = act(gate_up) if packed else act(gate_up[..., :12], gate_up[..., 12:])
            return (y @ w_down).tanh()

        return run

    ours = (lambda gu: glu_packed(gu, "silu")) if packed else (lambda g, u: glu(g, u, "silu"))
    reference = (lambda gu: hf_phi3(gu, "silu")) if packed else (lambda g, u: hf_glu(g, u, "silu"))
    expected = forward_backward(mlp(reference), (x, w_gate_up))
    actual = forward_backward(torch.compile(mlp(ours), fullgraph=True, backend="aot_eager"), (x, w_gate_up))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    gate = torch.randn(3, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        glu(gate, gate, "relu")
    with pytest.raises(ValueError, match="one shape"):
        glu(gate, torch.randn(3, 5), "silu")
    with pytest.raises(ValueError, match="even"):
        glu_packed(torch.randn(3, 5), "silu")
    with pytest.raises(TypeError, match="float"):
        glu(gate.long(), gate, "silu")
    assert ACTIVATIONS == kernels.ACTIVATIONS
