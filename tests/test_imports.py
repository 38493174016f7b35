"""Imports point one way: no import cycle in datapipe/, trainer/ or tools/, counting imports
inside functions (which hide a cycle from Python at import time, not from a reader), and the
trainer's rooms in order: study -> training -> evaluation -> model -> datapipe."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datapipe", "trainer", "tools")
# Rooms of trainer/ from the bottom; the shared base (errors, options, stop) sits under all.
ROOMS = ("model", "evaluation", "training", "study")
BASE = ("trainer.errors", "trainer.options", "trainer.stop")


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root`."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports anywhere in its file (top level, in
    functions, under TYPE_CHECKING); `from pkg import name` counts pkg.name when that is a
    module, else pkg."""
    mods = modules(root, packages)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.add(full if full in mods else owner(base))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle: the strongly connected components of more than one module, each
    as one closed path through it (for the message)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_closed_path(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & component)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return [*path, start]
        step = next((w for w in nxt if w not in seen), None)
        if step is None:
            return [*path, nxt[0]]
        path.append(step)
        seen.add(step)


def room(module: str) -> int:
    """0 datapipe, 1 the trainer's base, then one per room from the bottom; 99 for the rest
    (the CLI, tools), which may import anything but nothing imports."""
    parts = module.split(".")
    if parts[0] == "datapipe":
        return 0
    if module in BASE:
        return 1
    if parts[0] == "trainer" and len(parts) > 1 and parts[1] in ROOMS:
        return 2 + ROOMS.index(parts[1])
    return 99


def test_there_is_no_import_cycle():
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_imports_point_down_the_rooms():
    upward = [
        f"{a} -> {b}"
        for a, targets in import_graph(ROOT).items()
        for b in targets
        if room(b) > room(a) and not (a.startswith("tools") and b.startswith("tools"))
    ]
    assert not upward, "imports against the flow: " + "; ".join(sorted(upward))


def test_datapipe_imports_neither_trainer_nor_tools():
    graph = import_graph(ROOT)
    wrong = [f"{a} -> {b}" for a in graph if a.startswith("datapipe") for b in graph[a]
             if not b.startswith("datapipe")]  # fmt: skip
    assert not wrong, wrong


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """The checks can fail: a cycle hidden in a function, and one through a package's
    __init__ with a relative import."""
    pkg = tmp_path / "datapipe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from datapipe.b import x\n")
    (pkg / "b.py").write_text("x = 1\n\ndef f():\n    from datapipe import a\n    return a\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("import datapipe.sub\n")
    graph = import_graph(tmp_path, ("datapipe",))
    assert graph["datapipe.b"] == {"datapipe.a"}
    assert sorted(cycles(graph)) == [
        ["datapipe.a", "datapipe.b", "datapipe.a"],
        ["datapipe.sub", "datapipe.sub.c", "datapipe.sub"],
    ]
    assert (
        room("trainer.study.report") > room("trainer.training.train") > room("trainer.model.world")
    )
