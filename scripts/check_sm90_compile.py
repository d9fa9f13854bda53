"""Compile every Triton kernel of peft_fast/kernels/ for an H100 (sm_90) without a GPU.

The test suite runs the kernels under TRITON_INTERPRET=1, which never lowers them to PTX, so
errors that only the GPU compiler raises (tl.dot with a dimension < 16, dtype mismatches in
MMA operands, ptxas failures, ...) would only show up on a real GPU. ``triton.compile`` can
target a GPU that is not present: it runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
cubin via ptxas) for ``GPUTarget("cuda", 90, 32)`` and reports the shared memory each kernel
needs. Only the final launch (and the driver's out-of-resources check) needs the device.

Each kernel is compiled for every activation dtype (fp32, fp16, bf16), every base-weight kind
it accepts (dense, NF4, NF4 with double quantization) and its autotune configs: by default the
first config and the one with the largest tiles, with ``--full`` all of them plus the rarer
constexpr variants (ranks, activations, unaligned NF4 blocks). The argument types and
constexprs mirror the launchers in each kernel module. Compiles go through ``scripts/sm90.py``,
the code path of ``hopper_report.py``: every pointer carries the divisibility-by-16 hint the JIT
gives caching-allocator tensors; integer sizes carry none (the JIT's case for odd sizes).

Usage:  python scripts/check_sm90_compile.py [--full] [--jobs N] [--filter SUBSTRING]

NF4 kernels in fp16/bf16, and the standalone dequantization in every dtype, must also compile
to PTX without any contracted multiply-add (see ``contraction_check_applies``).

Exit code 1 if any compile fails, except configs whose shared memory exceeds the H100's 227 KB
per block: those are reported as SKIP, because on a GPU the autotuner prunes them at launch.
"""

from __future__ import annotations

import os

# The kernel modules pick their autotune configs (interpreter vs GPU) at import time, and the
# interpreter never compiles: make sure it is off before anything imports triton or peft_fast.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns when this is unset; "1" is its current default (FMA contraction on unless a
# launcher passes enable_fp_fusion=False, as the NF4 ones do).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import itertools
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: sm90, the compile path of hopper_report.py

import sm90
import torch
import triton

from peft_fast.kernels import adapter, adapter_gemms, ia3, lora_gemms, lora_linear, nf4_dequant, nf4_gemm
from peft_fast.nf4 import NESTED_BLOCKSIZE

H100_MAX_SHARED = 232448  # bytes of shared memory a block may opt into on sm_90 (227 KB)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BASES = ("dense", "nf4", "nf4dq")
NF4_BLOCKSIZE = 64  # the usual (bitsandbytes default) NF4 blocksize


@dataclass
class Job:
    """One compilation: a kernel with concrete argument types, constexprs and launch options."""

    kernel: object  # JITFunction, or the Autotuner wrapping one
    dtype: str
    base: str
    types: dict[str, str]  # runtime argument name -> Triton type ("*fp16", "i32", ...)
    consts: dict[str, object]  # constexpr name -> value
    config: triton.Config | None = None
    options: dict[str, object] = field(default_factory=dict)

    @property
    def fn(self):
        # An Autotuner wraps the JITFunction in .fn (a bare JITFunction's .fn is the Python function).
        return self.kernel.fn if isinstance(self.kernel, triton.runtime.Autotuner) else self.kernel

    def describe_config(self) -> str:
        opts = dict(self.options)
        if self.config is not None:
            opts.update(self.config.all_kwargs())
        shown = {k: v for k, v in opts.items() if k not in ("enable_fp_fusion", "num_ctas")}
        variant = {k: v for k, v in self.consts.items() if k in VARIANT_CONSTS}
        return " ".join(f"{k}={v}" for k, v in {**variant, **shown}.items())


# constexprs that distinguish the variants of one kernel (shown in the table next to the config).
VARIANT_CONSTS = (
    "BLOCK_R", "BLOCK_B", "BLOCKS_IN_ROWS", "SCALE_INPUT", "HAS_LN", "ACTIVATION", "ADD_GRAD_Y", "OUT_KIND",
)  # fmt: skip


