"""The runtime choice between implementations (peft_fast/kernels/choice.py), with injected timings on CPU.

Also the ops' candidate lists (peft_fast/kernels/plans.py): every candidate computes the same
function as the others and as float64 under the interpreter, and each op's Choice keeps the one
timed fastest.
"""

from __future__ import annotations

import json

import pytest
import torch

from peft_fast.kernels import ia3, lora_linear, plans
from peft_fast.kernels.choice import Candidate, Choice, cache_path
from peft_fast.kernels.dropout import dropout_mask
from peft_fast.kernels.nf4_gemm import base_kind
from peft_fast.nf4 import dequantize_nf4, quantize_nf4


def make_choice(timings: dict[str, float], calls: list, timeable=True):
    def candidates(x):
        return [Candidate(name, lambda x, name=name: (calls.append(name), x * 2)[1]) for name in timings]

    def timer(run):
        before = len(calls)
        run()
        return timings[calls[before]]

    return Choice("test_op", lambda x: (x.shape[0], x.dtype), candidates, timer=timer,
                  timeable=lambda args: timeable, device_name=lambda args: "Fake GPU")  # fmt: skip


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PEFT_FAST_FORCE", raising=False)
    monkeypatch.delenv("PEFT_FAST_TUNE", raising=False)


def test_the_fastest_candidate_is_kept_per_bucket_and_cached_on_disk():
    calls = []
    choice = make_choice({"fused": 3.0, "library": 1.0, "other": 2.0}, calls)
    x = torch.ones(4)
    assert torch.equal(choice(x), x * 2)
    assert calls[:3] == ["fused", "library", "other"] and calls[3] == "library"  # timed once each, then run
    calls.clear()
    choice(x)
    assert calls == ["library"]  # the bucket is decided
    assert choice.timings[(4, torch.float32)] == {"fused": 3.0, "library": 1.0, "other": 2.0}
    stored = json.loads(cache_path().read_text())
    (scope,) = stored
    assert scope.startswith("Fake GPU | torch ") and stored[scope]["test_op"] == {"(4, torch.float32)": "library"}
    # A new process (a new Choice) reads the disk cache and times nothing.
    calls.clear()
    fresh = make_choice({"fused": 3.0, "library": 1.0, "other": 2.0}, calls)
    fresh(x)
    assert calls == ["library"] and not fresh.timings
    # Another bucket is timed on its own.
    calls.clear()
    choice(torch.ones(8))
    assert calls[:3] == ["fused", "library", "other"]


def test_each_timed_bucket_is_logged_when_asked(tmp_path, monkeypatch):
    log = tmp_path / "choices.jsonl"
    monkeypatch.setenv("PEFT_FAST_CHOICE_LOG", str(log))
    calls = []
    choice = make_choice({"fused": 3.0, "library": 1.0}, calls)
    choice(torch.ones(4))
    choice(torch.ones(4))  # decided: not timed, not logged again
    choice(torch.ones(8))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["bucket"] for line in lines] == ["(4, torch.float32)", "(8, torch.float32)"]
    assert lines[0]["op"] == "test_op" and lines[0]["chosen"] == "library"
    assert lines[0]["ms"] == {"fused": 3.0, "library": 1.0} and lines[0]["scope"].startswith("Fake GPU | torch ")


def test_no_timing_off_the_gpu_or_when_disabled(monkeypatch):
    calls = []
    choice = make_choice({"fused": 3.0, "library": 1.0}, calls, timeable=False)
    choice(torch.ones(2))
    assert calls == ["fused"]  # the static order's first
    calls.clear()
    monkeypatch.setenv("PEFT_FAST_TUNE", "0")
    choice = make_choice({"fused": 3.0, "library": 1.0}, calls)
    choice(torch.ones(2))
    assert calls == ["fused"] and not choice.timings


def test_a_forced_candidate_always_runs_and_a_bad_one_is_a_clear_error(monkeypatch):
    calls = []
    monkeypatch.setenv("PEFT_FAST_FORCE", "other_op=x, test_op=library")
    choice = make_choice({"fused": 1.0, "library": 3.0}, calls)
    choice(torch.ones(2))
    assert calls == ["library"]
    monkeypatch.setenv("PEFT_FAST_FORCE", "test_op=nonesuch")
    with pytest.raises(ValueError, match="has no candidate 'nonesuch'"):
        choice(torch.ones(2))
    monkeypatch.setenv("PEFT_FAST_FORCE", "test_op")
    with pytest.raises(ValueError, match="PEFT_FAST_FORCE must be"):
        choice(torch.ones(2))


