"""The import graph between llava's subpackages: no cycles, and layers import only downward.

Why: a cycle between subpackages means neither can be imported, tested or understood alone,
and `import llava.model` silently drags in the checkpoint loader (and torch, transformers,
the hub) with it. The rule, bottom to top:

    leaf    llava.errors, llava.config, llava._lazy, llava.device, llava.console, llava.dataclass_cli
    bottom  llava.model, llava.processing
    middle  llava.generate, llava.checkpoint, llava.train, llava.data, llava.tiny
    top     llava (the package), llava.api, llava.cli, llava.cli_args, llava.serve, llava.eval, llava.recipe

and inside the bottom layer llava.model may use llava.processing, not the reverse. A module may
import its own layer or any layer below, never one above, and the graph between units (a
subpackage, or a top-level module) has no cycle. Every import counts, at module level
or inside a function (a function-level import is still a dependency, just a later one), and so
do `lazy_exports(...)`/`importlib.import_module(...)` module strings; only `if TYPE_CHECKING:`
imports are exempt. The graph is read statically with `ast` (nothing is imported); one test
also imports `llava.model` in a subprocess to confirm it loads no checkpoint code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llava"

LAYERS: dict[str, tuple[str, ...]] = {
    "leaf": ("llava.errors", "llava.config", "llava._lazy", "llava.device", "llava.console", "llava.dataclass_cli"),
    "bottom": ("llava.model", "llava.processing"),
    "middle": ("llava.generate", "llava.checkpoint", "llava.train", "llava.data", "llava.tiny"),
    "top": ("llava", "llava.api", "llava.cli", "llava.cli_args", "llava.serve", "llava.eval", "llava.recipe",
            "llava.integrations"),
}
RANK = {unit: rank for rank, units in enumerate(LAYERS.values()) for unit in units}
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}

# The original LLaVA's import paths that sit inside a lower subpackage but only forward to a
# higher layer. Each is its own unit, ranked with the layer it forwards to; it must import that
# layer only inside functions, and nothing in llava may import it (so `llava.model` never
# depends on it). Keep this list short: new code goes in the right layer instead.
FRONT_DOORS: dict[str, str] = {
    "llava.model.builder": "llava.checkpoint",  # load_pretrained_model -> llava.checkpoint.pretrained
}
for _door, _target in FRONT_DOORS.items():
    RANK[_door], LAYER_OF[_door] = RANK[_target], f"{LAYER_OF[_target]}, front door"

# Pairs in the same layer where only one direction is allowed: (importer, imported, why not).
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("llava.processing", "llava.model", ("preprocessing must not need the model; shared anyres geometry lives "
                                         "in llava.processing.anyres, which llava.model.anyres imports")),
)

DYNAMIC_IMPORTERS = ("lazy_exports", "import_module")


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. llava.model.builder
    target: str  # imported module, e.g. llava.checkpoint
    where: str  # file:line
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def unit_of(module: str) -> str:
    """llava.model.llava -> llava.model; llava.cli -> llava.cli; llava -> llava; front doors stay whole."""
    for door in FRONT_DOORS:
        if module == door or module.startswith(door + "."):
            return door
    return ".".join(module.split(".")[:2])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Every llava import in one module, skipping `if TYPE_CHECKING:` bodies."""

    def __init__(self, module: str, path: Path, is_package: bool):
        self.module, self.is_package = module, is_package
        self.file = str(path.relative_to(ROOT))
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.AST) -> None:
        if target == "llava" or target.startswith("llava."):
            self.found.append(Import(self.module, target, f"{self.file}:{node.lineno}", self.depth > 0))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            package = self.module.split(".")
            package = package if self.is_package else package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:  # `from llava import cli` imports the module llava.cli
            self._add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in DYNAMIC_IMPORTERS:
            for child in ast.walk(node):
                if isinstance(child, ast.Constant) and isinstance(child.value, str) and is_module(child.value):
                    self._add(child.value, node)
        self.generic_visit(node)


def collect_imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        collector = _Collector(module_name(path), path, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found += collector.found
    return found


def unit_graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    """unit -> imported unit -> the import statements behind that edge (self-edges dropped)."""
    graph: dict[str, dict[str, list[Import]]] = {}
    for imp in imports:
        src, dst = unit_of(imp.source), unit_of(imp.target)
        graph.setdefault(src, {})
        if src != dst:
            graph[src].setdefault(dst, []).append(imp)
    return graph


def find_cycles(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _edge(graph: dict[str, dict[str, list[Import]]], src: str, dst: str) -> str:
    sites = ", ".join(sorted({i.where for i in graph[src][dst]}))
    return f"  {src} -> {dst}  ({sites})"


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, list[Import]]]:
    return unit_graph(collect_imports())


def test_every_unit_has_a_layer(graph):
    units = set(graph) | {dst for edges in graph.values() for dst in edges}
    unknown = sorted(units - set(RANK))
    assert not unknown, (f"{', '.join(unknown)} not in any layer: add each to LAYERS in {Path(__file__).name} "
                         "(leaf, bottom, middle or top), below everything that imports it")


def test_no_import_cycle_between_subpackages(graph):
    messages = []
    for cycle in find_cycles(graph):
        members = set(cycle)
        edges = [_edge(graph, src, dst) for src in cycle for dst in sorted(graph.get(src, {})) if dst in members]
        messages.append(f"cycle between {', '.join(cycle)}:\n" + "\n".join(edges))
    assert not messages, ("import cycles between llava's subpackages (function-level imports count too; move "
                          "the shared code down a layer):\n" + "\n".join(messages))


def test_layers_import_only_downward(graph):
    upward = [f"{_edge(graph, src, dst)}: {LAYER_OF[src]} imports {LAYER_OF[dst]}"
              for src in sorted(graph) for dst in sorted(graph[src])
              if src in RANK and dst in RANK and RANK[dst] > RANK[src]]
    assert not upward, ("a lower layer imports a higher one (leaf < bottom < middle < top; move the code or "
                        "pass the dependency in):\n" + "\n".join(upward))


def test_forbidden_same_layer_imports(graph):
    found = [f"{_edge(graph, src, dst)}: {why}" for src, dst, why in FORBIDDEN if dst in graph.get(src, {})]
    assert not found, "forbidden imports inside a layer:\n" + "\n".join(found)


def test_front_doors_stay_thin_and_unused(graph):
    imports = collect_imports()
    problems = [f"  {i.where}: {i.source} imports {i.target} at module level"
                for i in imports if unit_of(i.source) in FRONT_DOORS and not i.in_function
                and RANK.get(unit_of(i.target), -1) >= RANK[unit_of(i.source)]]
    problems += [f"  {i.where}: {i.source} imports the front door {i.target}; import what it forwards to"
                 for i in imports if unit_of(i.target) in FRONT_DOORS and unit_of(i.source) != unit_of(i.target)]
    assert not problems, "front doors must forward lazily and stay unused inside llava:\n" + "\n".join(problems)


def test_the_collector_sees_function_level_and_skips_type_checking():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llava.api\n"
              "def f():\n    from llava.checkpoint import load_checkpoint\n")
    path = PACKAGE / "model" / "example.py"  # only named, never written
    collector = _Collector("llava.model.example", path, is_package=False)
    collector.visit(ast.parse(source))
    assert [(i.target, i.in_function) for i in collector.found] == [("llava.checkpoint", True)]


def test_importing_the_model_package_or_its_front_door_loads_no_checkpoint_code():
    code = ("import sys, llava.model, llava.model.builder, llava.processing.anyres\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('llava.checkpoint', 'llava.api', 'torch')))\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
