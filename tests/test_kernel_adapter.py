"""Triton kernels of the bottleneck adapter (``peft_fast/kernels/adapter.py``) against float64.

Under the interpreter on CPU (on the GPU when there is one). Shapes are odd on purpose: hidden
sizes that no tile divides, row counts below and above a tile, bottlenecks of 1 (padded to the
16-wide tl.dot minimum), 8 and 64.
"""

from __future__ import annotations

import pytest
import torch

from peft_fast.kernels import adapter as kernels
from peft_fast.kernels.adapter import (
    bottleneck_adapter_backward,
    bottleneck_adapter_forward,
    bottleneck_adapter_reference_forward,
)
from peft_fast.kernels.lora_linear import dropout_mask

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
SEED = 1234
ACTIVATIONS64 = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "swish": torch.nn.functional.silu,
}


def make_case(m, d, b, dtype=torch.float32, ln=False, parallel=False, activation="relu", scale=0.75):
    """Random operands; the adapter's output is as large as its input, so neither hides the other."""
    device = KERNEL_DEVICE

    def rand(*shape, std=1.0, shift=0.0):
        return (torch.randn(*shape, device=device) * std + shift).to(dtype)

    return {
        "x": rand(m, d),
        "residual": rand(m, d) if parallel else None,
        "ln_weight": rand(d, std=0.2, shift=1.0) if ln else None,
        "ln_bias": rand(d, std=0.2) if ln else None,
        "ln_eps": 1e-5,
        "down_weight": rand(b, d, std=d**-0.5),
        "down_bias": rand(b, std=0.3),
        "up_weight": rand(d, b, std=b**-0.5),
        "up_bias": rand(d, std=0.3),
        "scale": scale,
        "activation": activation,
    }


def forward(case, p=0.0, seed=SEED):
    return bottleneck_adapter_forward(**case, dropout_p=p, seed=seed)


def backward(case, grad_y, saved, p=0.0, seed=SEED, needs=(True, True, True, True)):
    _, z, mean, rstd = saved
    return bottleneck_adapter_backward(
        grad_y, case["x"], z, mean, rstd, case["ln_weight"], case["ln_bias"], case["down_weight"],
        case["up_weight"], case["scale"], case["activation"], p, seed, case["residual"] is None, *needs,
    )  # fmt: skip


def formula64(case, grad_y, p=0.0, seed=SEED):
    """y and the gradients of sum(y·grad_y), in float64 from the same (rounded) inputs."""
    names = ("x", "ln_weight", "ln_bias", "down_weight", "down_bias", "up_weight", "up_bias")
    leaves = {n: case[n].detach().double().requires_grad_() for n in names if case[n] is not None}
    x = leaves["x"]
    h = x
    if "ln_weight" in leaves:
        h = torch.nn.functional.layer_norm(x, (x.shape[1],), leaves["ln_weight"], leaves["ln_bias"], case["ln_eps"])
    z = h @ leaves["down_weight"].t() + leaves["down_bias"]
    u = (ACTIVATIONS64[case["activation"]](z) @ leaves["up_weight"].t() + leaves["up_bias"]) * case["scale"]
    if p > 0:
        u = u * dropout_mask(seed, x.shape[0], x.shape[1], p, x.device).double() / (1 - p)
    y = u + (x if case["residual"] is None else case["residual"].double())
    (y * grad_y.double()).sum().backward()
    return y.detach(), {n: leaf.grad for n, leaf in leaves.items()}, u.detach()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def check_against_formula(case, p=0.0):
    dtype = case["x"].dtype
    saved = forward(case, p)
    grad_y = torch.randn_like(case["x"])
    grads = backward(case, grad_y, saved, p)
    y64, grads64, u64 = formula64(case, grad_y, p)
    assert u64.norm() > 0.1 * y64.norm()  # the adapter path matters, or a kernel dropping it would pass
    tol = TOLERANCE[dtype]
    y = saved[0]
    assert y.dtype == dtype and rel_err(y, y64) <= tol, ("y", rel_err(y, y64))
    for name, expected in grads64.items():
        actual = getattr(grads, name)
        assert actual.dtype == dtype and actual.shape == expected.shape, name
        assert rel_err(actual, expected) <= tol, (name, rel_err(actual, expected))


# -- forward and backward against float64 -----------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "swish"])
@pytest.mark.parametrize(("d", "b"), [(45, 1), (45, 8), (97, 64)], ids=["b1", "b8", "b64"])
def test_fp32_bottlenecks_and_activations(d, b, activation):
    # LayerNorm on for gelu, a parallel residual for swish: every kernel branch is seen per size.
    case = make_case(17, d, b, ln=activation == "gelu", parallel=activation == "swish", activation=activation)
    check_against_formula(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ln", [False, True], ids=["no_ln", "ln"])
def test_half_precision(dtype, ln):
    check_against_formula(make_case(33, 72, 8, dtype, ln=ln, activation="gelu"))


@pytest.mark.parametrize(("m", "ln", "parallel"), [(1, True, False), (40, False, True), (70, True, True)])
def test_dropout_and_row_counts(m, ln, parallel):
    check_against_formula(make_case(m, 45, 8, ln=ln, parallel=parallel, activation="swish"), p=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "d"), [(1, 72), (40, 45), (70, 96)])
