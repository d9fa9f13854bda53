"""Turn captured launches and their compiled analyses into the report's launch and op objects.

For a Triton launch every candidate (autotune config) is costed with :mod:`cost_model`; the one
with the lowest predicted time is what the autotuner would pick if the model were right, and
its numbers fill the launch object (the others go to ``configs_considered``). Library calls are
costed at roofline. An op's prediction is the sum over its launches plus a launch gap per launch
after the first; LoRA-linear ops also carry what PEFT + bitsandbytes' layer would take
(:mod:`tools.hopper.peft_bnb`) and their speedup over it.
"""

from __future__ import annotations

import math
from typing import Any

from tools.hopper import cost_model, peft_bnb, trip_count, ttir
from tools.hopper.cases import OpCase
from tools.hopper.cost_model import H200, KernelCost, predict_launch
from tools.hopper.launch_capture import Candidate, Launch, TensorInfo
from tools.hopper.sm90 import resolve

# Keys every launch object carries (library calls have None for the compile-only ones).
LAUNCH_KEYS = (
    "kernel",
    "signature",
    "constexprs",
    "divisible_by_16",
    "num_warps",
    "num_stages",
    "options",
    "grid",
    "loop_trips",
    "ctas_per_sm",
    "regs",
    "spill_bytes",
    "smem",
    "hgmma",
    "kloop_instr_per_warp",
    "predicted_us",
)
OP_KEYS = ("op", "M", "N", "K", "r", "dtype", "base", "dropout", "floor_us", "predicted_us", "ratio", "launches")
# The cost terms every Triton launch object carries (cost_model.LaunchPrediction), per CTA unless said.
TERM_KEYS = ("smem_cycles_per_cta", "gather_cycles_per_cta", "fill_cycles", "epilogue_cycles", "lone_groups",
             "l2_us", "l2_bytes")  # fmt: skip


class ReportError(RuntimeError):
    """A launch the report cannot cost (compile failure in every config, unknown loop bounds)."""


def _round(value: float | None, digits: int = 3) -> float | None:
    if value is None or math.isinf(value) or math.isnan(value):
        return None
    return round(value, digits)


def gather_wavefronts(cand: Candidate, loads: dict[str, Any]) -> tuple[int, int]:
    """(per K-loop trip, once) L1 wavefronts of a CTA's data-dependent gathers; table sizes from the launch."""
    per_trip = once = 0
    for raw in loads.get("gathers", []):
        gather = ttir.Gather(**raw)
        table = cand.args.get(gather.table) if gather.table else None
        waves = ttir.gather_wavefronts(gather, table.nbytes if isinstance(table, TensorInfo) else None)
        if gather.in_kloop:
            per_trip += waves
        else:
            once += waves
    return per_trip, once


