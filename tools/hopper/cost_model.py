"""A compile-time lower bound on the run time of a kernel launch on an H200 (sm_90).

Pure arithmetic on numbers read from the cubin / SASS; no GPU, no Triton. The predictions are
lower bounds, never measurements.

Ceilings (measured on the H200 per the device's docs): clock 1.98 GHz, 132 SMs, bf16 dense
matmul 790 TFLOP/s (cuBLAS), device-to-device copy 4.3 TB/s counting read + write. The copy rate
is used as the achievable HBM rate (the 4.8 TB/s datasheet figure is not measured). One SM's
tensor cores then do 790e12 / (132 × 1.98e9) ≈ 3,023 FLOP per clock.

Further figures, each a lead (a stated estimate, not a measurement on our device machines):

* Shared memory: 128 B per clock per SM (32 banks × 4 B; NVIDIA's CUDA C++ Programming Guide,
  compute capability 9.0 shared-memory banks). The L1 / shared data path serves one 128-byte
  wavefront per clock, which also prices gathers (below).
* L2 -> SM: 2.5 × the HBM rate = 10.75 TB/s. A lead: the issue's own estimate; third-party
  figures for H100 SXM (e.g. ~12 TB/s quoted in public profiling write-ups) agree in size, and
  no measurement on an H200 is to hand.
* Global load latency: 700 cycles (a lead: microbenchmark write-ups of Hopper put an L2-miss
  load at ~600-800 cycles).
* Launch gap: 1.5 µs between two dependent launches of one op (a lead: the launch overhead
  plus the tail/ramp of a kernel as seen on a timeline; CUDA graphs would shrink it).

Per launch (one kernel, one autotune config):

* Occupancy: CTAs per SM = min(by shared memory: 228 KB per SM, 227 KB per block at most, each
  CTA also holding 1 KB the system reserves; by registers: 65,536 per SM, a warp's registers
  allocated in granules of 256 = 8 per thread; by threads: 2,048; 32 blocks).
* One CTA's work, four per-SM resources:
  issue cycles = (K-loop instructions × trips + every other instruction once) × num_warps / 4
  (4 schedulers per SM, one instruction per clock each); MMA cycles = (MMA FLOPs of a trip ×
  trips + MMA FLOPs outside the loop) / 3,023; shared-memory cycles = (bytes the K-loop writes
  into and reads out of shared memory per trip × trips + those outside once) / 128, the bytes
  from the SASS (cp.async / STS / LDS / LDSM widths × lanes × warps, wgmma's shared operands
  per warpgroup: sass.py); gather cycles = one per L1 wavefront of the data-dependent gathers
  (ttir.py: a warp-wide gather from a table costs the table's 128-byte lines, at most 32).
  Shared-memory and gather cycles share the L1 / shared data path: their sum is one resource,
  the "smem" bound.
* c CTAs resident on one SM share its schedulers, tensor cores and shared memory: a group of c
  takes max(c · issue, c · MMA, c · smem) cycles. When the K-loop drains wgmma every trip (wait
  depth 0) a CTA cannot overlap its own MMA with its own instructions: with one CTA per SM the
  group takes max(issue + MMA, smem); with more, never less than one CTA's issue + MMA.
* Pipeline fill and epilogue: a group of ONE CTA (one CTA per SM, or a lone CTA of the last wave)
  has nobody to hide its latencies, so it adds fill = (num_stages - 1) × 700 cycles (the loads of
  the prologue's stages before the first MMA; one latency for a kernel without a K-loop) and
  epilogue = its global-store bytes (the SASS's STG outside the K-loop) at the SM's share of the
  L2 rate (10.75 TB/s / 132 SMs / clock ≈ 41 B per clock).
* The busiest SM runs ceil(CTAs / 132) CTAs in groups of ``ctas_per_sm`` (waves); compute time =
  the sum over its groups / clock.
* Memory bounds: HBM = the bytes the launch must move (every tensor argument once: inputs read,
  outputs written) / HBM rate; L2 = the bytes all CTAs load (every CTA's tiles over its whole
  K-loop, from the TTIR's loads, gathers excluded) / the L2 rate.
* predicted = max(compute time, HBM bound, L2 bound); ``bound`` names the largest ("latency" when
  a lone CTA's fill + epilogue outweigh its busiest resource).

An op's prediction is the sum of its launches plus a launch gap of 1.5 µs per launch after the
first (its launches are dependent: decode's five run one after another).

Library calls the launchers run themselves (torch matmuls, casts, sums) are taken at roofline:
max(FLOPs / bf16 rate, bytes / HBM rate).

Caveats (all make the prediction lower, never higher, than a real run, unless said):

* The HBM bound assumes the full rate whatever the grid size; L2 hits are not modelled beyond the
  L2 bound (each tensor argument is read from HBM once).
* Loops other than the K-loop (an epilogue's rank loop, a reduction over split-K partials) are
  counted once per CTA; both sides of run-time branches are counted (that one can overestimate),
  and so are the masked lanes of a tail tile's loads (the L2 bound can overestimate a ragged tile).
* Trip counts are program 0's (a tail program may do fewer); the grid's last wave is charged in full.
* TMA copies are not in the shared-memory bytes (their size is in a descriptor); no kernel of
  ours issues them.
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
    smem_bytes_per_clock: int = 128  # per SM: 32 banks × 4 B (CUDA Programming Guide, cc 9.0)
    l2_bytes_per_s: float = 2.5 * 4.3e12  # a lead: 2.5 × HBM (see the module docstring)
    load_latency_cycles: int = 700  # a lead: global load latency, ~600-800 cycles
    launch_gap_s: float = 1.5e-6  # a lead: between dependent launches of one op

    @property
    def l2_bytes_per_sm_clock(self) -> float:
        return self.l2_bytes_per_s / (self.sms * self.clock_hz)

    @property
    def mma_flops_per_sm_clock(self) -> float:
        return self.bf16_flops_per_s / (self.sms * self.clock_hz)

    def contract(self) -> dict[str, float]:
        """The keys of the report's ``ceilings`` object."""
        keys = ("clock_hz", "sms", "bf16_flops_per_s", "hbm_bytes_per_s", "copy_bytes_per_s", "smem_bytes_per_clock",
                "l2_bytes_per_s", "load_latency_cycles", "launch_gap_s")  # fmt: skip
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
    kloop_smem_bytes: int = 0  # per CTA, one trip: written into + read out of shared memory
    other_smem_bytes: int = 0  # per CTA, once
    kloop_gather_wavefronts: int = 0  # per CTA, one trip: L1 wavefronts of data-dependent gathers
    other_gather_wavefronts: int = 0  # per CTA, once
    kloop_load_bytes: int = 0  # per CTA, one trip: global loads (gathers excluded)
    other_load_bytes: int = 0  # per CTA, once
    store_bytes: int = 0  # per CTA: the epilogue's global stores
    num_stages: int = 1
    has_loop: bool = False