def test_a_stale_or_broken_cache_is_ignored(tmp_path):
    cache_path().write_text("{not json")
    calls = []
    choice = make_choice({"fused": 2.0, "library": 1.0}, calls)
    choice(torch.ones(3))
    assert calls[-1] == "library"
    stored = json.loads(cache_path().read_text())
    scope = next(iter(stored))
    stored[scope]["test_op"]["(5, torch.float32)"] = "removed_candidate"
    cache_path().write_text(json.dumps(stored))
    calls.clear()
    choice(torch.ones(5))
    assert calls[:2] == ["fused", "library"]  # an unknown cached name is timed again


# -- the ops' candidates: the same function, and the timed fastest kept -----------------------

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SEED = 77
N = 45  # no tile divides it
# (base kind, K): a dense and a general-layout NF4 base at a K no tile divides, and the row
# loader's layout (K a multiple of the 64-wide block).
LAYOUTS = [("dense", 72), ("nf4", 72), ("nf4_rows", 128)]
CASES = [(m, kind, k, torch.float32) for m in (1, 17, 130) for kind, k in LAYOUTS]
CASES += [(17, kind, k, torch.bfloat16) for kind, k in LAYOUTS]


def _ids(case):
    m, kind, k, dtype = case
    return f"m{m}-{kind}-k{k}-{str(dtype).removeprefix('torch.')}"


def make_base(kind: str, n: int, k: int, dtype: torch.dtype):
    """A base weight of ``kind`` and its float64 values."""
    weight = torch.randn(n, k, device=KERNEL_DEVICE) / k**0.5
    if kind == "dense":
        base = weight.to(dtype)
        return base, base.double()
    base = quantize_nf4(weight, blocksize=64, double_quant=True)
    assert base_kind(base) == kind
    return base, dequantize_nf4(base, torch.float32).double()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def assert_all_close(results: dict[str, torch.Tensor], expected: torch.Tensor, dtype: torch.dtype, what: str):
    """Every candidate against float64 and against each other, within the dtype's tolerance."""
    assert len(results) >= 2, f"{what}: only {list(results)}"
    tol = TOLERANCE[dtype]
    first_name, first = next(iter(results.items()))
    for name, value in results.items():
        assert value.dtype == dtype and value.shape == expected.shape, (what, name)
        assert rel_err(value, expected) <= tol, (what, name, rel_err(value, expected))
        assert rel_err(value, first.double()) <= tol, (what, name, "vs", first_name)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_lora_candidate_computes_the_same_function(case):
    m, kind, k, dtype = case
    p, scale, rank = 0.3, 0.7, 8
    base, w64 = make_base(kind, N, k, dtype)
    x = torch.randn(m, k, device=KERNEL_DEVICE).to(dtype)
    lora_a = (torch.randn(rank, k, device=KERNEL_DEVICE) / k**0.5).to(dtype)
    lora_b = torch.randn(N, rank, device=KERNEL_DEVICE).to(dtype)
    bias = torch.randn(N, device=KERNEL_DEVICE).to(dtype)
    keep = dropout_mask(SEED, m, k, p, KERNEL_DEVICE)
    dropped = torch.where(keep, x.double(), 0.0) / (1 - p)
    h64 = dropped @ lora_a.double().t()
    y64 = x.double() @ w64.t() + bias.double() + scale * h64 @ lora_b.double().t()
    args = (x, base, lora_a, lora_b, bias, scale, p, SEED)
    outputs = {c.name: c.run(*args) for c in lora_linear.forward_candidates(*args)}
    assert [*outputs] == plans.lora_forward_plan(m, N, k, kind, dtype, rank, p)
    assert_all_close({name: y for name, (y, _) in outputs.items()}, y64, dtype, "y")
    assert_all_close({name: h for name, (_, h) in outputs.items()}, h64, dtype, "h")
    # dX = dY·deq(W) + (dH·A) ⊙ mask/(1-p), every candidate from the same dH.
    grad_y = torch.randn(m, N, device=KERNEL_DEVICE).to(dtype)
    dh = (scale * grad_y.double() @ lora_b.double()).to(dtype)
    dx64 = grad_y.double() @ w64 + torch.where(keep, dh.double() @ lora_a.double(), 0.0) / (1 - p)
    dx_args = (grad_y, base, dh, lora_a, p, SEED)
    dxs = {c.name: c.run(*dx_args) for c in lora_linear.dx_candidates(*dx_args)}
    assert_all_close(dxs, dx64, dtype, "dx")


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_ia3_candidate_computes_the_same_function(case, scale_input):
    m, kind, k, dtype = case
    base, w64 = make_base(kind, N, k, dtype)
    x = torch.randn(m, k, device=KERNEL_DEVICE).to(dtype)
    scale = 1.0 + torch.randn(k if scale_input else N, device=KERNEL_DEVICE)
    bias = torch.randn(N, device=KERNEL_DEVICE).to(dtype)
    if scale_input:
        y64 = (x.double() * scale.double()) @ w64.t() + bias.double()
    else:
        y0_64 = x.double() @ w64.t() + bias.double()
        y64 = y0_64 * scale.double()
    args = (x, base, scale, bias, scale_input)
    outputs = {c.name: c.run(*args) for c in ia3.forward_candidates(*args)}
    assert [*outputs] == plans.ia3_forward_plan(m, N, k, kind, dtype, scale_input)
    assert_all_close({name: y for name, (y, _) in outputs.items()}, y64, dtype, "y")
    if not scale_input:
        assert_all_close({name: y0 for name, (_, y0) in outputs.items()}, y0_64, dtype, "y0")
    grad_y = torch.randn(m, N, device=KERNEL_DEVICE).to(dtype)
    saved = x if scale_input else outputs[next(iter(outputs))][1]
    if scale_input:
        grad_in = grad_y.double() @ w64
        dx64, dl64 = grad_in * scale.double(), (x.double() * grad_in).sum(0)
    else:
        dx64, dl64 = (grad_y.double() * scale.double()) @ w64, (grad_y.double() * saved.double()).sum(0)
    bwd_args = (grad_y, saved, base, scale, scale_input, True, True)
    grads = {c.name: c.run(*bwd_args) for c in ia3.backward_candidates(*bwd_args)}
    assert_all_close({name: dx for name, (dx, _) in grads.items()}, dx64, dtype, "dx")
    for name, (_, dl) in grads.items():
        assert dl.dtype == torch.float32 and rel_err(dl, dl64) <= TOLERANCE[dtype], (name, rel_err(dl, dl64))


