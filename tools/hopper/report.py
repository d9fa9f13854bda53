"""Static Hopper (sm_90) cost report of peft_fast's hot ops: compile-time lower bounds, no GPU.

For each op at Llama shapes (the report cases of ``tools.hopper.ops.REGISTRY``) the public
launcher is called on fake CUDA tensors while every kernel launch, every autotune config the
autotuner would time (after its pruning) and every torch op the launcher runs itself are
recorded (launch_capture.py; the modules named here are in ``tools/hopper/``). Each distinct
binary is compiled for sm_90 exactly as the JIT would specialise it (sm90.py: the JIT's own
binder; 512-byte aligned tensors; ints divisible by 16 or equal to 1 specialised), and its cubin
read (sass.py): registers, stack (spills), shared memory, HGMMA / HMMA, cp.async, TMA, the
K-loop's instructions per warp (innermost backward-branch loop holding the MMA) and the wgmma
wait depth. trip_count.py reads the K-loop's trips per CTA from the kernel source and the
launch's arguments.

Cost model (cost_model.py, whose docstring states every figure and its source; a lower bound):
H200 ceilings, clock 1.98 GHz, 132 SMs, bf16 790 TFLOP/s (cuBLAS, measured), HBM = measured copy
rate 4.3 TB/s (read + write), i.e. 3,023 MMA FLOP per SM per clock; shared memory 128 B/clk/SM;
leads: L2 10.75 TB/s, load latency 700 cycles, 1.5 µs between dependent launches. Per CTA: issue
cycles = (K-loop instructions × trips + the other instructions once) × num_warps / 4; MMA cycles =
MMA FLOPs / 3,023; smem cycles = shared-memory bytes (SASS widths, wgmma operands) / 128 + the
wavefronts of data-dependent gathers (ttir.py). c resident CTAs take max(c·issue, c·MMA, c·smem)
(issue + MMA when the K-loop drains wgmma); a CTA alone on its SM adds its pipeline fill and its
epilogue's stores; the busiest SM runs ceil(CTAs / 132) CTAs in such groups. Memory bounds: each
tensor argument once at the HBM rate, and every CTA's loads at the L2 rate. Launch = max(compute,
HBM, L2); torch calls at roofline; autotuned launches take their best config; op = sum of launches
+ 1.5 µs per launch after the first. Floors: max(op FLOPs / bf16 rate, fewest bytes / HBM rate);
the backward's floor is one dense M×N×K GEMM (2MNK / rate). QLoRA ops also carry PEFT +
bitsandbytes' layer costed the same way (peft_bnb.py) and their speedup over it.

Usage (from the repository root):
    python -m tools.hopper.report --out DIR [--baseline JSON] [--ops SUBSTR,...] [--jobs 2]
    python -m tools.hopper.report --out DIR --write-baseline     # bench/hopper/baseline-triton-X.Y.json
    python -m tools.hopper.report --recompile DIR/hopper-report.json [MORE.json ...]

Writes DIR/hopper-report.json, DIR/hopper-report.md and DIR/sass/*.sass. Exit 1 when the ratchet
fails (an op's ratio worse than the baseline's by more than 3 %, or a kernel with a loop that
spills), when a launch cannot be costed, or when --recompile finds a mismatch or is given a report
that another toolchain wrote (its Triton or ptxas version differs: the same spec then assembles to
other SASS); goals not met are reported, not failures.
"""

from __future__ import annotations

import os

# The kernel modules choose their autotune configs at import time (the interpreter's single tiny
# config vs the GPU's list), and the interpreter never compiles: it must be off before any import.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns when unset; "1" is its current default (the JIT's), so nothing changes.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import triton

from tools.hopper import evaluate, markdown, ratchet, sm90
from tools.hopper.cases import OpCase
from tools.hopper.cost_model import H200
from tools.hopper.launch_capture import record
from tools.hopper.ops import all_ops

ROOT = Path(__file__).resolve().parents[2]


def triton_minor() -> str:
    return ".".join(triton.__version__.split(".")[:2])