# -- argument types, as the launchers pass them -----------------------------------------------


def ptr(ty: str) -> str:
    return "*" + ty


def base_args(base: str, act: str, blocks_in_rows: bool = True) -> tuple[dict[str, str], dict, dict]:
    """Types, constexprs and compile options for the base-weight arguments of the GEMM kernels.

    Mirrors ``lora_linear._base_args`` / ``_compile_options``: a dense base passes the activation
    tensor as placeholder for the NF4-only pointers; NF4 passes packed uint8 codes, fp32 absmax
    (uint8 indices under double quantization) and the fp32 code tables, and is compiled without
    FMA contraction.
    """
    if base == "dense":
        names = ("w_ptr", "absmax_ptr", "nested_absmax_ptr", "offset_ptr", "code_ptr", "code2_ptr")
        types = dict.fromkeys(names, ptr(act))
        meta = dict(IS_NF4=False, DOUBLE_QUANT=False, BLOCKSIZE=64, NESTED=NESTED_BLOCKSIZE, BLOCKS_IN_ROWS=False)
        return types, meta, {}
    dq = base == "nf4dq"
    types = {
        "w_ptr": "*u8",
        "absmax_ptr": "*u8" if dq else "*fp32",
        "nested_absmax_ptr": "*fp32" if dq else ptr(act),
        "offset_ptr": "*fp32" if dq else ptr(act),
        "code_ptr": "*fp32",
        "code2_ptr": "*fp32",
    }
    meta = dict(
        IS_NF4=True, DOUBLE_QUANT=dq, BLOCKSIZE=NF4_BLOCKSIZE, NESTED=NESTED_BLOCKSIZE, BLOCKS_IN_ROWS=blocks_in_rows
    )
    return types, meta, {"enable_fp_fusion": False}


def i32(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "i32")


def f32(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "fp32")


def ptrs(ty: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, ptr(ty))


# -- config selection -------------------------------------------------------------------------


def tile_volume(cfg: triton.Config) -> int:
    """Rough shared-memory proxy: product of the block sizes times the pipeline stages."""
    vol = cfg.num_stages
    for key, value in cfg.kwargs.items():
        if key.startswith("BLOCK_"):
            vol *= value
    return vol


def pick(configs: list[triton.Config], full: bool) -> list[triton.Config]:
    """All configs with --full, else the first (the list's favourite), the biggest and the smallest tiles."""
    if full:
        return list(configs)
    chosen = [configs[0], max(configs, key=tile_volume), min(configs, key=tile_volume)]
    return [cfg for i, cfg in enumerate(chosen) if all(cfg is not other for other in chosen[:i])]


# -- the job list, kernel by kernel -----------------------------------------------------------


