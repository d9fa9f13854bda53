"""A compile-time lower bound on the run time of a kernel launch on an H200 (sm_90).

Pure arithmetic on numbers read from the cubin / SASS; no GPU, no Triton. The predictions are
lower bounds, never measurements.

Ceilings (measured on the H200 per the device's docs): clock 1.98 GHz, 132 SMs, bf16 dense
matmul 790 TFLOP/s (cuBLAS), device-to-device copy 4.3 TB/s counting read + write. The copy rate
is used as the achievable HBM rate (the 4.8 TB/s datasheet figure is not measured). One SM's
tensor cores then do 790e12 / (132 × 1.98e9) ≈ 3,023 FLOP per clock.

Per launch (one kernel, one autotune config):

* Occupancy: CTAs per SM = min(by shared memory: 228 KB per SM, 227 KB per block at most, each
  CTA also holding 1 KB the system reserves; by registers: 65,536 per SM, a warp's registers
  allocated in granules of 256 = 8 per thread; by threads: 2,048; 32 blocks).
* One CTA's work: issue cycles = (K-loop instructions × trips + every other instruction once) ×
  num_warps / 4 (4 schedulers per SM, one instruction per clock each); MMA cycles = (MMA FLOPs of a
  trip × trips + MMA FLOPs outside the loop) / 3,023.
* c CTAs resident on one SM share its schedulers and tensor cores: a group of c takes
  max(c · issue, c · MMA) cycles. When the K-loop drains wgmma every trip (wait depth 0) a CTA
  cannot overlap its own MMA with its own instructions: with one CTA per SM the group takes
  issue + MMA; with more, never less than one CTA's issue + MMA.
* The busiest SM runs ceil(CTAs / 132) CTAs in groups of ``ctas_per_sm`` (waves); compute time =
  the sum over its groups / clock.
* Memory bound: the bytes the launch must move (every tensor argument once: inputs read,
  outputs written) / HBM rate. predicted = max(compute time, memory bound); no launch overhead.

Library calls the launchers run themselves (torch matmuls, casts, sums) are taken at roofline:
max(FLOPs / bf16 rate, bytes / HBM rate).

Caveats (all make the prediction lower, never higher, than a real run):

* No launch overhead, no prologue latency, no memory latency: a one-CTA launch streaming its
  operands is charged its instructions only, and the memory bound assumes the full HBM rate
  whatever the grid size; L2 hits are not modelled (every argument is read once, no more).
* Loops other than the K-loop (an epilogue's rank loop, a reduction over split-K partials) are
  counted once per CTA; both sides of run-time branches are counted (that one can overestimate).
* Trip counts are program 0's (a tail program may do fewer); the grid's last wave is charged in full.
* Library calls take the bf16 rate for every matmul, fp32 ones included, and assume cuBLAS-class
  efficiency; a memory-bound kernel reaching the copy rate scores 100 % of copy bandwidth.
* MMA FLOPs are what the tensor cores execute (tiles padded to 16 rows for M = 1 included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Ceilings:
    """The H200's measured rates (see the module docstring)."""

    clock_hz: float = 1.98e9
    sms: int = 132
    bf16_flops_per_s: float = 790e12
    hbm_bytes_per_s: float = 4.3e12
    copy_bytes_per_s: float = 4.3e12
    smem_per_sm: int = 228 * 1024
    smem_per_block_max: int = 227 * 1024
    smem_reserved_per_cta: int = 1024
    regs_per_sm: int = 65536
    reg_granule_per_thread: int = 8
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    schedulers_per_sm: int = 4

    @property
    def mma_flops_per_sm_clock(self) -> float:
        return self.bf16_flops_per_s / (self.sms * self.clock_hz)

    def contract(self) -> dict[str, float]:
        """The keys of the report's ``ceilings`` object."""
        keys = ("clock_hz", "sms", "bf16_flops_per_s", "hbm_bytes_per_s", "copy_bytes_per_s")
        return {k: v for k, v in asdict(self).items() if k in keys}


H200 = Ceilings()