def cost_candidate(launch: Launch, cand: Candidate, analysis: dict[str, Any]) -> dict[str, Any]:
    """One candidate's numbers: compile facts, trips and the model's prediction."""
    row: dict[str, Any] = {"config": cand.config, "spec_hash": None, "error": analysis.get("error")}
    if analysis.get("error"):
        row["predicted_us"] = None
        return row
    sass = analysis["sass"]
    kernel = resolve(cand.spec.kernel)
    trips, loop = trip_count.main_loop(kernel, cand.args, cand.grid)
    if not sass["has_loop"]:
        trips = 1  # no loop in the SASS (none in the source, or fully unrolled): the body counts once
    trips, extra_instr, extra_flops, loop_trips = _other_mma_loops(kernel, cand, sass, trips)
    loads = analysis.get("loads") or {}
    gather_trip, gather_once = gather_wavefronts(cand, loads)
    in_loop = sass["has_loop"]  # without a SASS loop, the TTIR's loop loads count once like the body
    cost = KernelCost(
        num_warps=analysis["num_warps"],
        regs=analysis["regs"],
        smem=analysis["smem"],
        kloop_instr=sass["kloop_instr"],
        other_instr=(sass["body_instr"] - sass["kloop_instr"] if sass["has_loop"] else 0) + extra_instr,
        kloop_mma_flops=sass["kloop_mma_flops"],
        other_mma_flops=sass["other_mma_flops"] + extra_flops,
        trips=trips,
        wgmma_wait=sass["wgmma_wait"],
        kloop_smem_bytes=sass.get("kloop_smem_bytes", 0) if in_loop else 0,
        other_smem_bytes=sass.get("other_smem_bytes", 0) if in_loop else sass.get("kloop_smem_bytes", 0),
        kloop_gather_wavefronts=gather_trip if in_loop else 0,
        other_gather_wavefronts=gather_once + (0 if in_loop else gather_trip),
        kloop_load_bytes=loads.get("kloop_load_bytes", 0) if in_loop else 0,
        other_load_bytes=loads.get("other_load_bytes", 0) + (0 if in_loop else loads.get("kloop_load_bytes", 0)),
        store_bytes=sass.get("store_bytes", 0),
        num_stages=cand.spec.num_stages,
        has_loop=in_loop,
    )
    nbytes = launch.tensor_bytes(cand)
    pred = predict_launch(cost, cand.grid, nbytes)
    dots = analysis.get("dots") or []
    row.update(
        predicted_us=_round(pred.predicted_us),
        compute_us=_round(pred.compute_us),
        memory_us=_round(pred.memory_us),
        bound=pred.bound,
        fits=pred.fits,
        ctas=pred.ctas,
        ctas_per_sm=pred.ctas_per_sm,
        waves=pred.waves,
        issue_cycles_per_cta=_round(pred.issue_cycles, 1),
        mma_cycles_per_cta=_round(pred.mma_cycles, 1),
        smem_cycles_per_cta=_round(pred.smem_cycles, 1),
        gather_cycles_per_cta=_round(pred.gather_cycles, 1),
        fill_cycles=_round(pred.fill_cycles, 1),
        epilogue_cycles=_round(pred.epilogue_cycles, 1),
        lone_groups=pred.lone_groups,
        l2_us=_round(pred.l2_us),
        l2_bytes=pred.l2_bytes,
        kloop_smem_bytes=cost.kloop_smem_bytes,
        kloop_gather_wavefronts=cost.kloop_gather_wavefronts,
        kloop_load_bytes=cost.kloop_load_bytes,
        store_bytes=cost.store_bytes,
        gathers=loads.get("gathers", []),
        loop_trips=trips,
        loop_source=f"{loop.where} {loop.source}" if loop else None,
        mma_loop_trips=loop_trips,
        regs=analysis["regs"],
        spill_bytes=analysis["stack_bytes"],
        smem=analysis["smem"],
        kloop_instr_per_warp=sass["kloop_instr"],
        body_instr_per_warp=sass["body_instr"],
        kloop_spill_ops=sass["kloop_spill_ops"],
        has_loop=sass["has_loop"],
        hgmma=sass["hgmma"],
        hmma=sass["hmma"],
        cp_async=sass["cp_async"],
        tma=sass["tma"],
        wgmma_wait=sass["wgmma_wait"],
        mma_flops=cost.kloop_mma_flops * trips * pred.ctas + cost.other_mma_flops * pred.ctas,
        bytes=nbytes,
        m_tile=max((d[0] for d in dots), default=None),
        dots=[list(d) for d in dots],
        kloop_opcodes=sass["opcode_histogram"],
        sass_file=f"sass/{analysis['sass_file']}" if analysis.get("sass_file") else None,  # relative to the report
    )
    return row


def _other_mma_loops(kernel, cand: Candidate, sass: dict[str, Any], trips: int) -> tuple[int, int, int, list]:
    """(K-loop trips, extra instructions, extra MMA FLOPs, [trips of each MMA loop]) per CTA.

    "Every other instruction once" undercounts a kernel with several MMA loops in sequence (a
    two-pass kernel). When the SASS has as many innermost MMA loops as the source has innermost
    ``tl.dot`` loops, they are paired in order and each loop beyond the K-loop adds its
    instructions and MMA FLOPs (trips - 1) more times; otherwise nothing changes.
    """
    mma_loops = sass.get("mma_loops") or []
    index = sass.get("kloop_index")
    if not sass["has_loop"] or index is None or len(mma_loops) < 2:
        return trips, 0, 0, []
    source = trip_count.dot_loops(kernel, cand.args, cand.grid)
    if len(source) != len(mma_loops) or any(loop.total is None for loop in source):
        return trips, 0, 0, []
    extra_instr = extra_flops = 0
    for i, ((instr, flops), loop) in enumerate(zip(mma_loops, source, strict=True)):
        if i != index:
            extra_instr += instr * (loop.total - 1)
            extra_flops += flops * (loop.total - 1)
    return int(source[index].total), extra_instr, extra_flops, [int(loop.total) for loop in source]


