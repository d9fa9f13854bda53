"""The CI ratchet on the Hopper report: predicted/floor ratios may not get worse, K-loops may not spill.

Also :func:`recompile_mismatches`, the check of ``python -m tools.hopper.report --recompile``.

:func:`compare` fails an op whose ratio exceeds its baseline's by more than ``tolerance``
(relative: 3 % by default) and any launch with a loop whose binary has a stack frame
(``spill_bytes > 0``); ops the baseline lacks are noted, not failed. Pure data, no Triton.
"""

from __future__ import annotations

from typing import Any

TOLERANCE = 0.03
RECOMPILE_INSTR_TOLERANCE = 0.10  # K-loop instructions may differ this much on recompiling (relative)


def op_key(op: dict[str, Any]) -> str:
    """Identity of an op across reports (the ``id`` key, or its name and shape)."""
    return op.get("id") or f"{op['op']} M={op['M']} N={op['N']} K={op['K']}"


def spilling_launches(op: dict[str, Any]) -> list[str]:
    """Launches of ``op`` that have a loop and spill (stack frame > 0)."""
    out = []
    for launch in op.get("launches", []):
        has_loop = launch.get("has_loop", (launch.get("loop_trips") or 0) > 1)
        if launch.get("signature") is not None and has_loop and (launch.get("spill_bytes") or 0) > 0:
            out.append(
                f"{op_key(op)}: {launch['kernel']} spills ({launch['spill_bytes']} B stack) in a kernel with a loop"
            )
    return out


def compare(
    report: dict[str, Any], baseline: dict[str, Any] | None, tolerance: float = TOLERANCE
) -> tuple[list[str], list[str]]:
    """(failures, notes) of ``report`` against ``baseline`` (None: only the spill check)."""
    failures: list[str] = []
    notes: list[str] = []
    base_ops = {op_key(op): op for op in (baseline or {}).get("ops", [])}
    for op in report.get("ops", []):
        key = op_key(op)
        failures += spilling_launches(op)
        ratio = op.get("ratio")
        if baseline is None:
            continue
        if key not in base_ops:
            notes.append(f"{key}: not in the baseline (ratio {ratio})")
            continue
        base_ratio = base_ops[key].get("ratio")
        if ratio is None:
            failures.append(f"{key}: no prediction (baseline ratio {base_ratio})")
        elif base_ratio is not None and ratio > base_ratio * (1 + tolerance):
            failures.append(
                f"{key}: ratio {ratio:.3f} is worse than the baseline's {base_ratio:.3f} by more than {tolerance:.0%}"
            )
        elif base_ratio is not None and ratio < base_ratio * (1 - tolerance):
            notes.append(
                f"{key}: ratio {ratio:.3f} improved on the baseline's {base_ratio:.3f}: regenerate the baseline"
            )
    if baseline is not None:
        for key in base_ops.keys() - {op_key(op) for op in report.get("ops", [])}:
            notes.append(f"{key}: in the baseline but not in this report")
    return failures, notes


def recompile_mismatches(launch: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """How a recompile (``sm90.analyse`` output) differs from the report's ``launch``.

    The K-loop's instruction count may move by ±10 %; registers and shared memory must be equal.
    """
    name = launch["kernel"]
    if got.get("error"):
        return [f"{name}: does not compile: {got['error']}"]
    problems = []
    want_instr, got_instr = launch["kloop_instr_per_warp"], got["sass"]["kloop_instr"]
    if abs(got_instr - want_instr) > RECOMPILE_INSTR_TOLERANCE * want_instr:
        problems.append(f"{name}: K-loop {got_instr} instructions vs {want_instr} in the report")
    if got["regs"] != launch["regs"]:
        problems.append(f"{name}: {got['regs']} registers vs {launch['regs']} in the report")
    if got["smem"] != launch["smem"]:
        problems.append(f"{name}: {got['smem']} B shared memory vs {launch['smem']} in the report")
    return problems