@dataclass(frozen=True)
class KernelCost:
    """What one CTA of one compiled kernel costs, from its SASS and resource usage."""

    num_warps: int
    regs: int  # per thread
    smem: int  # dynamic shared memory per CTA, bytes (Triton's metadata.shared)
    kloop_instr: int  # per warp, one trip
    other_instr: int  # per warp, everything outside the K-loop, counted once
    kloop_mma_flops: int  # per CTA, one trip
    other_mma_flops: int  # per CTA, once
    trips: int  # K-loop trips per CTA
    wgmma_wait: int | None  # None: no wgmma in the loop


@dataclass(frozen=True)
class LaunchPrediction:
    ctas: int
    ctas_per_sm: int
    waves: int
    issue_cycles: float  # one CTA
    mma_cycles: float  # one CTA
    compute_us: float
    memory_us: float
    predicted_us: float
    bound: str  # "memory", "mma", "issue" or "serial" (wgmma drained: issue + MMA)
    fits: bool


def ctas_per_sm(num_warps: int, regs: int, smem: int, ceil: Ceilings = H200) -> int:
    """Resident CTAs per SM (0 when one CTA does not fit)."""
    smem_cta = smem + ceil.smem_reserved_per_cta
    if smem > ceil.smem_per_block_max:
        return 0
    by_smem = ceil.smem_per_sm // smem_cta
    regs_thread = max(1, math.ceil(regs / ceil.reg_granule_per_thread)) * ceil.reg_granule_per_thread
    by_regs = ceil.regs_per_sm // (regs_thread * 32 * num_warps)
    by_threads = ceil.max_threads_per_sm // (32 * num_warps)
    return max(0, min(by_smem, by_regs, by_threads, ceil.max_blocks_per_sm))


def group_cycles(resident: int, issue: float, mma: float, drained: bool) -> tuple[float, str]:
    """Cycles for ``resident`` CTAs sharing one SM, and what bounds them."""
    shared = max(resident * issue, resident * mma)
    bound = "mma" if resident * mma >= resident * issue else "issue"
    if drained:
        if resident == 1 or issue + mma > shared:
            return issue + mma, "serial"
    return shared, bound


def predict_launch(
    cost: KernelCost, grid: tuple[int, ...], bytes_moved: int, ceil: Ceilings = H200
) -> LaunchPrediction:
    """Lower-bound time of one launch of ``cost`` over ``grid`` moving ``bytes_moved`` bytes."""
    ctas = math.prod(grid)
    fit = ctas_per_sm(cost.num_warps, cost.regs, cost.smem, ceil)
    memory_us = bytes_moved / ceil.hbm_bytes_per_s * 1e6
    issue = (cost.kloop_instr * cost.trips + cost.other_instr) * cost.num_warps / ceil.schedulers_per_sm
    mma = (cost.kloop_mma_flops * cost.trips + cost.other_mma_flops) / ceil.mma_flops_per_sm_clock
    if fit == 0 or ctas == 0:
        return LaunchPrediction(ctas, fit, 0, issue, mma, math.inf, memory_us, math.inf, "does not fit", False)
    per_sm = math.ceil(ctas / ceil.sms)
    full, rest = divmod(per_sm, fit)
    drained = cost.wgmma_wait == 0
    cycles, bound = 0.0, "issue"
    if full:
        full_cycles, bound = group_cycles(fit, issue, mma, drained)
        cycles += full * full_cycles
    if rest:
        rest_cycles, rest_bound = group_cycles(rest, issue, mma, drained)
        cycles += rest_cycles
        bound = bound if full else rest_bound
    compute_us = cycles / ceil.clock_hz * 1e6
    predicted = max(compute_us, memory_us)
    return LaunchPrediction(
        ctas=ctas,
        ctas_per_sm=fit,
        waves=full + (1 if rest else 0),
        issue_cycles=issue,
        mma_cycles=mma,
        compute_us=compute_us,
        memory_us=memory_us,
        predicted_us=predicted,
        bound="memory" if memory_us >= compute_us else bound,
        fits=True,
    )


def roofline_us(flops: float, bytes_moved: float, ceil: Ceilings = H200) -> float:
    """max(FLOPs at the bf16 rate, bytes at the HBM rate), in µs: library calls and op floors."""
    return max(flops / ceil.bf16_flops_per_s, bytes_moved / ceil.hbm_bytes_per_s) * 1e6
