"""Tests of the backward's fused dH / dB pass (peft_fast/kernels/lora_dh_db.py, op ``lora_dh_db``).

The fused pass (dY read once) against the two library GEMMs and float64, on odd shapes in every
dtype, with poisoned buffers; through ``lora_linear_backward`` when the plan picks it; NaN kept at
scale 0 as the library path keeps it; ranks past one tile refused and left to the library.
"""

from __future__ import annotations

import pytest
import torch

from peft_fast.kernels import lora_dh_db, plans
from peft_fast.kernels import lora_linear as kernels
from peft_fast.kernels.lora_dh_db import lora_dh_db_library, lora_dh_db_triton
from peft_fast.nf4 import quantize_nf4

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def operands(m, n, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    return make(m, n), make(m, rank), make(n, rank)


def float64(grad_y, h, lora_b, scale):
    dy = grad_y.double()
    return scale * (dy @ lora_b.double()), scale * (dy.t() @ h.double())


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the fused pass allocates starts as NaN: an unwritten element would show."""
    real = lora_dh_db._empty
    monkeypatch.setattr(lora_dh_db, "_empty", lambda *a: real(*a).fill_(float("nan")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m, n, rank", [(1, 64, 16), (37, 70, 5), (130, 200, 16), (257, 33, 64), (16, 256, 3)])
def test_fused_matches_float64_and_the_library(m, n, rank, dtype, poisoned):
    grad_y, h, lora_b = operands(m, n, rank, dtype, seed=m * n + rank)
    dh, db = lora_dh_db_triton(grad_y, h, lora_b, 0.7)
    dh64, db64 = float64(grad_y, h, lora_b, 0.7)
    lib_dh, lib_db = lora_dh_db_library(grad_y, h, lora_b, 0.7)
    assert dh.dtype == db.dtype == dtype and dh.shape == (m, rank) and db.shape == (n, rank)
    # The interpreter truncates fp32 -> bf16 where a GPU rounds: up to twice the library's error there.
    assert rel_err(dh, dh64) <= TOLERANCE[dtype] and rel_err(db, db64) <= TOLERANCE[dtype]
    assert rel_err(dh, lib_dh.double()) <= 2 * TOLERANCE[dtype]
    assert rel_err(db, lib_db.double()) <= 2 * TOLERANCE[dtype]
    # A fixed-order reduction: the same inputs give the same bits.
    again = lora_dh_db_triton(grad_y, h, lora_b, 0.7)
    assert torch.equal(dh, again[0]) and torch.equal(db, again[1])


def test_a_nan_in_dy_stays_nan_at_scale_zero():
    grad_y, h, lora_b = operands(8, 32, 2, torch.float32)
    grad_y[3, 5] = float("nan")
    dh, db = lora_dh_db_triton(grad_y, h, lora_b, 0.0)
    lib_dh, lib_db = lora_dh_db_library(grad_y, h, lora_b, 0.0)
    assert torch.equal(dh.isnan(), lib_dh.isnan()) and dh[3].isnan().all() and dh.isnan().sum() == 2
    assert torch.equal(db.isnan(), lib_db.isnan()) and db[5].isnan().all() and db.isnan().sum() == 2


def test_ranks_past_one_tile_are_refused_and_planned_to_the_library():
    grad_y, h, lora_b = operands(4, 32, plans.DH_DB_MAX_RANK + 1, torch.float32)
    with pytest.raises(ValueError, match="ranks up to"):
        lora_dh_db_triton(grad_y, h, lora_b, 1.0)
    assert plans.lora_dh_db_plan(4096, 4096, torch.bfloat16, plans.DH_DB_MAX_RANK + 1) == [plans.LIBRARY]
    assert plans.lora_dh_db_plan(4096, 4096, torch.bfloat16, 16)[0] == plans.FUSED
    assert plans.lora_dh_db_plan(plans.DH_DB_FUSED_MIN_M // 2, 4096, torch.bfloat16, 16)[0] == plans.LIBRARY


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_takes_the_fused_pass_where_planned(monkeypatch, dtype):
    calls = []
    for name, run in list(lora_dh_db._IMPLEMENTATIONS.items()):
        monkeypatch.setitem(lora_dh_db._IMPLEMENTATIONS, name, lambda *a, _n=name, _r=run: calls.append(_n) or _r(*a))
    m, k, n, rank = 48, 64, 80, 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    base = quantize_nf4(torch.randn(n, k, generator=g).to(DEVICE) / 8, blocksize=64, double_quant=True)
    lora_a = (torch.randn(rank, k, generator=g) / 8).to(DEVICE, dtype)
    lora_b = torch.randn(n, rank, generator=g).to(DEVICE, dtype)
    grad_y = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    _, h = kernels.lora_linear_forward(x, base, lora_a, lora_b, None, 0.5, 0.2, 99)
    args = (grad_y, x, h, base, lora_a, lora_b, 0.5, 0.2, 99, True, True, True)
    for fused_from, expected in ((16, plans.FUSED), (4096, plans.LIBRARY)):
        monkeypatch.setattr(plans, "DH_DB_FUSED_MIN_M", fused_from)
        calls.clear()
        dx, da, db = kernels.lora_linear_backward(*args)
        assert calls == [expected]
        if expected == plans.FUSED:
            fused = (dx, da, db)
    for got, want in zip(fused, (dx, da, db), strict=True):
        assert rel_err(got, want.double()) <= 2 * TOLERANCE[dtype]
    # dB alone (no dX, no dA) needs no dH: one library GEMM, no choice.
    calls.clear()
    monkeypatch.setattr(plans, "DH_DB_FUSED_MIN_M", 16)
    only_db = kernels.lora_linear_backward(*args[:9], False, False, True)
    assert calls == [] and only_db[0] is None and only_db[1] is None
    assert rel_err(only_db[2], db.double()) <= 2 * TOLERANCE[dtype]