def test_fused_serial_adapter_with_dropout(m, d, dtype, monkeypatch):
    """No LayerNorm, R = X, one bottleneck chunk: one fused pass, the same result as two kernels."""
    launched = []
    fused = kernels._adapter_fused_fwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(grid) or fused[grid](*a, **kw)

    monkeypatch.setattr(kernels, "_adapter_fused_fwd_kernel", Recorder())
    case = make_case(m, d, 8, dtype, activation="gelu")
    check_against_formula(case, p=0.3)
    assert launched  # the fused kernel ran (forward), not the down + up pair
    y, z = forward(case, 0.3)[:2]
    two_pass = dict(case, residual=case["x"])  # an explicit residual takes the two-kernel path
    y2, z2 = forward(two_pass, 0.3)[:2]
    tolerance = 1e-6 if dtype == torch.float32 else TOLERANCE[dtype]  # tile shapes change the sum order
    assert rel_err(z, z2.double()) <= tolerance and rel_err(y, y2.double()) <= tolerance


def test_torch_reference_matches_kernels():
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(20, 72, 16, dtype, ln=True, activation="gelu")
        y = forward(case, 0.2)[0]
        keep = dropout_mask(SEED, *case["x"].shape, 0.2, case["x"].device)
        expected = bottleneck_adapter_reference_forward(**case, keep=keep, dropout_p=0.2)[0]
        # bf16: the same roundings, but fp32 noise flips some of them by one ulp (2**-8).
        assert rel_err(y, expected.double()) <= (1e-6 if dtype == torch.float32 else TOLERANCE[dtype])


def test_saved_statistics_are_the_layer_norm_statistics():
    case = make_case(9, 45, 8, ln=True)
    _, z, mean, rstd = forward(case)
    x = case["x"].double()
    torch.testing.assert_close(mean.double(), x.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), 1 / (x.var(1, unbiased=False) + 1e-5).sqrt(), rtol=1e-5, atol=0)
    assert z.shape == (9, 8)


# -- dropout, identity, coverage ---------------------------------------------------------------


def test_dropout_mask_is_the_philox_mask():
    """With a zero down-projection and up-bias 1, y = residual + s·mask/(1-p): the mask itself."""
    m, d, p = 24, 40, 0.4
    case = make_case(m, d, 4, parallel=True, scale=1.0)
    case["residual"] = torch.zeros(m, d, device=KERNEL_DEVICE)
    case["up_weight"] = torch.zeros(d, 4, device=KERNEL_DEVICE)
    case["up_bias"] = torch.ones(d, device=KERNEL_DEVICE)
    y = forward(case, p, seed=77)[0]
    keep = dropout_mask(77, m, d, p, KERNEL_DEVICE)
    assert torch.equal(y, keep.float() * torch.tensor(1 / (1 - p), dtype=torch.float32))


def test_zero_up_projection_returns_the_residual_bit_for_bit():
    case = make_case(17, 45, 8, ln=True, activation="gelu")
    case["up_weight"] = torch.zeros_like(case["up_weight"])
    case["up_bias"] = torch.zeros_like(case["up_bias"])
    assert torch.equal(forward(case, 0.3)[0], case["x"])


def test_outputs_are_fully_written(monkeypatch):
    def poisoned_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", poisoned_empty)
    for m, ln in ((3, True), (40, False), (70, True)):
        case = make_case(m, 45, 8, ln=ln)
        saved = forward(case, 0.2)
        grads = backward(case, torch.randn(m, 45, device=KERNEL_DEVICE), saved, 0.2)
        assert (grads.ln_weight is not None) == ln
        for t in (*saved, *(g for g in grads if g is not None)):
            assert not t.isnan().any()


def test_empty_batch_and_requested_gradients_only():
    case = make_case(0, 45, 8, ln=True)
    saved = forward(case)
    grads = backward(case, torch.empty(0, 45, device=KERNEL_DEVICE), saved)
    assert saved[0].shape == (0, 45) and grads.x.shape == (0, 45)
    assert torch.equal(grads.down_weight, torch.zeros(8, 45, device=KERNEL_DEVICE))
    case = make_case(17, 45, 8, ln=True)
    saved = forward(case)
    grad_y = torch.randn(17, 45, device=KERNEL_DEVICE)
    full = backward(case, grad_y, saved)
    for needs in ((True, False, False, False), (False, True, False, False), (False, False, True, False),
                  (False, False, False, True)):  # fmt: skip
        partial = backward(case, grad_y, saved, needs=needs)
        groups = (("x",), ("ln_weight", "ln_bias"), ("down_weight", "down_bias"), ("up_weight", "up_bias"))
        for needed, names in zip(needs, groups, strict=True):
            for name in names:
                got = getattr(partial, name)
                assert (got is not None) == needed, name
                if needed:
                    assert torch.equal(got, getattr(full, name)), name


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"activation": "tanh"}, ValueError, "valid choices: relu, gelu, swish"),
        ({"down_weight": torch.randn(50, 45), "down_bias": torch.randn(50), "up_weight": torch.randn(45, 50)},
         ValueError, r"bottleneck \(50\) is larger than the hidden size \(45\)"),
        ({"up_bias": torch.randn(45, dtype=torch.float64)}, TypeError, "up_bias must have the dtype of x"),
        ({"ln_bias": None}, ValueError, "both ln_weight and ln_bias"),
        ({"residual": torch.randn(3, 45)}, ValueError, r"residual must have shape \(17, 45\)"),
    ],
    ids=["activation", "bottleneck", "dtype", "ln", "residual"],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors(change, error, message):
    case = make_case(17, 45, 8, ln=True)
    case.update({k: v.to(KERNEL_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=message):
        forward(case)
    with pytest.raises(ValueError, match="dropout_p"):
        forward(make_case(4, 45, 8), p=1.0)