def lora_linear_jobs(act: str, precision: str, full: bool) -> list[Job]:
    L, G = lora_linear, lora_gemms
    jobs = []
    # BLOCK_R = the rank chunk: 16 is the tl.dot minimum (ranks <= 16 are padded to it), 64 the maximum.
    ranks = (16, 32, 64) if full else (16, 64)
    for block_r in ranks:
        common = dict(HAS_DROPOUT=True, DROPOUT_TILED=True, DOT_PRECISION=precision, BLOCK_R=block_r)
        rank_types = i32("M", "K", "R", "seed", "threshold", "m_bucket") | f32("inv_keep")
        # H is written in the activation dtype (one K slice) or as fp32 partials (split over K).
        for cfg, h_type in itertools.product(pick(G._LORA_DOWN_CONFIGS, full), sorted({act, "fp32"})):
            types = ptrs(act, "x_ptr", "a_ptr") | ptrs(h_type, "h_ptr") | rank_types | i32("k_slice")
            jobs.append(Job(G._lora_down_kernel, act, "-", types, common, cfg))
        # dA is written in the activation dtype (one M range) or as fp32 partials (split over M).
        for cfg, da_type in itertools.product(pick(G._DA_CONFIGS, full), sorted({act, "fp32"})):
            types = ptrs(act, "dh_ptr", "x_ptr") | ptrs(da_type, "da_ptr") | rank_types | i32("m_per_split")
            jobs.append(Job(G._lora_da_kernel, act, "-", types, common, cfg))
        # The split-K epilogue is launched with fixed blocks and Triton's default num_warps/stages.
        types = ptrs("fp32", "partial_ptr") | ptrs(act, "h_ptr", "lora_b_ptr", "bias_ptr", "y_ptr")
        types |= i32("M", "N", "R", "n_splits") | f32("scale")
        consts = dict(
            HAS_BIAS=True, DOT_PRECISION=precision, BLOCK_R=block_r,
            BLOCK_M=L.SMALL_M_MAX, BLOCK_N=L._SPLITK_EPILOGUE_BLOCK_N,
        )  # fmt: skip
        jobs.append(Job(G._splitk_epilogue_kernel, act, "-", types, consts))

    for base in BASES:
        aligned = (True, False) if full and base != "dense" else (True,)
        for blocks_in_rows, block_r in itertools.product(aligned, ranks):
            btypes, bmeta, opts = base_args(base, act, blocks_in_rows)
            types = ptrs(act, "x_ptr", "h_ptr", "lora_b_ptr", "bias_ptr", "y_ptr") | btypes
            types |= i32("M", "N", "K", "R", "m_bucket") | f32("scale")
            consts = bmeta | dict(HAS_BIAS=True, DOT_PRECISION=precision, BLOCK_R=block_r)
            for cfg in pick(G._GEMM_CONFIGS, full):
                jobs.append(Job(G._lora_linear_fwd_kernel, act, base, types, consts, cfg, opts))

            types = ptrs(act, "dy_ptr", "dh_ptr", "a_ptr", "dx_ptr") | btypes
            types |= i32("M", "N", "K", "R", "seed", "threshold", "m_bucket") | f32("inv_keep")
            consts = bmeta | dict(HAS_DROPOUT=True, DROPOUT_TILED=True, DOT_PRECISION=precision, BLOCK_R=block_r)
            for cfg in pick(G._GEMM_CONFIGS, full):
                jobs.append(Job(G._lora_linear_dx_kernel, act, base, types, consts, cfg, opts))

        for blocks_in_rows in aligned:
            btypes, bmeta, opts = base_args(base, act, blocks_in_rows)
            # The small-M path pads M (<= 16) to BLOCK_M = 16 rows, the tl.dot minimum.
            types = (
                ptrs(act, "x_ptr") | btypes | ptrs("fp32", "partial_ptr") | i32("M", "N", "K", "k_slice", "m_bucket")
            )
            consts = bmeta | dict(DOT_PRECISION=precision, BLOCK_M=L.SMALL_M_MAX)
            for cfg in pick(G._SPLITK_CONFIGS, full):
                jobs.append(Job(G._splitk_partial_kernel, act, base, types, consts, cfg, opts))
        if base != "dense":
            jobs += nf4_rows_jobs(act, precision, base, ranks, full)
    return jobs


def nf4_rows_jobs(act: str, precision: str, base: str, ranks: tuple[int, ...], full: bool) -> list[Job]:
    """The row-streaming NF4 kernels (nf4_gemm.py): the code-pair table replaces the codebook."""
    btypes, bmeta, opts = base_args(base, act, True)
    btypes = {name: ty for name, ty in btypes.items() if name != "code_ptr"} | {"pair_ptr": "*i64"}
    bmeta = {name: bmeta[name] for name in ("DOUBLE_QUANT", "BLOCKSIZE", "NESTED")}
    jobs = []
    for block_r in ranks:
        types = ptrs(act, "x_ptr", "h_ptr", "lora_b_ptr", "bias_ptr", "y_ptr") | btypes
        types |= i32("M", "N", "K", "R", "m_bucket") | f32("scale")
        consts = bmeta | dict(HAS_BIAS=True, DOT_PRECISION=precision, BLOCK_R=block_r, R_CHUNKS=1)
        for cfg in pick(nf4_gemm.ROWS_FWD_CONFIGS, full):
            jobs.append(Job(nf4_gemm._nf4_rows_fwd_kernel, act, base, types, consts, cfg, opts))
    types = ptrs(act, "x_ptr") | btypes | ptrs("fp32", "partial_ptr") | i32("M", "N", "K", "k_slice", "m_bucket")
    consts = bmeta | dict(DOT_PRECISION=precision, BLOCK_M=lora_linear.SMALL_M_MAX)
    for cfg in pick(nf4_gemm.ROWS_SPLITK_CONFIGS, full):
        jobs.append(Job(nf4_gemm._nf4_rows_splitk_kernel, act, base, types, consts, cfg, opts))
    return jobs