def _op_arguments(op: str) -> tuple:
    """Operands of one op at M = 17 over a row-layout NF4 base (three or more candidates each)."""
    m, k, rank = 17, 128, 8
    base, _ = make_base("nf4_rows", N, k, torch.float32)
    x = torch.randn(m, k, device=KERNEL_DEVICE)
    if op == "lora_forward":
        lora_a, lora_b = torch.randn(rank, k, device=KERNEL_DEVICE), torch.randn(N, rank, device=KERNEL_DEVICE)
        return (x, base, lora_a, lora_b, None, 0.5, 0.2, SEED)
    if op == "lora_dx":
        grad_y, dh = torch.randn(m, N, device=KERNEL_DEVICE), torch.randn(m, rank, device=KERNEL_DEVICE)
        return (grad_y, base, dh, torch.randn(rank, k, device=KERNEL_DEVICE), 0.2, SEED)
    scale = 1.0 + torch.randn(N, device=KERNEL_DEVICE)
    if op == "ia3_forward":
        return (x, base, scale, None, False)
    return (torch.randn(m, N, device=KERNEL_DEVICE), torch.randn(m, N, device=KERNEL_DEVICE), base, scale, False,
            True, True)  # fmt: skip


OP_CHOICES = {
    "lora_forward": lora_linear.FORWARD_CHOICE,
    "lora_dx": lora_linear.DX_CHOICE,
    "ia3_forward": ia3.FORWARD_CHOICE,
    "ia3_backward": ia3.BACKWARD_CHOICE,
}


def _flat(result) -> list[torch.Tensor]:
    return [t for t in (result if isinstance(result, tuple) else (result,)) if t is not None]


@pytest.mark.parametrize("op", list(OP_CHOICES))
def test_each_op_keeps_the_candidate_timed_fastest(op):
    """The op's own bucket and candidates in a Choice with injected timings: the fastest is kept."""
    args = _op_arguments(op)
    op_choice = OP_CHOICES[op]
    names = [c.name for c in op_choice.candidates(*args)]
    assert len(names) >= 3 and plans.LIBRARY in names
    ran: list[str] = []

    def candidates(*call_args):
        spied = lambda c: Candidate(c.name, lambda *a: (ran.append(c.name), c.run(*a))[1])
        return [spied(c) for c in op_choice.candidates(*call_args)]

    def timer(run):
        before = len(ran)
        run()
        return timings[ran[before]]

    for fastest in names:
        timings = {name: (1.0 if name == fastest else 2.0 + i) for i, name in enumerate(names)}
        ran.clear()
        choice = Choice(op, op_choice.bucket, candidates, timer=timer, timeable=lambda a: True,
                        device_name=lambda a, name=fastest: f"Fake GPU {name}")  # fmt: skip
        result = choice(*args)
        assert ran == [*names, fastest]  # each timed once, then the fastest run
        expected = next(c for c in op_choice.candidates(*args) if c.name == fastest).run(*args)
        for got, want in zip(_flat(result), _flat(expected), strict=True):
            assert torch.equal(got, want)
    # Off the GPU (CPU tensors), the op's own choice runs the plan's first candidate, untimed.
    assert not op_choice.timeable(args)
    assert op_choice.choose(*args).name == names[0]