def default_baseline() -> Path:
    return ROOT / "bench" / "hopper" / f"baseline-triton-{triton_minor()}.json"


def _analyse_job(job: tuple[dict[str, Any], str | None]) -> tuple[str, dict[str, Any]]:
    spec = sm90.KernelSpec.from_json(job[0])
    return spec.key(), sm90.analyse(spec, job[1])


def compile_all(specs: list[sm90.KernelSpec], jobs: int, sass_dir: str | None) -> dict[str, dict[str, Any]]:
    """Analyses of every spec, keyed by ``spec.key()``; ``jobs`` forked compiler processes."""
    unique = {spec.key(): spec for spec in specs}
    work = [(vars(spec), sass_dir) for spec in unique.values()]
    if jobs <= 1:
        return dict(map(_analyse_job, work))
    # Forked workers inherit the imported kernels; unordered: long compiles do not stall the rest.
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return dict(pool.imap_unordered(_analyse_job, work))


def build_report(cases: list[OpCase], jobs: int, sass_dir: str | None) -> tuple[dict[str, Any], dict]:
    """(report, timings): capture every op's launches, compile each distinct binary once, cost them."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    captured = [(case, record(case.run)) for case in cases]
    timings["capture_s"] = time.perf_counter() - start
    specs = [c.spec for _, launches in captured for la in launches for c in la.candidates]
    start = time.perf_counter()
    analyses = compile_all(specs, jobs, sass_dir)
    timings["compile_s"] = time.perf_counter() - start
    timings["binaries"] = len(analyses)
    timings["compile_cpu_s"] = sum(a.get("compile_s", 0.0) for a in analyses.values())
    ops = [evaluate.op_object(case, launches, analyses) for case, launches in captured]
    report = {
        "triton": triton.__version__,
        "ptxas": sm90.ptxas_version(),
        "target": "cuda:90",
        "ceilings": H200.contract(),
        "ops": ops,
        "goals": evaluate.global_goals(ops),
    }
    return report, timings


def toolchain_mismatch(report: dict[str, Any]) -> str | None:
    """Why ``report`` cannot be recompiled here (None: it can): it was written by another Triton or ptxas.

    The SASS of one spec depends on the assembler: each Triton version ships its own ptxas for
    sm_90 (3.6: 12.8, 3.9: 13.4; ``TRITON_PTXAS_PATH`` may name another). The decode
    down-projection of Triton 3.6's baseline has a K-loop of 60 instructions per warp under
    ptxas 12.8 or 12.9, 68 under Triton 3.9 and 69 under 3.6 with ptxas 13.4: recompiling a report
    with another toolchain reports such differences as mismatches of the spec (16 for the 3.6
    baseline under 3.9), which they are not.
    """
    here = {"triton": triton.__version__, "ptxas": sm90.ptxas_version()}
    differs = [k for k in here if report.get(k) is not None and here[k] is not None and report[k] != here[k]]
    if not differs:
        return None
    written = ", ".join(f"{k} {report.get(k)}" for k in here)
    running = ", ".join(f"{k} {v}" for k, v in here.items())
    return (
        f"written by {written}; this is {running}: recompile it with that toolchain "
        f"(the venv of Triton {report.get('triton')}, with the ptxas it ships)"
    )


def recompile_check(report: dict[str, Any], jobs: int = 2) -> list[str]:
    """Recompile every launch from the report's own spec; mismatches (K-loop ±10 %, regs, smem) as text."""
    launches = [la for op in report["ops"] for la in op["launches"] if la.get("signature") is not None]
    specs: dict[str, tuple[sm90.KernelSpec, dict[str, Any]]] = {}
    for la in launches:
        spec = sm90.KernelSpec(la["kernel"], la["signature"], la["constexprs"], la["divisible_by_16"], la["options"])
        specs.setdefault(spec.key(), (spec, la))
    analyses = compile_all([s for s, _ in specs.values()], jobs, None)
    problems = []
    for key, (spec, la) in specs.items():
        problems += [f"[{spec.short_hash()}] {p}" for p in ratchet.recompile_mismatches(la, analyses[key])]
    return problems