def ia3_jobs(act: str, precision: str, full: bool) -> list[Job]:
    jobs = []
    for base, scale_input in itertools.product(BASES, (False, True)):
        btypes, bmeta, opts = base_args(base, act)
        # l (the (IA)^3 vector) is fp32 whatever the activation dtype; dl partial sums are fp32.
        types = ptrs(act, "x_ptr", "bias_ptr", "y_ptr", "y0_ptr") | btypes | ptrs("fp32", "l_ptr")
        types |= i32("M", "N", "K", "m_bucket")
        consts = bmeta | dict(SCALE_INPUT=scale_input, HAS_BIAS=True, DOT_PRECISION=precision)
        for cfg in pick(lora_gemms._GEMM_CONFIGS, full):
            jobs.append(Job(ia3._ia3_linear_fwd_kernel, act, base, types, consts, cfg, opts))

        types = ptrs(act, "dy_ptr", "saved_ptr", "dx_ptr") | btypes | ptrs("fp32", "l_ptr", "dl_part_ptr")
        types |= i32("M", "N", "K", "m_bucket")
        consts = bmeta | dict(SCALE_INPUT=scale_input, STORE_DX=True, NEEDS_DL=True, DOT_PRECISION=precision)
        for cfg in pick(lora_gemms._GEMM_CONFIGS, full):
            jobs.append(Job(ia3._ia3_linear_dx_kernel, act, base, types, consts, cfg, opts))
    return jobs


