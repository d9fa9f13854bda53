"""Trip counts of a Triton kernel's loops for one launch, read from the kernel's Python source.

The SASS gives a K-loop's cost per trip; how many trips a CTA makes depends on the launch's
arguments. This walks the kernel's AST (and the ``@triton.jit`` helpers it calls) with the bound
arguments, evaluating ``for ... in range(start, stop, step)`` (also ``tl.range``) bounds made of
arguments, constexprs, module constants, ``tl.program_id`` (taken as 0: the trips of the first
program, the typical one; a tail program may do fewer), ``tl.num_programs``, ``tl.cdiv``,
``tl.minimum`` / ``tl.maximum``, ``min`` / ``max``, ``.to(...)`` and integer arithmetic. Branches on
constexprs are followed; others are walked on both sides.

:func:`main_loop` picks the loop the cost model multiplies: the innermost loop holding a
``tl.dot`` with the most trips per CTA (or, without any dot, the loop with the most trips).
A loop whose bounds cannot be evaluated raises :class:`TripCountError`, unless the kernel has an
entry in :data:`TRIP_OVERRIDES` — a kernel's "module:attribute" name mapped to a function of the
bound arguments (a dict: argument name -> value; tensors appear as None) returning the trips.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# "module:attribute" -> trips per CTA of the main loop, for kernels whose bounds this cannot read.
TRIP_OVERRIDES: dict[str, Callable[[dict[str, Any]], int]] = {}


class TripCountError(RuntimeError):
    """A main loop whose bounds the evaluator cannot read."""


class _Unknown:
    def __repr__(self) -> str:
        return "?"


UNKNOWN = _Unknown()


@dataclass
class LoopInfo:
    """One ``for`` loop met while walking the kernel for one launch."""

    where: str  # "function:line"
    source: str  # the range(...) text
    trips: int | None  # trips of one entry into the loop (None: not evaluable)
    total: int | None  # trips per CTA, enclosing loops multiplied in
    has_dot: bool
    innermost_dot: bool = True  # no dot loop nested inside it


def _jit_fn(value: Any):
    """``value`` if it is a Triton jit function (JITFunction, or the interpreter's stand-in), else None."""
    return value if hasattr(value, "fn") and inspect.isfunction(value.fn) and not inspect.isfunction(value) else None


def _kernel_fn(kernel: Any):
    """The jit function under Autotuner / Heuristics wrappers (each keeps the wrapped one in ``.fn``)."""
    obj = kernel
    while hasattr(obj, "fn") and not inspect.isfunction(obj.fn):
        obj = obj.fn
    if _jit_fn(obj) is None:
        raise TypeError(f"{kernel!r} is not a Triton kernel")
    return obj


def kernel_id(kernel: Any) -> str:
    """ "module:attribute" of a kernel (as sm90.kernel_name, without importing Triton's compiler)."""
    fn = _kernel_fn(kernel).fn
    return f"{fn.__module__}:{fn.__qualname__}"


@functools.cache
def _tree(fn) -> ast.FunctionDef:
    src = getattr(fn, "src", None) or inspect.getsource(fn.fn)
    module = ast.parse(textwrap.dedent(src))
    node = next(n for n in module.body if isinstance(n, ast.FunctionDef))
    return node


def _is_dot_attr(func: ast.expr) -> bool:
    return isinstance(func, ast.Attribute) and func.attr in ("dot", "dot_scaled")


def _contains_dot(fn, depth: int = 0) -> bool:
    """Whether ``fn`` (a JITFunction) calls tl.dot, directly or through jit helpers."""
    return _has_dot_nodes(fn, _tree(fn).body, depth)


def _has_dot_nodes(fn, nodes: list[ast.AST], depth: int) -> bool:
    if depth > 8:
        return False
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                if _is_dot_attr(sub.func):
                    return True
                callee = _resolve_callee(fn, sub.func)
                if callee is not None and _contains_dot(callee, depth + 1):
                    return True
    return False


def _lookup(fn, name: str) -> Any:
    """``name`` as the kernel's code sees it: a closure cell, a module global or a builtin."""
    code = fn.fn.__code__
    if name in code.co_freevars and fn.fn.__closure__:
        return fn.fn.__closure__[code.co_freevars.index(name)].cell_contents
    if name in fn.fn.__globals__:
        return fn.fn.__globals__[name]
    import builtins

    return getattr(builtins, name, UNKNOWN)


def _resolve_callee(fn, func: ast.expr):
    if isinstance(func, ast.Name):
        return _jit_fn(_lookup(fn, func.id))
    return None


_INT_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Div: lambda a, b: a / b,
    ast.Mod: lambda a, b: a % b,
    ast.LShift: lambda a, b: a << b,
    ast.RShift: lambda a, b: a >> b,
    ast.BitAnd: lambda a, b: a & b,
    ast.BitOr: lambda a, b: a | b,
    ast.Pow: lambda a, b: a**b,
}
_CMP_OPS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Is: lambda a, b: a is b,
    ast.IsNot: lambda a, b: a is not b,
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Walker:
    """Walks one kernel (and the helpers it calls) for one launch, collecting loops."""

    def __init__(self, args: dict[str, Any], grid: tuple[int, int, int]) -> None:
        self.grid = grid
        self.args = args
        self.loops: list[LoopInfo] = []

    # -- expressions ----------------------------------------------------------------------

    def value(self, node: ast.expr, env: dict[str, Any], fn) -> Any:
        try:
            return self._value(node, env, fn)
        except (ArithmeticError, TypeError, ValueError, AttributeError, IndexError, KeyError):
            return UNKNOWN

    def _global(self, fn, name: str) -> Any:
        value = _lookup(fn, name)
        return getattr(value, "value", value) if type(value).__name__ == "constexpr" else value

    def _value(self, node: ast.expr, env: dict[str, Any], fn) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id] if node.id in env else self._global(fn, node.id)
        if isinstance(node, ast.Attribute):
            base = self._value(node.value, env, fn)
            return UNKNOWN if base is UNKNOWN else getattr(base, node.attr, UNKNOWN)
        if isinstance(node, ast.BinOp):
            a, b = self._value(node.left, env, fn), self._value(node.right, env, fn)
            if a is UNKNOWN or b is UNKNOWN or type(node.op) not in _INT_OPS:
                return UNKNOWN
            return _INT_OPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp):
            a = self._value(node.operand, env, fn)
            if a is UNKNOWN:
                return UNKNOWN
            return {ast.USub: lambda v: -v, ast.Not: lambda v: not v, ast.UAdd: lambda v: v}.get(
                type(node.op), lambda v: UNKNOWN
            )(a)
        if isinstance(node, ast.BoolOp):
            values = [self._value(v, env, fn) for v in node.values]
            if any(v is UNKNOWN for v in values):
                return UNKNOWN
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            a, b = self._value(node.left, env, fn), self._value(node.comparators[0], env, fn)
            if a is UNKNOWN or b is UNKNOWN:
                return UNKNOWN
            return _CMP_OPS[type(node.ops[0])](a, b)
        if isinstance(node, ast.IfExp):
            cond = self._value(node.test, env, fn)
            if cond is UNKNOWN:
                return UNKNOWN
            return self._value(node.body if cond else node.orelse, env, fn)
        if isinstance(node, ast.Call):
            return self._call(node, env, fn)
        return UNKNOWN

    def _call(self, node: ast.Call, env: dict[str, Any], fn) -> Any:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("to", "multiple_of", "max_contiguous"):
            # x.to(dtype) keeps the value; tl.multiple_of(x, n) / tl.max_contiguous(x, n) return x.
            target = node.args[0] if func.attr != "to" and node.args else func.value
            return self._value(target, env, fn)
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        args = [self._value(a, env, fn) for a in node.args]
        if any(a is UNKNOWN for a in args):
            return UNKNOWN
        if name == "program_id":
            return 0
        if name == "num_programs":
            return self.grid[args[0]]
        if name == "cdiv":
            return _cdiv(*args)
        if name in ("minimum", "min"):
            return min(args)
        if name in ("maximum", "max"):
            return max(args)
        if name == "constexpr":
            return args[0]
        if name == "next_power_of_2":
            return 1 << (int(args[0]) - 1).bit_length()
        return UNKNOWN

    # -- statements -----------------------------------------------------------------------

    def walk(self, fn, body: list[ast.stmt], env: dict[str, Any], mult: int | None, depth: int) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Return):
                self._calls(stmt, env, fn, mult, depth)
                return
            if isinstance(stmt, ast.Assign):
                self._calls(stmt.value, env, fn, mult, depth)
                value = self.value(stmt.value, env, fn)
                for target in stmt.targets:
                    self._bind(target, value, env)
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                self._calls(stmt.value, env, fn, mult, depth)
                self._bind(stmt.target, self.value(stmt.value, env, fn), env)
            elif isinstance(stmt, ast.AugAssign):
                self._calls(stmt.value, env, fn, mult, depth)
                op = ast.BinOp(
                    left=ast.Name(id=getattr(stmt.target, "id", "?"), ctx=ast.Load()), op=stmt.op, right=stmt.value
                )
                self._bind(stmt.target, self.value(op, env, fn), env)
            elif isinstance(stmt, ast.For):
                self._for(stmt, env, fn, mult, depth)
            elif isinstance(stmt, ast.While):
                self._loop(stmt, fn, "while", None, env, mult, depth)
            elif isinstance(stmt, ast.If):
                cond = self.value(stmt.test, env, fn)
                if cond is UNKNOWN:
                    self.walk(fn, stmt.body, env, mult, depth)
                    self.walk(fn, stmt.orelse, env, mult, depth)
                else:
                    self.walk(fn, stmt.body if cond else stmt.orelse, env, mult, depth)
            elif isinstance(stmt, (ast.Expr, ast.Assert)):
                self._calls(stmt, env, fn, mult, depth)
            elif isinstance(stmt, ast.With):
                self.walk(fn, stmt.body, env, mult, depth)

    def _bind(self, target: ast.expr, value: Any, env: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = value if isinstance(value, tuple) and len(value) == len(target.elts) else None
            for i, elt in enumerate(target.elts):
                self._bind(elt, values[i] if values else UNKNOWN, env)

    def _calls(self, node: ast.AST, env: dict[str, Any], fn, mult: int | None, depth: int) -> None:
        """Walk the jit helpers called in ``node`` (they may hold loops)."""
        if depth > 8:
            return
        for sub in ast.walk(node):
            if not isinstance(sub, ast.Call):
                continue
            callee = _resolve_callee(fn, sub.func)
            if callee is None:
                continue
            tree = _tree(callee)
            if not any(isinstance(n, (ast.For, ast.While)) for n in ast.walk(tree)):
                continue
            params = [a.arg for a in tree.args.args]
            defaults = dict(zip(params[len(params) - len(tree.args.defaults) :], tree.args.defaults, strict=True))
            call_env: dict[str, Any] = {}
            for name, arg in zip(params, sub.args, strict=False):
                call_env[name] = self.value(arg, env, fn)
            for kw in sub.keywords:
                if kw.arg:
                    call_env[kw.arg] = self.value(kw.value, env, fn)
            for name, default in defaults.items():
                call_env.setdefault(name, self.value(default, {}, callee))
            self.walk(callee, tree.body, call_env, mult, depth + 1)

    def _for(self, stmt: ast.For, env: dict[str, Any], fn, mult: int | None, depth: int) -> None:
        call = stmt.iter
        trips, start = None, UNKNOWN
        is_range = isinstance(call, ast.Call) and (
            (isinstance(call.func, ast.Name) and call.func.id == "range")
            or (isinstance(call.func, ast.Attribute) and call.func.attr in ("range", "static_range"))
        )
        if is_range:
            bounds = [self.value(a, env, fn) for a in call.args]
            if bounds and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
                rng = range(*bounds)
                trips, start = len(rng), rng.start
        self._calls(call, env, fn, mult, depth)
        self._loop(stmt, fn, ast.unparse(call), trips, env, mult, depth, stmt.target, start)

    def _loop(self, stmt, fn, source, trips, env, mult, depth, target=None, start=UNKNOWN) -> None:
        total = None if trips is None or mult is None else trips * mult
        info = LoopInfo(
            where=f"{fn.fn.__name__}:{stmt.lineno}",
            source=source,
            trips=trips,
            total=total,
            has_dot=_has_dot_nodes(fn, stmt.body, 0),
        )
        self.loops.append(info)
        first = len(self.loops)
        body_env = dict(env)
        if target is not None:
            self._bind(target, start, body_env)
        self.walk(fn, stmt.body, body_env, total, depth)
        if info.has_dot and any(inner.has_dot for inner in self.loops[first:]):
            info.innermost_dot = False
        # Names the loop body assigns are unknown after it (they change from trip to trip).
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                env[node.id] = UNKNOWN


def loops(kernel: Any, args: dict[str, Any], grid: tuple[int, ...]) -> list[LoopInfo]:
    """Every loop the kernel runs for these bound arguments (tensors may be anything)."""
    fn = _kernel_fn(kernel)
    tree = _tree(fn)
    env = {
        name: (value if isinstance(value, (bool, int, float, str)) or value is None else UNKNOWN)
        for name, value in args.items()
    }
    walker = _Walker(env, (*grid, 1, 1)[:3])
    walker.walk(fn, tree.body, dict(env), 1, 0)
    return walker.loops


def main_loop(kernel: Any, args: dict[str, Any], grid: tuple[int, ...]) -> tuple[int, LoopInfo | None]:
    """(trips per CTA, the loop) of the loop the cost model multiplies; (1, None) for a loop-free kernel."""
    name = kernel_id(kernel)
    found = loops(kernel, args, grid)
    dot_loops = [loop for loop in found if loop.has_dot and loop.innermost_dot]
    candidates = dot_loops or found
    if not candidates:
        return 1, None
    best = max(candidates, key=lambda loop: loop.total or 0)
    if name in TRIP_OVERRIDES:
        plain = {k: (v if isinstance(v, (bool, int, float, str)) else None) for k, v in args.items()}
        return int(TRIP_OVERRIDES[name](plain)), best
    unknown = [loop for loop in candidates if loop.total is None]
    if unknown:
        loop = unknown[0]
        raise TripCountError(
            f"{name}: cannot evaluate the trips of `for ... in {loop.source}` ({loop.where}); "
            f"add an entry for {name!r} to TRIP_OVERRIDES in tools/hopper/trip_count.py"
        )
    return int(best.total or 0), best


def dot_loops(kernel: Any, args: dict[str, Any], grid: tuple[int, ...]) -> list[LoopInfo]:
    """The innermost loops holding a ``tl.dot``, in the order the kernel runs them."""
    return [loop for loop in loops(kernel, args, grid) if loop.has_dot and loop.innermost_dot]
