"""Imports go one way: the package's import graph, read from the source (imports inside functions
too, not those under ``if TYPE_CHECKING:``), has no circle, and the layers import only downwards.

The layers (README "Layout"): the package and the applications (cli, train, benchmark) on top; the
front doors (patch) over the registry and the Hugging Face hooks; the methods (lora, ia3, adapters,
prompt_methods) over the shared pieces (method, targeting, host); then layers, ops, kernels.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peft_fast"
# What may not import what: a shared piece or a method never imports a method, the registry or a
# front door (that was the circle: patch <-> io <-> every method).
METHOD_MODULES = ("peft_fast.lora", "peft_fast.ia3", "peft_fast.adapters", "peft_fast.prompt_methods")
SHARED_MODULES = ("peft_fast.method", "peft_fast.targeting", "peft_fast.host", "peft_fast.io",
                  "peft_fast.adapter_files",
                  "peft_fast.config", "peft_fast.quantize", "peft_fast.layers")  # fmt: skip
ABOVE_METHODS = ("peft_fast.registry", "peft_fast.front_doors", "peft_fast.hf_integration")


def _is_in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a ``from X import name`` of a submodule counts it)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
                ]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # peft_fast.front_doors imports peft_fast.peft_interop only inside a function.
    assert "peft_fast.peft_interop" in graph["peft_fast.front_doors"]
    assert "peft_fast.kernels.lora_gemms" in graph["peft_fast.kernels.lora_linear"]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, f"import circles: {[sorted(c) for c in found]}"


def test_methods_and_shared_pieces_import_nothing_above_them():
    graph = import_graph()
    for name, imported in graph.items():
        if _is_in(name, SHARED_MODULES):
            above = {m for m in imported if _is_in(m, METHOD_MODULES + ABOVE_METHODS) or m == "peft_fast"}
            assert not above, f"shared module {name} imports {sorted(above)}"
        if _is_in(name, METHOD_MODULES):
            method = next(p for p in METHOD_MODULES if _is_in(name, (p,)))
            others = {m for m in imported if _is_in(m, METHOD_MODULES) and not _is_in(m, (method,))}
            above = {m for m in imported if _is_in(m, ABOVE_METHODS) or m == "peft_fast"}
            assert not others | above, f"method module {name} imports {sorted(others | above)}"


def test_kernels_import_nothing_above_them():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith("peft_fast.kernels"):
            above = {m for m in imported if not m.startswith("peft_fast.kernels") and m != "peft_fast.nf4"}
            assert not above, f"{name} imports {sorted(above)}"
