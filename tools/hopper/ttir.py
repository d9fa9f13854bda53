"""Read a kernel's TTIR (``compiled.asm["ttir"]``): the global bytes a CTA loads, and its data-dependent gathers.

Pure text parsing of Triton's MLIR, no Triton needed, so the unit tests feed it handmade IR.
TTIR is read (not SASS) because it still says, per ``tt.load``, the tile shape and element type
(hence bytes per CTA) and where each pointer comes from (hence which loads are gathers); both
Triton 3.6 and 3.9 name SSA values and arguments after the source's variables.

* **Loads per CTA**: every ``tt.load``'s pointer type gives its elements and element bytes (masked
  lanes included: a tail tile is counted whole). Loads inside the K-loop (the innermost
  ``scf.for`` holding the ``tt.dot`` with the most FLOPs; without a dot, the innermost loop with
  the most ops) count per trip, every other load once, as the SASS instructions are counted.
* **Gathers**: a ``tt.load`` whose address offsets depend on the result of another tensor
  ``tt.load`` (through any arithmetic) reads data-dependent addresses: a table lookup such as the
  NF4 pair table ``pair_ptr + packed``. Its table is the kernel argument the pointer starts from
  (followed back through ``tt.addptr`` / ``tt.splat`` / ``tt.broadcast`` / ``tt.expand_dims``);
  the launch knows that tensor's size. Gathers are not counted as L2 traffic: a table small enough
  to gather from stays in L1 (the cost model charges its wavefronts instead).
* **Row gathers** are loads: a [d0, …, dn] tile whose load-dependent offsets all come from
  [d0, …, dn-1] loads (``x_ptr + rows[:, None] * K + offs_k[None, :]``, the mixed-adapter batch's
  gathered rows) reads whole runs along its last dimension, coalesced as any tile, from memory
  (not from an L1 table): its bytes count as loads, with no gather wavefronts.

Detected from the IR rather than annotated per kernel, so a new kernel's gathers are found without
an entry anywhere; the handmade-IR tests pin the rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_ASSIGN = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?(?:\s*,\s*%[\w.$-]+)*\s*=\s*([\w.]+)\s*(.*)$")
_VALUE = re.compile(r"%[\w.$-]+")
_FUNC_ARG = re.compile(r"(%[\w.$-]+)\s*:\s*!tt\.ptr")
_PTR_TYPE = re.compile(r":\s*(?:tensor<((?:\d+x)*)!tt\.ptr<([\w]+)>>|!tt\.ptr<([\w]+)>)")
_DOT = re.compile(r"tensor<(\d+)x(\d+)x\w+>\s*\*\s*tensor<(\d+)x(\d+)x\w+>")
_ELEM_BYTES = {"i1": 1, "i8": 1, "i16": 2, "f16": 2, "bf16": 2, "i32": 4, "f32": 4, "i64": 8, "f64": 8}
_POINTER_OPS = ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape")


def elem_bytes(type_name: str) -> int:
    """Bytes of one element of an MLIR scalar type (fp8 types: 1)."""
    return _ELEM_BYTES.get(type_name, 1 if type_name.startswith("f8") else 4)


@dataclass
class Op:
    name: str
    opcode: str
    operands: list[str]
    text: str
    loops: tuple[int, ...]  # the scf.for regions around it, outermost first


@dataclass
class Gather:
    """A data-dependent load: ``elements`` addresses a CTA gathers from kernel argument ``table``."""

    table: str | None  # argument name (None: the pointer's origin is not an argument)
    elements: int
    elem_bytes: int
    in_kloop: bool


@dataclass
class LoadSummary:
    """Global loads of one CTA: bytes per K-loop trip and once, and the gathers."""

    kloop_load_bytes: int = 0
    other_load_bytes: int = 0
    gathers: list[Gather] = field(default_factory=list)


def parse(text: str) -> tuple[list[Op], set[str]]:
    """The ops of the (single) function with their enclosing loops, and its pointer argument names."""
    ops: list[Op] = []
    args: set[str] = set()
    stack: list[int | None] = []  # one entry per open region: a loop id, or None (if/else, func)
    next_loop = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("tt.func"):
            args |= set(_FUNC_ARG.findall(line))
        if line.startswith("}"):
            if stack:
                stack.pop()
            if line.rstrip().endswith("{"):  # "} else {"
                stack.append(None)
            continue
        loops = tuple(loop for loop in stack if loop is not None)
        match = _ASSIGN.match(line)
        if match:
            name, opcode, rest = match.groups()
            ops.append(Op(name, opcode, _VALUE.findall(rest), line, loops))
        elif line.startswith("tt.store") or line.startswith("tt.dot"):
            ops.append(Op("", line.split()[0], _VALUE.findall(line), line, loops))
        if line.endswith("{"):
            opened = match.group(2) if match else line.split()[0]
            stack.append(next_loop if opened == "scf.for" else None)
            next_loop += opened == "scf.for"
    return ops, args


def _load_shape(op: Op) -> tuple[int, int]:
    """(elements, element bytes) of a ``tt.load`` from its pointer type."""
    match = _PTR_TYPE.search(op.text)
    if not match:
        return 1, 4
    dims, tensor_elem, scalar_elem = match.groups()
    if tensor_elem is None:
        return 1, elem_bytes(scalar_elem)
    return math.prod(int(d) for d in dims.split("x") if d), elem_bytes(tensor_elem)


def kloop_id(ops: list[Op]) -> int | None:
    """The K-loop's id: innermost loop of the dot with the most FLOPs, else the innermost loop with the most ops."""
    best: tuple[int, int] | None = None
    for op in ops:
        if op.opcode == "tt.dot" and op.loops and (match := _DOT.search(op.text)):
            m, k, _, n = (int(g) for g in match.groups())
            if best is None or 2 * m * n * k > best[0]:
                best = (2 * m * n * k, op.loops[-1])
    if best:
        return best[1]
    counts: dict[int, int] = {}
    for op in ops:
        if op.loops:
            counts[op.loops[-1]] = counts.get(op.loops[-1], 0) + 1
    inner = [loop for loop in counts if not any(loop in op.loops[:-1] for op in ops)]
    return max(inner, key=lambda loop: counts[loop]) if inner else None


