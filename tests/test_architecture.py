"""The package layout of docs/architecture.md, enforced: import arrows point one way (no cycles between modules,
lazy imports inside functions included) and only along the allowed package arrows."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# package -> the packages it may import (itself always). Anything else is a forbidden arrow.
ALLOWED = {
    "imgcls.errors": set(),
    "imgcls.exitcodes": set(),
    "imgcls.atomic": set(),
    "imgcls.recipe": {"imgcls.errors"},
    "imgcls.models": {"imgcls.errors", "imgcls.atomic"},
    "imgcls.data": {"imgcls.errors", "imgcls.exitcodes", "imgcls.atomic", "imgcls.recipe"},
    "imgcls.tracking": {"imgcls.errors", "imgcls.atomic", "imgcls.recipe"},
    "imgcls.inference": {"imgcls.errors", "imgcls.exitcodes", "imgcls.atomic", "imgcls.recipe", "imgcls.models",
                         "imgcls.data", "imgcls.tracking"},
    "imgcls.training": {"imgcls.errors", "imgcls.exitcodes", "imgcls.atomic", "imgcls.recipe", "imgcls.models",
                        "imgcls.data", "imgcls.tracking", "imgcls.inference"},
}
# the commands (argument parsing plus one call) and the launcher sit on top: they may import any package
TOP = {"imgcls", "imgcls.train", "imgcls.doctor", "imgcls.convert", "imgcls.wandb_reader", "launcher"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (functions included), for every module of
    root/imgcls and root/launcher."""
    files = sorted((root / "imgcls").rglob("*.py")) + sorted((root / "launcher").rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:  # `from pkg import submodule` or `import pkg.mod.attr`
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def package_of(module: str) -> str:
    """"imgcls.data.store" -> "imgcls.data"; a top-level module is its own package; launcher.* -> "launcher"."""
    if module.split(".")[0] == "launcher":
        return "launcher"
    return ".".join(module.split(".")[:2])


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for a, targets in graph.items():
        pa = package_of(a)
        if pa in TOP:
            continue
        for b in targets:
            pb = package_of(b)
            if pb != pa and pb not in ALLOWED.get(pa, set()):
                out.append(f"{a} -> {b} ({pa} may not import {pb})")
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph(REPO)) == []


def test_imports_follow_the_allowed_arrows():
    graph = import_graph(REPO)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 200  # the walk sees the project
    assert set(package_of(m) for m in graph) <= set(ALLOWED) | set(TOP), "a new package: add it to ALLOWED"
    assert forbidden_arrows(graph) == []


def test_the_checks_catch_a_cycle_and_a_forbidden_arrow(tmp_path):
    """The checker itself: a two-module cycle, inference importing training, models importing the recipe."""
    files = {
        "imgcls/inference/predict.py": "from imgcls.training.checkpoint import load_artifact\n",
        "imgcls/training/checkpoint.py": "def f():\n    from imgcls.inference import predict\n",
        "imgcls/models/registry.py": "import imgcls.recipe\n",
        "imgcls/recipe.py": "",
        "imgcls/inference/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["imgcls.inference.predict", "imgcls.training.checkpoint"]]
    assert forbidden_arrows(graph) == [
        "imgcls.inference.predict -> imgcls.training.checkpoint (imgcls.inference may not import imgcls.training)",
        "imgcls.models.registry -> imgcls.recipe (imgcls.models may not import imgcls.recipe)"]
