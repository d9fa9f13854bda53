"""Read an sm_90 kernel's SASS (``cuobjdump -sass``) and resource usage (``cuobjdump -res-usage``).

Pure text parsing, no Triton or CUDA needed, so the unit tests can feed it handmade SASS.

What is read, and why:

* Loops are backward branches (``BRA`` to a lower address). The **K-loop** is the innermost loop
  that holds an MMA (``HGMMA`` = Hopper warpgroup MMA, ``HMMA`` = the older warp-level MMA): that
  is the loop whose trip cost the cost model multiplies by the trip count. When several innermost
  loops hold MMAs (the main loop and, say, a rank loop in the epilogue), the one with the most MMA
  FLOPs wins. A kernel with no MMA uses its innermost loop with the most instructions; a kernel
  with no loop at all uses its whole body.
* ``WARPGROUP.DEPBAR.LE gsb0, 0xN`` inside the K-loop is the wgmma wait depth: ``N`` wgmma groups
  may still be in flight when the loop moves on; 0 means the loop drains the tensor cores every
  trip, so the next trip's instructions cannot overlap this trip's MMA.
* MMA FLOPs come from the opcodes: ``HGMMA.64x128x16`` is one 64×128×16 MMA per warpgroup,
  ``HMMA.16816`` one 16×8×16 MMA per warp. Multiplying by the warpgroups / warps of the CTA gives
  the tensor-core work the hardware really does (padding included, e.g. 16-row tiles for M = 1).
* Spills: ``STL``/``LDL`` (local memory) instructions; the stack frame size is in the resource usage.
* ``LDGSTS`` is cp.async (Ampere-style asynchronous copy); ``UTMALDG``/``UBLKCP`` are TMA loads.
* Shared-memory traffic (:func:`smem_bytes`): what a CTA writes into or reads out of shared memory,
  from each instruction's width × 32 lanes × the CTA's warps: ``LDGSTS`` (cp.async writes), ``STS``,
  ``LDS`` (``.128`` 16 B, ``.64`` 8 B, ``.U16``/``.S16`` 2 B, ``.U8``/``.S8`` 1 B, none 4 B a lane),
  ``LDSM``/``STSM`` (ldmatrix / stmatrix: one 8×8 matrix of 16-bit values = 128 B a warp per
  ``.1``/``.2``/``.4``), and ``HGMMA``'s shared-memory operands, read once per warpgroup: B
  (n×k) always, A (m×k) too when its operand is a descriptor (``gdesc``) rather than registers.
  TMA copies (``UTMALDG``) carry their size in a descriptor the SASS does not show: not counted.
* Global stores (``STG``) outside the K-loop are the epilogue's bytes (:attr:`SassSummary.store_bytes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# "/*1d60*/   @!P1 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;   /* 0x41e0... */"
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[0-9T]+\s+")
_HEX = re.compile(r"0x([0-9a-fA-F]+)")
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
# Warp-level MMA shapes by opcode suffix (m, n, k).
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}
_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*0x([0-9a-fA-F]+)")
_RES = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_TMA_OPS = ("UTMALDG", "UBLKCP", "UTMASTG", "UTMAPF", "UTMAREDG")
_LANE_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}  # bytes a lane; 4 when none
_SMEM_LANE_OPS = ("LDGSTS", "STS", "LDS")  # one access of ``width`` bytes per lane
_MATRIX_OPS = ("LDSM", "STSM")  # 128 B a warp per 8×8 16-bit matrix
_MMA_ELEM_BYTES = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: its byte address, opcode (with modifiers) and the rest of the line."""

    addr: int
    opcode: str
    operands: str
    predicated: bool = False

    @property
    def base_op(self) -> str:
        return self.opcode.split(".", 1)[0]


def parse_sass(text: str) -> list[Instr]:
    """The instructions of the (single) kernel in ``cuobjdump -sass`` output, in address order."""
    instrs = []
    for line in text.splitlines():
        match = _INSTR.match(line)
        if not match:
            continue
        body = match.group(2).strip()
        predicated = bool(_PREDICATE.match(body))
        body = _PREDICATE.sub("", body)
        if not body:
            continue
        opcode, _, operands = body.partition(" ")
        instrs.append(Instr(int(match.group(1), 16), opcode, operands.strip(), predicated))
    return instrs


def branch_target(instr: Instr) -> int | None:
    """Target address of a direct branch (``BRA 0x19e0``), else None."""
    if instr.base_op != "BRA":
        return None
    match = _HEX.search(instr.operands)
    return int(match.group(1), 16) if match else None