def _select(cases: list[OpCase], filters: str | None) -> list[OpCase]:
    if not filters:
        return cases
    wanted = [f.strip() for f in filters.split(",") if f.strip()]
    return [case for case in cases if any(w in case.id for w in wanted)]


def _print_table(report: dict[str, Any]) -> None:
    print(f"{'op':44} {'floor µs':>10} {'pred µs':>10} {'ratio':>7}  goal")
    for op in report["ops"]:
        goal = op.get("goal") or {}
        extra = ""
        if "hbm_fraction" in op:
            extra = f" hbm {op['hbm_fraction']:.0%}"
        if "copy_fraction" in op:
            extra = f" copy {op['copy_fraction']:.0%}"
        met = {True: "met", False: "NOT MET", None: ""}[goal.get("met")]
        print(
            f"{op['id']:44} {op['floor_us']:>10.1f} {op['predicted_us']:>10.1f} {op['ratio']:>7.3f}"
            f"{extra}  {goal.get('text', '')} {met}"
        )
    for name, goal in report["goals"].items():
        print(f"{name}: {'met' if goal['met'] else 'NOT MET'}")
        for v in goal["violations"]:
            print(f"  {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for hopper-report.json / .md / sass/")
    parser.add_argument("--baseline", type=Path, help="ratchet against this report (bench/hopper/baseline-...)")
    parser.add_argument(
        "--write-baseline",
        nargs="?",
        const=str(default_baseline()),
        default=None,
        metavar="PATH",
        help=f"also write the report as the baseline (default {default_baseline().relative_to(ROOT)})",
    )
    parser.add_argument("--ops", help="only ops whose id contains one of these comma-separated substrings")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument(
        "--recompile",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="recompile each report's launches from its own specs and compare",
    )
    parser.add_argument("--no-sass", action="store_true", help="do not keep the SASS files")
    args = parser.parse_args(argv)

    if args.recompile:
        failed = False
        for path in args.recompile:
            start = time.perf_counter()
            report = json.loads(path.read_text())
            if reason := toolchain_mismatch(report):
                print(f"ERROR: {path} was {reason}", file=sys.stderr)
                failed = True
                continue
            problems = recompile_check(report, args.jobs)
            for p in problems:
                print(f"MISMATCH {p}")
            print(f"recompiled {path}: {len(problems)} mismatches in {time.perf_counter() - start:.0f} s")
            failed |= bool(problems)
        return 1 if failed else 0
    if not args.out:
        parser.error("--out DIR is required (or --recompile JSON)")

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    sass_dir = None if args.no_sass else str(args.out / "sass")
    if sass_dir:
        Path(sass_dir).mkdir(exist_ok=True)
    cases = _select(all_ops(), args.ops)
    print(f"hopper report: {len(cases)} ops, Triton {triton.__version__}, sm_90", flush=True)
    try:
        report, timings = build_report(cases, args.jobs, sass_dir)
    except (evaluate.ReportError, RuntimeError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    timings["total_s"] = time.perf_counter() - start
    (args.out / "hopper-report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "hopper-report.md").write_text(markdown.render(report))
    _print_table(report)
    print(
        f"{timings['binaries']} binaries; capture {timings['capture_s']:.1f} s, compile {timings['compile_s']:.0f} s "
        f"wall ({timings['compile_cpu_s']:.0f} s in compilers), total {timings['total_s']:.0f} s; "
        f"wrote {args.out}/hopper-report.json and .md"
    )
    if args.write_baseline:
        path = Path(args.write_baseline)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"baseline written: {path}")

    if not args.baseline:
        return 0
    if not args.baseline.exists():
        print(f"ERROR: baseline {args.baseline} does not exist (create it with --write-baseline)", file=sys.stderr)
        return 1
    failures, notes = ratchet.compare(report, json.loads(args.baseline.read_text()))
    for note in notes:
        print(f"note: {note}")
    for failure in failures:
        print(f"RATCHET FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
