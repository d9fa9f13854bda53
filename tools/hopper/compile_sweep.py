"""Compile every kernel the ops launch for an H100 (sm_90), in every dtype and autotune config, without a GPU.

The test suite runs the kernels under TRITON_INTERPRET=1, which never lowers them to PTX, so
errors only the GPU compiler raises (tl.dot with a dimension < 16, dtype mismatches in MMA
operands, ptxas failures, ...) would otherwise show up only on a GPU. ``triton.compile`` can
target a GPU that is not there: the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin by
ptxas) runs for ``GPUTarget("cuda", 90, 32)``; only the launch needs the device.

The job list comes from the launchers themselves: every sweep case of ``tools.hopper.ops.REGISTRY``
(each op at representative shapes, in fp32, fp16 and bf16, over each kind of base weight and each
variant the op has) is called on fake CUDA tensors while its launches are recorded
(:mod:`tools.hopper.launch_capture`), and each distinct binary — every autotune config the
autotuner would try, specialised as the JIT would (:mod:`tools.hopper.sm90`) — is compiled once.
A new kernel is covered as soon as an op entry launches it; no signature is copied here.

Usage (from the repository root):
    python -m tools.hopper.compile_sweep [--jobs N] [--filter SUBSTRING] [--list]

Kernels compiled without FMA contraction (``enable_fp_fusion=False``: the NF4 dequantization,
which must round as bitsandbytes does, and kernels that promise torch's roundings) must also have
no contracted multiply-add in their PTX, except IEEE fp32 dots, which Triton lowers to FMAs.

Exit code 1 if any launcher or compile fails, except configs whose shared memory exceeds the
H100's 227 KB per block: those are reported as SKIP, because on a GPU the autotuner drops them at
launch.
"""

from __future__ import annotations

import os

# The kernel modules pick their autotune configs (interpreter vs GPU) at import time, and the
# interpreter never compiles: it must be off before anything imports the kernels.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns when this is unset; "1" is its current default (FMA contraction on unless a
# launcher passes enable_fp_fusion=False, as the NF4 ones do).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import collections
import multiprocessing
import sys
import time

import triton

from tools.hopper.ops import sweep_cases
from tools.hopper.sweep import H100_MAX_SHARED, build_jobs, classify, compile_job


def _print_summary(counts: dict[str, collections.Counter]) -> None:
    print(f"\n{'kernel':32} {'OK':>4} {'SKIP':>4} {'FAIL':>4}")
    for kernel in sorted(counts):
        c = counts[kernel]
        print(f"{kernel:32} {c['OK']:>4} {c['SKIP']:>4} {c['FAIL']:>4}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this substring")
    parser.add_argument("--list", action="store_true", help="print the job list (no compiling)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    jobs, failures = build_jobs(sweep_cases())
    jobs = [job for job in jobs if args.filter in job.kernel]
    print(
        f"{len(jobs)} kernel binaries from the launchers in {time.perf_counter() - start:.1f} s; "
        f"compiling for sm_90 (triton {triton.__version__})",
        flush=True,
    )
    header = f"{'kernel':32} {'dtype':5} {'base':5} {'shared':>7}  {'result':6} case | config / error"
    print(header)
    print("-" * len(header))
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for failure in failures:
        counts[f"launcher {failure.case.op}"]["FAIL"] += 1
        print(f"{'(launcher)':32} {failure.case.dtype:5} {failure.case.base:5} {'-':>7}  FAIL   {failure.case.id} -> "
              f"{failure.error}")  # fmt: skip
    if args.list:
        for job in jobs:
            counts[job.kernel]["OK"] += 1
            print(f"{job.kernel:32} {job.dtype:5} {job.base:5} {'-':>7}  {'-':6} {job.describe()}")
        _print_summary(counts)
        print(f"\n{len(jobs)} binaries to compile, {len(failures)} launcher failures")
        return 1 if failures else 0

    compile_start = time.perf_counter()
    # Workers are forked so they inherit the imported kernels; imap keeps the table in job order.
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        results = pool.imap(compile_job, [vars(job.spec) for job in jobs])
        for job, (shared, _, error) in zip(jobs, results, strict=True):
            status = classify(shared, error)
            counts[job.kernel][status] += 1
            detail = job.describe()
            if status == "SKIP":
                detail += f"  (> {H100_MAX_SHARED} B shared)"
            elif status == "FAIL":
                detail += f"  -> {error}"
            shown = "-" if shared is None else shared
            print(f"{job.kernel:32} {job.dtype:5} {job.base:5} {shown:>7}  {status:6} {detail}", flush=True)
    _print_summary(counts)
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    elapsed = time.perf_counter() - compile_start
    print(f"\nOK {total['OK']}  SKIP {total['SKIP']}  FAIL {total['FAIL']}  in {elapsed:.0f} s")
    return 1 if total["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