def mma_flops(instr: Instr, num_warps: int) -> int:
    """FLOPs one execution of ``instr`` does across a CTA of ``num_warps`` warps (0 if not an MMA).

    HGMMA is a warpgroup (4-warp) instruction; HMMA is executed by every warp.
    """
    match = _HGMMA_SHAPE.match(instr.opcode)
    if match:
        m, n, k = (int(g) for g in match.groups())
        return 2 * m * n * k * max(1, num_warps // 4)
    if instr.base_op == "HMMA":
        suffix = instr.opcode.split(".")[1] if "." in instr.opcode else ""
        m, n, k = _HMMA_SHAPES.get(suffix, (16, 8, 16))
        return 2 * m * n * k * num_warps
    return 0


def lane_width(instr: Instr) -> int:
    """Bytes one lane moves in a load/store instruction, from its width modifier (4 B without one)."""
    for modifier in instr.opcode.split(".")[1:]:
        if modifier in _LANE_WIDTHS:
            return _LANE_WIDTHS[modifier]
    return 4


def smem_bytes(instr: Instr, num_warps: int) -> int:
    """Bytes one execution of ``instr`` writes into or reads from shared memory across a CTA of ``num_warps``."""
    op = instr.base_op
    if op in _SMEM_LANE_OPS:
        return lane_width(instr) * 32 * num_warps
    if op in _MATRIX_OPS:
        last = instr.opcode.rsplit(".", 1)[-1]
        matrices = int(last) if last in ("1", "2", "4") else 1
        return 128 * matrices * num_warps
    match = _HGMMA_SHAPE.match(instr.opcode)
    if match:
        m, n, k = (int(g) for g in match.groups())
        elem = next((_MMA_ELEM_BYTES[t] for t in reversed(instr.opcode.split(".")) if t in _MMA_ELEM_BYTES), 2)
        a_operand = instr.operands.split(",")[1].strip() if "," in instr.operands else ""
        per_group = n * k * elem + (m * k * elem if a_operand.startswith("gdesc") else 0)
        return per_group * max(1, num_warps // 4)
    return 0


def store_bytes(instr: Instr, num_warps: int) -> int:
    """Bytes one execution of a global store (``STG``) writes across a CTA (0 for anything else)."""
    return lane_width(instr) * 32 * num_warps if instr.base_op == "STG" else 0


def is_mma(instr: Instr) -> bool:
    return instr.base_op in ("HGMMA", "HMMA")


@dataclass(frozen=True)
class Loop:
    """Instructions [start, end] (addresses, inclusive) closed by the backward branch at ``end``."""

    start: int
    end: int

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and self != other

    def body(self, instrs: list[Instr]) -> list[Instr]:
        return [i for i in instrs if self.start <= i.addr <= self.end]


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every backward branch's loop; the ``BRA`` to itself that pads the end of a kernel is not one."""
    loops = {Loop(target, i.addr) for i in instrs if (target := branch_target(i)) is not None and target < i.addr}
    return sorted(loops, key=lambda loop: (loop.start, loop.end))


def kernel_body(instrs: list[Instr]) -> list[Instr]:
    """The instructions that can execute: without the trailing self-branch and NOP padding."""
    return [i for i in instrs if i.base_op != "NOP" and branch_target(i) != i.addr]


@dataclass
class SassSummary:
    """What the cost model needs from one kernel's SASS (per warp counts unless said)."""

    body_instr: int  # every instruction of the kernel, once
    kloop_instr: int  # instructions in the K-loop (= body_instr when there is no loop)
    has_loop: bool  # whether the K-loop is a real loop (False: the whole body counts once)
    kloop_mma_flops: int  # MMA FLOPs of one K-loop trip, whole CTA
    other_mma_flops: int  # MMA FLOPs outside the K-loop (counted once per CTA)
    wgmma_wait: int | None  # min N of WARPGROUP.DEPBAR.LE gsb0, N in the K-loop; None without one
    hgmma: bool
    hmma: bool
    cp_async: bool
    tma: bool
    kloop_spill_ops: int  # LDL/STL in the K-loop
    spill_ops: int  # LDL/STL anywhere
    n_loops: int
    kloop_range: tuple[int, int] | None = None
    opcode_histogram: dict[str, int] = field(default_factory=dict)  # K-loop base opcodes, most common first
    # Every innermost loop holding an MMA, in address order: (instructions per warp, MMA FLOPs of one
    # trip); kloop_index is the K-loop's place among them. A kernel with several MMA loops in a row
    # (say, a two-pass kernel) has each costed with its own trips when the source shows as many.
    mma_loops: list[tuple[int, int]] = field(default_factory=list)
    kloop_index: int | None = None
    kloop_smem_bytes: int = 0  # shared-memory bytes (written + read) of one K-loop trip, whole CTA
    other_smem_bytes: int = 0  # shared-memory bytes outside the K-loop, whole CTA, once
    store_bytes: int = 0  # global-store bytes outside the K-loop (the epilogue), whole CTA


def _innermost(loops: list[Loop]) -> list[Loop]:
    return [loop for loop in loops if not any(loop.contains(other) for other in loops)]


def select_kloop(instrs: list[Instr], loops: list[Loop], num_warps: int) -> Loop | None:
    """The K-loop: innermost MMA loop with the most MMA FLOPs; without MMA loops, the longest innermost loop."""
    mma_loops = [loop for loop in loops if any(is_mma(i) for i in loop.body(instrs))]
    if mma_loops:
        candidates = _innermost(mma_loops)
        return max(
            candidates,
            key=lambda loop: (sum(mma_flops(i, num_warps) for i in loop.body(instrs)), len(loop.body(instrs))),
        )
    if any(is_mma(i) for i in instrs):
        return None  # MMA only outside loops (e.g. a fully unrolled reduction): count the body once
    if loops:
        return max(_innermost(loops), key=lambda loop: len(loop.body(instrs)))
    return None


def summarize(text: str, num_warps: int) -> SassSummary:
    """Parse ``cuobjdump -sass`` text of one kernel compiled with ``num_warps`` warps."""
    instrs = kernel_body(parse_sass(text))
    if not instrs:
        raise ValueError("no SASS instructions found")
    loops = find_loops(instrs)
    kloop = select_kloop(instrs, loops, num_warps)
    in_loop = kloop.body(instrs) if kloop else instrs
    total_flops = sum(mma_flops(i, num_warps) for i in instrs)
    loop_flops = sum(mma_flops(i, num_warps) for i in in_loop)
    waits = [int(m.group(1), 16) for i in in_loop if (m := _WAIT.search(f"{i.opcode} {i.operands}"))]
    spills = lambda seq: sum(1 for i in seq if i.base_op in ("LDL", "STL"))
    histogram: dict[str, int] = {}
    for i in in_loop:
        histogram[i.base_op] = histogram.get(i.base_op, 0) + 1
    loop_smem = sum(smem_bytes(i, num_warps) for i in in_loop)
    outside = [i for i in instrs if not (kloop and kloop.start <= i.addr <= kloop.end)]
    with_mma = [loop for loop in loops if any(is_mma(i) for i in loop.body(instrs))]
    mma_inner = sorted(_innermost(with_mma), key=lambda loop: loop.start)
    return SassSummary(
        mma_loops=[
            (len(loop.body(instrs)), sum(mma_flops(i, num_warps) for i in loop.body(instrs))) for loop in mma_inner
        ],
        kloop_index=mma_inner.index(kloop) if kloop in mma_inner else None,
        body_instr=len(instrs),
        kloop_instr=len(in_loop),
        has_loop=kloop is not None,
        kloop_mma_flops=loop_flops,
        other_mma_flops=total_flops - loop_flops if kloop else 0,
        wgmma_wait=min(waits) if waits else None,
        hgmma=any(i.base_op == "HGMMA" for i in instrs),
        hmma=any(i.base_op == "HMMA" for i in instrs),
        cp_async=any(i.base_op == "LDGSTS" for i in instrs),
        tma=any(i.base_op in _TMA_OPS for i in instrs),
        kloop_spill_ops=spills(in_loop),
        spill_ops=spills(instrs),
        n_loops=len(loops),
        kloop_range=(kloop.start, kloop.end) if kloop else None,
        opcode_histogram=dict(sorted(histogram.items(), key=lambda kv: -kv[1])[:12]),
        kloop_smem_bytes=loop_smem,
        other_smem_bytes=sum(smem_bytes(i, num_warps) for i in outside) if kloop else 0,
        store_bytes=sum(store_bytes(i, num_warps) for i in outside),
    )


def parse_res_usage(text: str) -> dict[str, int]:
    """``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}`` of the (single) function in ``-res-usage`` output."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        if "REG:" in line:
            values.update({k: int(v) for k, v in _RES.findall(line)})
    if "REG" not in values:
        raise ValueError("no 'REG:' line in cuobjdump -res-usage output")
    return values
