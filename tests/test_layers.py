"""The build layers: recipes use components, no component reaches up into a recipe."""
from __future__ import annotations

import ast

from conftest import REPO

ENTRY_POINTS = {"speedyrec/train.py"}  # the command line dispatches to the recipes


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_component_imports_a_recipe():
    components = [p for d in ("speedyrec", "engine", "kernels") for p in (REPO / d).rglob("*.py")
                  if "recipes" not in p.relative_to(REPO).parts and str(p.relative_to(REPO)) not in ENTRY_POINTS]
    assert len(components) > 30
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.startswith("speedyrec.recipes"))
                 for p in components}
    assert {p: m for p, m in offenders.items() if m} == {}


def test_the_benchmarks_import_no_circle():
    """benchmarks.run imports every benchmark and the README writer; nothing imports back up (readme and run once
    imported each other)."""
    mods = {p.stem: p for p in (REPO / "benchmarks").glob("*.py")}

    def deps(name):
        out = set()
        for node in ast.walk(ast.parse(mods[name].read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
                out.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks."):
                out.add(node.module.split(".")[1])
        return out - {name}

    graph = {m: deps(m) for m in mods}
    assert graph["run"] >= {"readme", "common"}

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph[start])

    assert [m for m in mods if reaches(m, m)] == []