@dataclass(frozen=True)
class LaunchPrediction:
    ctas: int
    ctas_per_sm: int
    waves: int
    issue_cycles: float  # one CTA
    mma_cycles: float  # one CTA
    compute_us: float
    memory_us: float  # the HBM bound
    predicted_us: float
    bound: str  # "memory", "l2", "mma", "issue", "smem", "latency" (fill + epilogue) or "serial" (issue + MMA)
    fits: bool
    smem_cycles: float = 0.0  # one CTA: shared-memory bytes / 128 + gather wavefronts
    gather_cycles: float = 0.0  # one CTA: the gathers' part of smem_cycles
    fill_cycles: float = 0.0  # one CTA: pipeline fill, paid by a group of one CTA
    epilogue_cycles: float = 0.0  # one CTA: its stores at the SM's L2 share, paid by a group of one
    l2_us: float = 0.0  # every CTA's loads at the L2 rate
    l2_bytes: int = 0
    lone_groups: int = 0  # groups of one CTA on the busiest SM (each pays fill + epilogue)


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


def group_cycles(
    resident: int, issue: float, mma: float, drained: bool, smem: float = 0.0, lone: float = 0.0
) -> tuple[float, str]:
    """Cycles for ``resident`` CTAs sharing one SM, and what bounds them.

    ``smem``: one CTA's shared-memory + gather cycles (the L1 / shared data path, shared like the
    tensor cores); ``lone``: fill + epilogue cycles, paid only when the CTA runs alone.
    """
    per_resource = {"issue": resident * issue, "mma": resident * mma, "smem": resident * smem}
    bound = max(per_resource, key=lambda k: (per_resource[k], k == "mma"))
    shared = per_resource[bound]
    if drained and (resident == 1 or issue + mma > shared) and issue + mma >= shared:
        shared, bound = issue + mma, "serial"
    if resident == 1 and lone > shared:
        bound = "latency"  # the lone CTA's fill + epilogue outweigh its busiest resource
    return shared + (lone if resident == 1 else 0.0), bound


