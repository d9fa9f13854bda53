"""The plans (peft_fast/kernels/plans.py) against the static Hopper report's predictions.

The report costs each candidate of a plan as its own op, ``"<op>:<candidate> M=.. N=.. K=.."``
(the op run with that candidate forced). For every shape with predictions of two or more of the
plan's candidates, the plan's first must be the one predicted fastest; every switch point must
have predictions on both sides (the last M bucket before it and the first after it), so that the
switch is where the predictions cross.

Predictions come from the committed baseline (``bench/hopper/baseline-triton-3.9.json``) and from
any fresh report named in ``PEFT_FAST_HOPPER_REPORT`` (paths separated by ``os.pathsep``), which
override the baseline. Without candidate ops in either, the checks are skipped, naming the ops the
report must add.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from peft_fast.kernels import plans

BASELINE = Path(__file__).resolve().parents[1] / "bench" / "hopper" / "baseline-triton-3.9.json"
RANK, DROPOUT = 16, 0.1  # the report's LoRA shapes
BLOCKSIZE = 64  # the report's NF4 blocksize


def _kind(base: str, k: int) -> str:
    if base == "dense":
        return "dense"
    return "nf4_rows" if k % BLOCKSIZE == 0 else "nf4"


# report op -> its plan at (M, N, K, base kind)
PLAN_OF = {
    "qlora_forward": lambda m, n, k, kind: plans.lora_forward_plan(m, n, k, kind, torch.bfloat16, RANK, DROPOUT),
    "lora_forward": lambda m, n, k, kind: plans.lora_forward_plan(m, n, k, kind, torch.bfloat16, RANK, DROPOUT),
    "qlora_dx": lambda m, n, k, kind: plans.lora_dx_plan(m, n, k, kind, torch.bfloat16, RANK, DROPOUT),
    "lora_dx": lambda m, n, k, kind: plans.lora_dx_plan(m, n, k, kind, torch.bfloat16, RANK, DROPOUT),
    "qlora_backward": lambda m, n, k, kind: plans.lora_dh_db_plan(m, n, torch.bfloat16, RANK),
    "ia3_forward_out": lambda m, n, k, kind: plans.ia3_forward_plan(m, n, k, kind, torch.bfloat16, False),
    "ia3_forward_in": lambda m, n, k, kind: plans.ia3_forward_plan(m, n, k, kind, torch.bfloat16, True),
    "ia3_backward_out": lambda m, n, k, kind: plans.ia3_backward_plan(m, n, k, kind, torch.bfloat16, False),
    "ia3_backward_in": lambda m, n, k, kind: plans.ia3_backward_plan(m, n, k, kind, torch.bfloat16, True),
}

# (switch point, report op, base kind, M of the last bucket before it, M of the first bucket after it)
SWITCH_POINTS = [
    ("SMALL_M_MAX", "qlora_forward", "nf4_rows", plans.SMALL_M_MAX, 2 * plans.SMALL_M_MAX),
    (
        "IA3_FORWARD_DEQUANT_MIN_M",
        "ia3_forward_out",
        "nf4_rows",
        plans.IA3_FORWARD_DEQUANT_MIN_M // 2,
        plans.IA3_FORWARD_DEQUANT_MIN_M,
    ),
    ("ROWS_MIN_M", "qlora_forward", "nf4_rows", plans.ROWS_MIN_M // 2, plans.ROWS_MIN_M),
    (
        "LIBRARY_ACCUMULATE_MIN_M",
        "qlora_forward",
        "nf4_rows",
        plans.LIBRARY_ACCUMULATE_MIN_M // 2,
        plans.LIBRARY_ACCUMULATE_MIN_M,
    ),
    ("DH_DB_FUSED_MIN_M", "qlora_backward", "nf4_rows", plans.DH_DB_FUSED_MIN_M // 2, plans.DH_DB_FUSED_MIN_M),
    ("DX_LIBRARY_MIN_M", "qlora_dx", "nf4_rows", plans.DX_LIBRARY_MIN_M // 2, plans.DX_LIBRARY_MIN_M),
    (
        "IA3_DX_DEQUANT_MIN_M",
        "ia3_backward_in",
        "nf4_rows",
        plans.IA3_DX_DEQUANT_MIN_M // 2,
        plans.IA3_DX_DEQUANT_MIN_M,
    ),
]
SHAPE = (4096, 4096)  # N, K of the switch-point checks


def _reports() -> list[dict]:
    found = [json.loads(BASELINE.read_text())] if BASELINE.exists() else []
    for path in filter(None, os.environ.get("PEFT_FAST_HOPPER_REPORT", "").split(os.pathsep)):
        found.append(json.loads(Path(path).read_text()))
    return found


def predictions() -> dict[tuple[str, str, int, int, int], float]:
    """{(report op, base kind, M, N, K): {candidate: predicted µs}} for every candidate op in the reports."""
    table: dict = {}
    for report in _reports():
        for op in report["ops"]:
            name, _, candidate = op["op"].partition(":")
            if not candidate or name not in PLAN_OF or op.get("predicted_us") is None:
                continue
            key = (name, _kind(op["base"], op["K"]), op["M"], op["N"], op["K"])
            table.setdefault(key, {})[candidate] = op["predicted_us"]
    return table


def _missing(op: str, kind: str, ms: tuple[int, ...]) -> list[str]:
    n, k = SHAPE
    return [f"{op}:{c} M={m} N={n} K={k}" for m in ms for c in PLAN_OF[op](m, n, k, kind)]


def test_plan_heads_are_the_predicted_fastest():
    table = predictions()
    if not table:
        ops = sorted({op for _, op, kind, lo, hi in SWITCH_POINTS for op in _missing(op, kind, (lo, hi))})
        pytest.skip(f"no candidate ops in the report; add: {', '.join(ops)}")
    checked = 0
    for (op, kind, m, n, k), times in sorted(table.items()):
        plan = PLAN_OF[op](m, n, k, kind)
        known = [c for c in plan if c in times]
        if len(known) < 2:
            continue
        fastest = min(known, key=times.get)
        assert known[0] == fastest, f"{op} M={m} N={n} K={k} ({kind}): plan {plan}, predicted {times}"
        checked += 1
    assert checked


@pytest.mark.parametrize("switch,op,kind,below,above", SWITCH_POINTS, ids=[f"{s[0]}-{s[1]}" for s in SWITCH_POINTS])
def test_switch_points_are_where_the_predictions_cross(switch, op, kind, below, above):
    n, k = SHAPE
    table = predictions()
    plan_below, plan_above = PLAN_OF[op](below, n, k, kind), PLAN_OF[op](above, n, k, kind)
    assert plan_below[0] != plan_above[0], f"{switch}: the plan does not switch between M={below} and M={above}"
    leaving, arriving = plan_below[0], plan_above[0]
    sides = {m: table.get((op, kind, m, n, k), {}) for m in (below, above)}
    # Below the switch the leaving candidate wins; above it the arriving one wins over everything
    # it can be compared with (the leaving one, when the plan still lists it).
    wanted = {below: [leaving, arriving], above: [arriving, *([leaving] if leaving in plan_above else [])]}
    missing = [f"{op}:{c} M={m} N={n} K={k}" for m, cands in wanted.items() for c in cands if c not in sides[m]]
    if missing:
        pytest.skip(f"{switch}: the report lacks {', '.join(missing)}")
    assert sides[below][leaving] <= sides[below][arriving], (switch, below, sides[below])
    if leaving in plan_above:
        assert sides[above][arriving] <= sides[above][leaving], (switch, above, sides[above])


def test_switch_points_are_powers_of_two():
    """A timed choice is kept per power-of-two M bucket (plans.choice_bucket): no bucket may straddle a switch."""
    for name in (
        "SMALL_M_MAX",
        "ROWS_MIN_M",
        "LIBRARY_ACCUMULATE_MIN_M",
        "DH_DB_FUSED_MIN_M",
        "DX_LIBRARY_MIN_M",
        "IA3_DX_DEQUANT_MIN_M",
        "IA3_FORWARD_DEQUANT_MIN_M",
    ):
        value = getattr(plans, name)
        assert value & (value - 1) == 0, name
    n, k = SHAPE
    for plan in (plans.lora_forward_plan, plans.lora_dx_plan):
        for kind in plans.BASE_KINDS:
            for m in range(1, 5000):
                bucket_top = plans.choice_bucket(m)[0]
                args = (n, k, kind, torch.bfloat16, RANK, DROPOUT)
                assert plan(m, *args) == plan(bucket_top, *args), (plan.__name__, kind, m)
