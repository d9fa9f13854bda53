"""Imports go one way: every module of the package has a row, and imports only from its row or below.

The rows (README "Design"), top to bottom; an entry is a top-level module or a subpackage (all of it):

1. the package and the applications: ``peft_fast``, ``cli``, ``train/``, ``distributed`` (the train
   job's data parallelism: it raises the job's ``UsageError``), ``benchmark/``, ``step_model/``
2. the front doors: ``front_doors``, ``peft_interop``
3. ``hf_integration``, ``registry``
4. the methods: ``lora/``, ``ia3``, ``adapters``, ``prompt_methods/`` (none imports another)
5. what the methods share: ``method``, ``targeting``, ``host``, ``adapter_files``, ``io``, ``quantize``,
   ``layers``, ``fused/``, ``data``, ``version``
6. ``ops/``, ``nf4``, ``models/``, ``config`` (``ops/adapter.py`` checks an activation against
   ``config.ADAPTER_NON_LINEARITIES``, so the configs sit with the ops; they import only ``nf4``)
7. ``kernels/``, which import nothing above them but ``peft_fast.nf4`` (the format they read)

Modules of one row may import each other, as long as there is no circle. The graph is read from
the source: imports inside functions count, those under ``if TYPE_CHECKING:`` do not count for
the rows (they never run) but do for circles (a type-only circle is a circle in the design).

Private names: a name with a leading underscore (a ``_function`` or a ``_module``) is imported
only by a module of its own unit, a subpackage (``peft_fast.lora``, ``peft_fast.kernels``, ...) or
a single top-level module. What units share is public.

Each checker is also run on a synthetic import (``test_the_checkers_flag_*``), so none of the
checks can pass because the checker sees nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).resolve().parents[1] / "peft_fast"

ROWS: tuple[tuple[str, ...], ...] = (
    ("peft_fast", "peft_fast.cli", "peft_fast.train", "peft_fast.distributed", "peft_fast.benchmark",
     "peft_fast.step_model"),
    ("peft_fast.front_doors", "peft_fast.peft_interop"),
    ("peft_fast.hf_integration", "peft_fast.registry"),
    ("peft_fast.lora", "peft_fast.ia3", "peft_fast.adapters", "peft_fast.prompt_methods"),
    ("peft_fast.method", "peft_fast.targeting", "peft_fast.host", "peft_fast.adapter_files", "peft_fast.io",
     "peft_fast.quantize", "peft_fast.layers", "peft_fast.fused", "peft_fast.data", "peft_fast.version"),
    ("peft_fast.ops", "peft_fast.nf4", "peft_fast.models", "peft_fast.config"),
    ("peft_fast.kernels",),
)  # fmt: skip
METHODS = ROWS[3]  # methods import no other method
# The one import allowed upwards: the kernels read the NF4 format.
ALLOWED_UPWARD = {("peft_fast.kernels", "peft_fast.nf4")}


class Import(NamedTuple):
    """One import statement's edge: ``importer`` imports ``names`` of module ``target`` (``None``: the module)."""

    importer: str
    target: str
    names: tuple[str, ...]
    line: int
    type_checking: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def parse_imports(name: str, source: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import of ``peft_fast`` modules in ``source`` (module ``name``), functions' bodies included.

    ``from X import y`` of a submodule ``X.y`` is an import of ``X.y``; of a name, an import of ``X``.
    """
    tree = ast.parse(source)
    type_checking = _type_checking_lines(tree)
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, (), node.lineno, node.lineno in type_checking))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source_module = ".".join(base + ([node.module] if node.module else []))
            else:
                source_module = node.module or ""
            for alias in node.names:
                submodule = f"{source_module}.{alias.name}"
                target, names = (submodule, ()) if submodule in modules else (source_module, (alias.name,))
                found.append(Import(name, target, names, node.lineno, node.lineno in type_checking))
    return [edge for edge in found if edge.target in modules and edge.target != name]


def all_imports() -> list[Import]:
    modules = package_modules()
    return [
        edge
        for name, path in modules.items()
        for edge in parse_imports(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", set(modules))
    ]


def import_graph(imports: list[Import], type_checking: bool = False) -> dict[str, set[str]]:
    """module -> the package modules it imports (those under TYPE_CHECKING only if asked)."""
    graph: dict[str, set[str]] = {name: set() for name in package_modules()}
    for edge in imports:
        if type_checking or not edge.type_checking:
            graph.setdefault(edge.importer, set()).add(edge.target)
    return graph


def _entry(module: str) -> str | None:
    """The ROWS entry a module belongs to: the longest entry that is it or a package above it."""
    entries = [e for row in ROWS for e in row if module == e or (e != "peft_fast" and module.startswith(e + "."))]
    return max(entries, key=len, default=None)


def row_of(module: str) -> int | None:
    entry = _entry(module)
    return None if entry is None else next(i for i, row in enumerate(ROWS) if entry in row)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'importer (row i) -> imported (row j)' for every import from a row above, and between methods."""
    found = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            mine, theirs = row_of(importer), row_of(target)
            allowed = (_entry(importer), _entry(target)) in ALLOWED_UPWARD
            if mine is not None and theirs is not None and theirs < mine and not allowed:
                found.append(f"{importer} (row {mine + 1}) -> {target} (row {theirs + 1})")
            elif mine == theirs and _entry(importer) in METHODS and _entry(importer) != _entry(target):
                found.append(f"{importer} -> {target} (another method)")
    return found


def unit_of(module: str) -> str:
    """A subpackage of peft_fast (``peft_fast.lora``), else the module itself (each top-level module)."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1] / "__init__.py").is_file():
        return ".".join(parts[:2])
    return module


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(imports: list[Import]) -> list[str]:
    """'importer:line imports module.name' for each private name or module imported from another unit."""
    found = []
    for edge in imports:
        if unit_of(edge.importer) == unit_of(edge.target):
            continue
        private_module = any(_is_private(part) for part in edge.target.split(".")[1:])
        for name in edge.names or ("",):
            if private_module or _is_private(name):
                found.append(f"{edge.importer}:{edge.line} imports {edge.target}{'.' + name if name else ''}")
    return found


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
        for w in graph.get(v, ()):
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


# -- the package --------------------------------------------------------------------------------


def test_every_module_has_a_row():
    missing = sorted(name for name in package_modules() if row_of(name) is None)
    assert not missing, f"modules in no row of ROWS (add them where they belong): {missing}"


def test_no_import_from_a_row_above():
    found = upward_imports(import_graph(all_imports()))
    assert not found, "imports against the rows:\n" + "\n".join(found)


def test_no_import_circles_type_only_ones_included():
    found = circles(import_graph(all_imports(), type_checking=True))
    assert not found, f"import circles: {[sorted(c) for c in found]}"


def test_no_private_name_imported_from_another_unit():
    found = private_imports(all_imports())
    assert not found, "private names imported across units (make them public, or move the code):\n" + "\n".join(found)


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph(all_imports())
    # peft_fast.front_doors imports peft_fast.peft_interop only inside a function.
    assert "peft_fast.peft_interop" in graph["peft_fast.front_doors"]
    assert "peft_fast.kernels.lora_gemms" in graph["peft_fast.kernels.lora_linear"]
    assert "peft_fast.train.args" in graph["peft_fast.distributed"]


# -- the checkers flag what they are for (so the tests above cannot pass vacuously) ---------------


def _synthetic(name: str, source: str) -> list[Import]:
    """The imports of ``source`` as if it were module ``name`` of the package."""
    modules = package_modules()
    return parse_imports(name, source, modules[name].name == "__init__.py", set(modules))


def test_the_checkers_flag_an_upward_import_in_a_function_body():
    imports = _synthetic("peft_fast.kernels.common", "def f():\n    from peft_fast.lora import patching\n")
    assert upward_imports(import_graph(imports)) == [
        "peft_fast.kernels.common (row 7) -> peft_fast.lora.patching (row 4)"
    ]
    imports = _synthetic("peft_fast.layers", "import peft_fast.registry\n")
    assert upward_imports(import_graph(imports)) == ["peft_fast.layers (row 5) -> peft_fast.registry (row 3)"]
    imports = _synthetic("peft_fast.ia3", "from peft_fast.lora.files import save_lora\n")
    assert upward_imports(import_graph(imports)) == ["peft_fast.ia3 -> peft_fast.lora.files (another method)"]
    # Allowed: downwards, within a row, and the kernels' one exception.
    imports = _synthetic("peft_fast.kernels.common", "from peft_fast.nf4 import NF4Weight\n")
    imports += _synthetic("peft_fast.layers", "from peft_fast.host import set_submodule\nfrom peft_fast import ops\n")
    assert upward_imports(import_graph(imports)) == []


def test_the_checkers_leave_type_checking_imports_to_the_circle_check():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from peft_fast.front_doors import patch\n"
    imports = _synthetic("peft_fast.method", source)
    assert upward_imports(import_graph(imports)) == []
    imports += _synthetic("peft_fast.front_doors", "from peft_fast.method import Method\n")
    assert circles(import_graph(imports, type_checking=True)) == [{"peft_fast.method", "peft_fast.front_doors"}]
    assert circles(import_graph(imports)) == []


def test_the_checkers_flag_private_names_across_units_only():
    imports = _synthetic("peft_fast.hf_integration", "from peft_fast.lora.patching import _state, lora_layers\n")
    imports += _synthetic("peft_fast.cli", "def f():\n    from peft_fast.ops._common import backend_name\n")
    imports += _synthetic("peft_fast.lora.files", "from peft_fast.lora.patching import _require_state\n")  # one unit
    imports += _synthetic("peft_fast.kernels.lora_linear", "from peft_fast.kernels import _private\n")  # one unit
    assert private_imports(imports) == [
        "peft_fast.hf_integration:1 imports peft_fast.lora.patching._state",
        "peft_fast.cli:2 imports peft_fast.ops._common.backend_name",
    ]
