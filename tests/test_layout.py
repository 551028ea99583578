"""The layout's rules hold: a package per plane, imports pointing one way (see farm/__init__.py).

Read from the source with ``ast`` (every import, also those inside functions), so a lazy import cannot
hide a cycle; and checked in a fresh interpreter for what loading the worker really pulls in.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPS = ("common", "farm", "worker", "client")


def _unit(module: str) -> str:
    """The package a module belongs to for these rules: farm's subpackages count on their own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "farm" and len(parts) > 1 else parts[0]


def _imports() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) → the modules that make that edge."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for top in TOPS:
        for path in (REPO / top).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            module = ".".join(rel.parts).removesuffix(".__init__")
            if "blender_addon" in rel.parts:  # runs inside Blender, imports nothing of ours
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    if name.split(".")[0] in TOPS and (src := _unit(module)) != (dst := _unit(name)):
                        if dst.split(".")[0] == "farm" and name in ("farm",):
                            continue
                        edges[(src, dst)].append(f"{module} imports {name}")
    return edges


def test_no_import_cycle_between_packages_or_farm_subpackages():
    edges = _imports()
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    cycles = []

    def visit(node, stack):
        for nxt in graph[node]:
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])
    for start in list(graph):
        visit(start, [start])
    assert not cycles, {" → ".join(c): [e for a, b in zip(c, c[1:]) for e in edges[(a, b)]][:6] for c in cycles[:3]}


def test_common_imports_no_plane_and_worker_imports_no_farm():
    edges = _imports()
    bad = {k: v for k, v in edges.items()
           if (k[0] == "common" and k[1] != "common") or (k[0] == "worker" and k[1].startswith("farm"))
           or (k[0] == "farm.store" and k[1] != "common")}
    assert not bad, bad


def test_loading_the_worker_loads_no_coordinator_code():
    code = "import sys, worker.daemon, worker.tasks.executors; print(sorted(m for m in sys.modules if m.split('.')[0] == 'farm'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_every_package_says_what_it_owns_and_may_import():
    for init in [REPO / "common" / "__init__.py", *(REPO / "farm").glob("*/__init__.py"), REPO / "worker" / "__init__.py"]:
        if init.parent.name == "migrations":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80, f"{init.relative_to(REPO)} has no docstring saying what the package owns"
        if init.parent.name != "farm":
            assert "import" in doc, f"{init.relative_to(REPO)} does not say what it may import"