def adapter_jobs(act: str, precision: str, full: bool) -> list[Job]:
    A, AG = adapter, adapter_gemms
    jobs = []
    # BLOCK_B = the bottleneck chunk (_block_r of B): 16 for small bottlenecks, up to 64.
    widths = (16, 32, 64) if full else (16, 64)
    activations = tuple(A.ACTIVATIONS.values()) if full else (A.ACTIVATIONS["gelu"],)
    stats = ptrs("fp32", "mean_ptr", "rstd_ptr")  # LayerNorm statistics are fp32
    for block_b in widths:
        for has_ln in (True, False):
            types = ptrs(act, "x_ptr", "ln_w_ptr", "ln_b_ptr", "wd_ptr", "bd_ptr", "z_ptr") | stats
            types |= i32("M", "D", "B", "m_bucket") | f32("eps")
            consts = dict(HAS_LN=has_ln, DOT_PRECISION=precision, BLOCK_B=block_b)
            for cfg in pick(AG._ROW_CONFIGS, full):
                jobs.append(Job(AG._adapter_down_kernel, act, "-", types, consts, cfg))

            types = ptrs(act, "dz_ptr", "x_ptr", "ln_w_ptr", "ln_b_ptr", "dwd_ptr", "dbd_ptr") | stats
            types |= i32("M", "D", "B", "m_bucket")
            for cfg in pick(AG._WEIGHT_GRAD_CONFIGS, full):
                jobs.append(Job(AG._adapter_ddown_kernel, act, "-", types, consts, cfg))

            # dX is launched with fixed tiles (_DX_LAUNCH), not autotuned; LN and no-LN are two code paths.
            for add_grad_y in (True, False) if full else (True,):
                types = ptrs(act, "dz_ptr", "wd_ptr", "dy_ptr", "x_ptr", "ln_w_ptr", "dx_ptr") | stats
                types |= ptrs("fp32", "dgamma_ptr", "dbeta_ptr") | i32("M", "D", "B")
                launch = dict(AG._DX_LAUNCH)
                options = {"num_warps": launch.pop("num_warps"), "num_stages": launch.pop("num_stages")}
                consts = dict(HAS_LN=has_ln, ADD_GRAD_Y=add_grad_y, DOT_PRECISION=precision, BLOCK_B=block_b, **launch)
                jobs.append(Job(AG._adapter_dx_kernel, act, "-", types, consts, None, options))

        for activation in activations:
            consts = dict(
                ACTIVATION=activation, HAS_DROPOUT=True, DROPOUT_TILED=True, DOT_PRECISION=precision, BLOCK_B=block_b
            )
            types = ptrs(act, "z_ptr", "wu_ptr", "bu_ptr", "r_ptr", "y_ptr")
            types |= i32("M", "D", "B", "seed", "threshold", "m_bucket") | f32("scale", "inv_keep")
            for cfg in pick(AG._UP_CONFIGS, full):
                jobs.append(Job(AG._adapter_up_kernel, act, "-", types, consts, cfg))

            types = ptrs(act, "dy_ptr", "wu_ptr", "z_ptr", "dz_ptr") | i32(
                "M", "D", "B", "seed", "threshold", "m_bucket"
            )
            types |= f32("grad_scale")
            for cfg in pick(AG._ROW_CONFIGS, full):
                jobs.append(Job(AG._adapter_dz_kernel, act, "-", types, consts, cfg))

            types = ptrs(act, "dy_ptr", "z_ptr", "dwu_ptr", "dbu_ptr") | i32(
                "M", "D", "B", "seed", "threshold", "m_bucket"
            )
            types |= f32("grad_scale")
            dup_consts = {name: value for name, value in consts.items() if name != "DROPOUT_TILED"}
            for cfg in pick(AG._WEIGHT_GRAD_CONFIGS, full):
                jobs.append(Job(AG._adapter_dup_kernel, act, "-", types, dup_consts, cfg))
    return jobs