def _dependent_loads(value: str, defs: dict[str, Op], limit: int = 200) -> list[Op]:
    """The tensor ``tt.load`` ops whose results ``value`` is computed from (through any ops, not past a load)."""
    seen, todo, found = set(), [value], []
    while todo and len(seen) < limit:
        current = todo.pop()
        if current in seen or current not in defs:
            continue
        seen.add(current)
        op = defs[current]
        if op.opcode == "tt.load":
            if _load_shape(op)[0] > 1:
                found.append(op)
            continue
        todo += op.operands
    return found


def _load_dims(op: Op) -> tuple[int, ...]:
    """A tensor ``tt.load``'s tile shape (() for a scalar load)."""
    match = _PTR_TYPE.search(op.text)
    if not match or match.group(2) is None:
        return ()
    return tuple(int(d) for d in match.group(1).split("x") if d)


def _pointer_origin(value: str, defs: dict[str, Op], args: set[str]) -> tuple[str | None, list[Op]]:
    """(argument the pointer ``value`` starts from, the tensor loads any of its offsets depends on)."""
    index_loads: list[Op] = []
    while value not in args:
        op = defs.get(value)
        if op is None or op.opcode not in _POINTER_OPS or not op.operands:
            return None, index_loads
        if op.opcode == "tt.addptr" and len(op.operands) > 1:
            index_loads += _dependent_loads(op.operands[1], defs)
        value = op.operands[0]
    return value.lstrip("%"), index_loads


def _is_row_gather(load: Op, index_loads: list[Op]) -> bool:
    """Whether a [d0, …, dn] tile's data-dependent offsets are all per row: every index load is [d0, …, dn-1].

    Then each row of the tile is a run along the last (contiguous) dimension from an index (a
    gathered activation row, Punica-style), which loads as coalesced as any tile: no table lookup.
    """
    dims = _load_dims(load)
    return len(dims) >= 2 and all(_load_dims(index) == dims[:-1] for index in index_loads)


def summarize(text: str) -> LoadSummary:
    """Loads and gathers of one CTA of the kernel whose TTIR is ``text``."""
    ops, args = parse(text)
    defs = {op.name: op for op in ops if op.name}
    kloop = kloop_id(ops)
    out = LoadSummary()
    for op in ops:
        if op.opcode != "tt.load" or not op.operands:
            continue
        elements, size = _load_shape(op)
        in_kloop = kloop is not None and kloop in op.loops
        table, index_loads = _pointer_origin(op.operands[0], defs, args)
        if index_loads and elements > 1 and not _is_row_gather(op, index_loads):
            out.gathers.append(Gather(table, elements, size, in_kloop))
        elif in_kloop:
            out.kloop_load_bytes += elements * size
        else:
            out.other_load_bytes += elements * size
    return out


def gather_wavefronts(gather: Gather, table_bytes: int | None, line: int = 128, lanes: int = 32) -> int:
    """L1 wavefronts of one execution of ``gather`` by a CTA: warp-wide gathers × distinct lines each.

    Data-dependent addresses may hit every line of the table: a warp's gather costs the table's
    line count, capped at one line per lane (unknown table: the cap).
    """
    lines = lanes if table_bytes is None else max(1, min(lanes, math.ceil(table_bytes / line)))
    return math.ceil(gather.elements / lanes) * lines
