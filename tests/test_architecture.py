"""The package's layering: no import cycle, counting function-local and TYPE_CHECKING imports.

Every ``import`` / ``from ... import`` statement anywhere in a module of ``cfbench``
(``benchmark/``) or ``cfbench_baselines`` (``baselines/``) -- at module level, inside
functions, under ``if TYPE_CHECKING`` -- is an edge to the module it names.  Importing
``a.b.c`` also runs ``a/b/__init__.py``, so an edge to a submodule adds an edge to each of
its parent packages, except the root packages and the importing module's own ancestors
(Python initialises those before the module runs; ``cfbench/__init__`` holds only version
constants and one lazy convenience).  Dynamic imports through entry points (the registry) are not statements and
are not edges: that is how components are found, by name, at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"cfbench": ROOT / "benchmark", "cfbench_baselines": ROOT / "baselines"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module (or package) a dotted name refers to, or None outside our packages."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _edges(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets.add(stem)
            targets |= {f"{stem}.{a.name}" for a in node.names}   # `from pkg import submodule`
    out = set()
    for t in targets:
        r = _resolve(t, modules)
        if r is None or r == mod or mod.startswith(r + "."):   # itself, or its own (initialised) ancestor
            continue
        out.add(r)
        parts = r.split(".")
        for i in range(2, len(parts)):                    # parent packages, roots excluded
            parent = ".".join(parts[:i])
            # a module's own ancestor packages are initialised before it runs: not a dependency
            if parent != mod and not mod.startswith(parent + ".") and parent in modules:
                out.add(parent)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _edges(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        color[u] = GREY
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if color.get(v, BLACK) == GREY:
                return stack[stack.index(v):] + [v]
            if color.get(v) == WHITE:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        color[u] = BLACK
        return None

    for u in sorted(graph):
        if color[u] == WHITE:
            found = visit(u)
            if found:
                return found
    return None


def test_the_checker_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_function_local_imports():
    g = import_graph()
    # cfbench.cli imports the runner only inside cmd_run
    assert "cfbench.runner" in g["cfbench.cli"]
    assert "cfbench.present.report" in g["cfbench.cli"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


#: lower layers may not import these higher ones (docs/architecture.md)
FORBIDDEN = [
    ("cfbench.mia", ("cfbench.runner", "cfbench.training", "cfbench.execution", "cfbench.evaluators",
                     "cfbench.present", "cfbench.config")),
    ("cfbench.store", ("cfbench.runner", "cfbench.training", "cfbench.execution", "cfbench.evaluators",
                       "cfbench.present", "cfbench.config")),
    ("cfbench.training", ("cfbench.runner", "cfbench.execution", "cfbench.evaluators", "cfbench.present",
                          "cfbench_baselines")),
    ("cfbench.evaluators", ("cfbench.runner", "cfbench.present", "cfbench_baselines")),
    ("cfbench_baselines", ("cfbench.runner", "cfbench.present", "cfbench.evaluators", "cfbench.cli")),
    ("cfbench.execution", ("cfbench.runner", "cfbench.present", "cfbench.evaluators")),
    ("cfbench.runner", ("cfbench.present", "cfbench.cli")),
]


@pytest.mark.parametrize("low,high", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_data_flows_one_way(low, high):
    g = import_graph()
    bad = sorted((m, t) for m, ts in g.items() if m == low or m.startswith(low + ".")
                 for t in ts if any(t == h or t.startswith(h + ".") for h in high))
    assert not bad, f"{low} imports a higher layer: {bad}"