def nf4_dequant_jobs(out: torch.dtype, full: bool) -> list[Job]:
    """The dequant kernel has no activation input: ``dtype`` is its output (bf16 is written as int16 bits)."""
    act = DTYPES[out]
    out_type = "*i16" if out == torch.bfloat16 else ptr(act)
    jobs = []
    for base in ("nf4", "nf4dq"):
        dq = base == "nf4dq"
        types = {
            "packed_ptr": "*u8",
            "absmax_ptr": "*u8" if dq else "*fp32",
            # Without double quantization the launcher passes absmax for the unused pointers.
            "nested_absmax_ptr": "*fp32",
            "offset_ptr": "*fp32",
            "code_ptr": "*fp32",
            "code2_ptr": "*fp32",
            "out_ptr": out_type,
            "numel": "i32",
            "n_bytes": "i32",
        }
        cols = min(NF4_BLOCKSIZE // 2, 256)
        consts = dict(
            BLOCKSIZE=NF4_BLOCKSIZE, NESTED=NESTED_BLOCKSIZE, DOUBLE_QUANT=dq,
            OUT_KIND=nf4_dequant._OUT_KIND[out], ROWS=nf4_dequant._TILE_BYTES // cols, COLS=cols,
        )  # fmt: skip
        options = {"enable_fp_fusion": False, "num_warps": nf4_dequant._NUM_WARPS}
        jobs.append(Job(nf4_dequant._nf4_dequant_kernel, act, base, types, consts, None, options))
        if full:  # tensors of 2**31 elements or more: numel is passed as i64
            wide = types | {"numel": "i64", "n_bytes": "i64"}
            jobs.append(Job(nf4_dequant._nf4_dequant_kernel, act, base, wide, consts, None, options))
    return jobs


def all_jobs(full: bool) -> list[Job]:
    jobs = []
    for dtype, act in DTYPES.items():
        precision = lora_linear._DOT_PRECISION[dtype]
        jobs += lora_linear_jobs(act, precision, full)
        jobs += nf4_dequant_jobs(dtype, full)
        jobs += adapter_jobs(act, precision, full)
        jobs += ia3_jobs(act, precision, full)
    return jobs


# -- compiling --------------------------------------------------------------------------------


def contraction_check_applies(job: Job) -> bool:
    """Whether the job's PTX must hold no fused multiply-add (``fma.rn.f32``).

    NF4 launches pass ``enable_fp_fusion=False`` so that the dequantization rounds the multiply
    and the add separately, as bitsandbytes does; a contracted multiply-add changes the last bit
    of the double-quantized absmax. fp32 GEMMs are exempt: their IEEE ``tl.dot`` is itself
    lowered to FMA instructions, which the option does not (and should not) touch.
    """
    return job.options.get("enable_fp_fusion") is False and (
        job.dtype != "fp32" or job.kernel is nf4_dequant._nf4_dequant_kernel
    )


def compile_job(job: Job) -> tuple[int | None, float, str | None]:
    """(shared memory bytes, seconds, None) or (None, seconds, first line of the error).

    Compiled through :mod:`sm90`, the code path of the Hopper report: pointer arguments carry
    the divisibility-by-16 hint the JIT gives every caching-allocator tensor; integer sizes get
    none (the general case, compiled when a size is not a multiple of 16).
    """
    consts = dict(job.consts)
    options = dict(job.options)
    if job.config is not None:  # an autotune config = extra constexprs + launch options
        consts.update(job.config.kwargs)
        options.update(num_warps=job.config.num_warps, num_stages=job.config.num_stages)
    try:
        spec = sm90.spec_from_types(job.kernel, job.types, consts, options)
    except KeyError as exc:  # a bug in this script, not in the kernel: say so plainly
        return None, 0.0, f"script error: {exc.args[0]}"
    start = time.perf_counter()
    try:
        compiled = sm90.compile_spec(spec)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # CompilationError messages start with source context; the cause is on the last line.
        message = lines[-1] if lines else ""
        return None, time.perf_counter() - start, f"{type(exc).__name__}: {message}"[:200]
    if contraction_check_applies(job):
        fused = compiled.asm["ptx"].count("fma.rn.f32")
        if fused:
            return None, time.perf_counter() - start, f"{fused} fma.rn.f32 in PTX despite enable_fp_fusion=False"
    return compiled.metadata.shared, time.perf_counter() - start, None


_JOBS: list[Job] = []


def _compile_index(i: int):
    return compile_job(_JOBS[i])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every autotune config and constexpr variant")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this substring")
    args = parser.parse_args()

    _JOBS.extend(job for job in all_jobs(args.full) if args.filter in job.fn.__name__)
    print(f"compiling {len(_JOBS)} kernel instances for sm_90 (triton {triton.__version__})", flush=True)
    header = f"{'kernel':30} {'dtype':5} {'base':5} {'shared':>7}  {'result':6} config / error"
    print(header)
    print("-" * len(header))
    counts = {"OK": 0, "SKIP": 0, "FAIL": 0}
    start = time.perf_counter()
    # Workers are forked so they inherit the imported kernels; imap keeps the table in job order.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, args.jobs)) as pool:
        for job, (shared, _, error) in zip(_JOBS, pool.imap(_compile_index, range(len(_JOBS))), strict=True):
            too_big = shared is not None and shared > H100_MAX_SHARED
            if error is None and not too_big:
                status, detail = "OK", job.describe_config()
            elif too_big or "out of resource" in (error or "").lower():
                # The autotuner drops configs that do not fit at launch; nothing to fix.
                status, detail = "SKIP", f"{job.describe_config()}  (> {H100_MAX_SHARED} B shared)"
            else:
                status, detail = "FAIL", f"{job.describe_config()}  -> {error}"
            counts[status] += 1
            shown = "-" if shared is None else shared
            print(f"{job.fn.__name__:30} {job.dtype:5} {job.base:5} {shown:>7}  {status:6} {detail}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"\nOK {counts['OK']}  SKIP {counts['SKIP']}  FAIL {counts['FAIL']}  in {elapsed:.0f} s")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