def predict_launch(
    cost: KernelCost, grid: tuple[int, ...], bytes_moved: int, ceil: Ceilings = H200
) -> LaunchPrediction:
    """Lower-bound time of one launch of ``cost`` over ``grid`` moving ``bytes_moved`` bytes."""
    ctas = math.prod(grid)
    fit = ctas_per_sm(cost.num_warps, cost.regs, cost.smem, ceil)
    memory_us = bytes_moved / ceil.hbm_bytes_per_s * 1e6
    issue = (cost.kloop_instr * cost.trips + cost.other_instr) * cost.num_warps / ceil.schedulers_per_sm
    mma = (cost.kloop_mma_flops * cost.trips + cost.other_mma_flops) / ceil.mma_flops_per_sm_clock
    gather = float(cost.kloop_gather_wavefronts * cost.trips + cost.other_gather_wavefronts)
    smem = (cost.kloop_smem_bytes * cost.trips + cost.other_smem_bytes) / ceil.smem_bytes_per_clock + gather
    fill = ceil.load_latency_cycles * (max(1, cost.num_stages - 1) if cost.has_loop else 1)
    epilogue = cost.store_bytes / ceil.l2_bytes_per_sm_clock
    l2_bytes = ctas * (cost.kloop_load_bytes * cost.trips + cost.other_load_bytes)
    l2_us = l2_bytes / ceil.l2_bytes_per_s * 1e6
    if fit == 0 or ctas == 0:
        return LaunchPrediction(ctas, fit, 0, issue, mma, math.inf, memory_us, math.inf, "does not fit", False)
    per_sm = math.ceil(ctas / ceil.sms)
    full, rest = divmod(per_sm, fit)
    drained = cost.wgmma_wait == 0
    cycles, bound = 0.0, "issue"
    if full:
        full_cycles, bound = group_cycles(fit, issue, mma, drained, smem, fill + epilogue)
        cycles += full * full_cycles
    if rest:
        rest_cycles, rest_bound = group_cycles(rest, issue, mma, drained, smem, fill + epilogue)
        cycles += rest_cycles
        bound = bound if full else rest_bound
    compute_us = cycles / ceil.clock_hz * 1e6
    predicted = max(compute_us, memory_us, l2_us)
    if predicted > compute_us:
        bound = "memory" if memory_us >= l2_us else "l2"
    return LaunchPrediction(
        ctas=ctas,
        ctas_per_sm=fit,
        waves=full + (1 if rest else 0),
        issue_cycles=issue,
        mma_cycles=mma,
        compute_us=compute_us,
        memory_us=memory_us,
        predicted_us=predicted,
        bound=bound,
        fits=True,
        smem_cycles=smem,
        gather_cycles=gather,
        fill_cycles=fill,
        epilogue_cycles=epilogue,
        l2_us=l2_us,
        l2_bytes=l2_bytes,
        lone_groups=(full if fit == 1 else 0) + (1 if rest == 1 else 0),
    )


def launch_gaps_us(launches: int, ceil: Ceilings = H200) -> float:
    """The gaps between an op's ``launches`` dependent launches: one per launch after the first, in µs."""
    return max(0, launches - 1) * ceil.launch_gap_s * 1e6


def roofline_us(flops: float, bytes_moved: float, ceil: Ceilings = H200) -> float:
    """max(FLOPs at the bf16 rate, bytes at the HBM rate), in µs: library calls and op floors."""
    return max(flops / ceil.bf16_flops_per_s, bytes_moved / ceil.hbm_bytes_per_s) * 1e6