def triton_launch(launch: Launch, analyses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The launch object of a Triton launch: its best candidate, plus every candidate considered."""
    rows = []
    for cand in launch.candidates:
        row = cost_candidate(launch, cand, analyses[cand.spec.key()])
        row["spec_hash"] = cand.spec.short_hash()
        rows.append((cand, row))
    costed = [(c, r) for c, r in rows if r.get("predicted_us") is not None]
    if not costed:
        errors = "; ".join(sorted({str(r.get("error") or "does not fit") for _, r in rows}))
        raise ReportError(f"{launch.kernel}: no config can be costed ({errors})")
    cand, best = min(costed, key=lambda cr: cr[1]["predicted_us"])
    spec = cand.spec
    out: dict[str, Any] = {
        "kernel": spec.kernel,
        "signature": spec.signature,
        "constexprs": spec.constexprs,
        "divisible_by_16": spec.divisible_by_16,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "options": spec.options,
        "grid": list(cand.grid),
    }
    for key in LAUNCH_KEYS:  # the contract's keys, in its order; the spec part is set above
        if key not in out:
            out[key] = best[key]
    for key, value in best.items():
        if key not in out and key not in ("config", "error"):
            out[key] = value
    out["config"] = cand.config
    out["configs_considered"] = [
        {
            k: r.get(k)
            for k in (
                "config",
                "predicted_us",
                "bound",
                "regs",
                "spill_bytes",
                "smem",
                "ctas_per_sm",
                "kloop_instr_per_warp",
                "wgmma_wait",
                "loop_trips",
                "smem_cycles_per_cta",
                "gather_cycles_per_cta",
                "l2_us",
                "error",
                "spec_hash",
            )
        }
        for _, r in rows
    ]
    return out


def library_launch(launch: Launch) -> dict[str, Any]:
    """A library call the launcher makes itself (torch.mm, a cast, a sum): costed at roofline."""
    out: dict[str, Any] = dict.fromkeys(LAUNCH_KEYS)
    out.update(
        kernel=launch.kernel,
        predicted_us=_round(cost_model.roofline_us(launch.flops, launch.bytes)),
        flops=launch.flops,
        bytes=launch.bytes,
        shapes=[list(s) for s in launch.shapes],
        bound="library (roofline)",
    )
    return out


def op_object(case: OpCase, launches: list[Launch], analyses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's object for one op."""
    objs = [triton_launch(la, analyses) if la.kind == "triton" else library_launch(la) for la in launches]
    gaps = cost_model.launch_gaps_us(len(objs))
    predicted = sum(o["predicted_us"] for o in objs) + gaps
    floor_flops = case.floor_flops if case.floor_flops is not None else case.flops
    floor_bytes = 0.0 if case.floor_flops is not None else case.bytes
    floor = cost_model.roofline_us(floor_flops, floor_bytes)
    op: dict[str, Any] = {
        "id": case.id,
        "op": case.op,
        "M": case.M,
        "N": case.N,
        "K": case.K,
        "r": case.r,
        "dtype": case.dtype,
        "base": case.base,
        "dropout": case.dropout,
        "floor_us": _round(floor),
        "predicted_us": _round(predicted),
        "ratio": _round(predicted / floor, 4) if floor > 0 else None,
        "n_launches": len(objs),
        "launch_gaps_us": _round(gaps),
        "flops": case.flops,
        "bytes": case.bytes,
        "floor_basis": "2·M·N·K at the bf16 rate" if case.floor_flops is not None else "max(FLOPs/bf16, bytes/HBM)",
    }
    if case.bandwidth == "hbm":
        op["hbm_fraction"] = _round(case.bytes / (predicted * 1e-6) / H200.hbm_bytes_per_s, 4)
    if case.bandwidth == "copy":
        op["copy_fraction"] = _round(case.bytes / (predicted * 1e-6) / H200.copy_bytes_per_s, 4)
    baseline = peft_bnb.layer_for(case)
    if baseline is not None:
        op["peft_bnb_us"] = _round(baseline.predicted_us)
        op["speedup_vs_peft_bnb"] = _round(baseline.predicted_us / predicted, 4) if predicted > 0 else None
        op["peft_bnb_launches"] = baseline.rows()
    if case.goal:
        op["goal"] = {
            "kind": case.goal.kind,
            "target": case.goal.target,
            "text": case.goal.describe(),
            "met": case.goal.met(op),
        }
    if case.note:
        op["note"] = case.note
    op["launches"] = objs
    return op


def global_goals(ops: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals over every launch: no K-loop spills; HGMMA in every GEMM with an M-tile of 64 or more."""
    spills, no_hgmma = [], []
    for op in ops:
        for la in op["launches"]:
            if la.get("signature") is None:
                continue
            if la.get("has_loop") and (la["spill_bytes"] or la.get("kloop_spill_ops")):
                spills.append(
                    f"{op['id']}: {la['kernel']} ({la['spill_bytes']} B stack, "
                    f"{la.get('kloop_spill_ops')} LDL/STL in the K-loop)"
                )
            if (la.get("m_tile") or 0) >= 64 and not la["hgmma"]:
                no_hgmma.append(f"{op['id']}: {la['kernel']} (M-tile {la['m_tile']})")
    return {
        "no_kloop_spills": {"text": "no spills in any kernel with a K-loop", "met": not spills, "violations": spills},
        "hgmma_when_m_tile_ge_64": {
            "text": "HGMMA in every GEMM with an M-tile ≥ 64",
            "met": not no_hgmma,
            "violations": no_hgmma,
        },
    }
