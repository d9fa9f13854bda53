"""The compile sweep's job list, built from the launches the ops make, and how one job is compiled and judged.

:func:`build_jobs` calls each sweep case's launcher on fake CUDA tensors while its launches are
recorded (:mod:`tools.hopper.launch_capture`): each distinct binary, every autotune config the
autotuner would time specialised as the JIT would (:mod:`tools.hopper.sm90`), is one job.
:func:`compile_job` compiles one for sm_90 in a worker; :func:`classify` says OK, SKIP or FAIL.
The command is :mod:`tools.hopper.compile_sweep`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tools.hopper import sm90
from tools.hopper.cases import OpCase
from tools.hopper.launch_capture import record

H100_MAX_SHARED = 232448  # bytes of shared memory a block may opt into on sm_90 (227 KB)


@dataclass
class SweepJob:
    """One binary to compile, and the first sweep case whose launches asked for it."""

    spec: sm90.KernelSpec
    dtype: str  # the case's activation dtype
    base: str  # the case's base weight kind
    case: str  # the case's id and rank
    config: dict[str, Any] | None  # the autotune config (None: a fixed launch)

    @property
    def kernel(self) -> str:
        return self.spec.kernel.rpartition(":")[2]

    def describe(self) -> str:
        """The case, then the config's tiles, warps and stages (a fixed launch: its options)."""
        source = self.config if self.config is not None else self.spec.options
        shown = {k: v for k, v in source.items() if k not in ("num_ctas", "enable_fp_fusion")}
        return f"{self.case} | " + " ".join(f"{k}={v}" for k, v in shown.items())


@dataclass
class CaseFailure:
    """A sweep case whose launcher raised while its launches were recorded."""

    case: OpCase
    error: str


def build_jobs(cases: list[OpCase]) -> tuple[list[SweepJob], list[CaseFailure]]:
    """The distinct binaries the cases' launchers ask for, in first-seen order, and the cases that failed."""
    jobs: list[SweepJob] = []
    failures: list[CaseFailure] = []
    seen: set[str] = set()
    for case in cases:
        try:
            launches = record(case.run)
        except Exception as exc:  # a launcher that refuses a variant is a finding, not a crash of the sweep
            failures.append(CaseFailure(case, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        for launch in launches:
            for cand in launch.candidates:  # library calls have none
                key = cand.spec.key()
                if key not in seen:
                    seen.add(key)
                    label = f"{case.op} M={case.M} N={case.N} K={case.K} r={case.r}"
                    jobs.append(SweepJob(cand.spec, case.dtype, case.base, label, cand.config))
    return jobs, failures


def contraction_check_applies(spec: sm90.KernelSpec) -> bool:
    """Whether the binary's PTX must hold no fused multiply-add (``fma.rn.f32``).

    A launch with ``enable_fp_fusion=False`` asks for every multiply and add to round
    separately: the NF4 dequantization (bitsandbytes rounds twice; a contracted multiply-add
    changes the last bit of the double-quantized absmax) and kernels matching torch's roundings.
    IEEE fp32 dots are exempt: Triton lowers them to FMA instructions, which the option does not
    (and should not) touch.
    """
    return spec.options.get("enable_fp_fusion") is False and spec.constexprs.get("DOT_PRECISION") != "ieee"


def compile_job(spec_json: dict[str, Any]) -> tuple[int | None, float, str | None]:
    """(shared memory bytes, seconds, None) or (None, seconds, the error's last line); runs in a worker."""
    spec = sm90.KernelSpec.from_json(spec_json)
    start = time.perf_counter()
    try:
        compiled = sm90.compile_spec(spec)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # CompilationError messages start with source context; the cause is on the last line.
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:200]
    if contraction_check_applies(spec) and (fused := compiled.asm["ptx"].count("fma.rn.f32")):
        return None, time.perf_counter() - start, f"{fused} fma.rn.f32 in PTX despite enable_fp_fusion=False"
    return compiled.metadata.shared, time.perf_counter() - start, None


def classify(shared: int | None, error: str | None) -> str:
    """The job's result: OK, SKIP (too much shared memory: the autotuner drops it at launch) or FAIL."""
    too_big = shared is not None and shared > H100_MAX_SHARED
    if error is None and not too_big:
        return "OK"
    if too_big or "out of resource" in (error or "").lower():
        return "SKIP"
    return "FAIL"
