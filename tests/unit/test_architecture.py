"""The folders are the architecture: who may import whom, and no import loops.

Every import counts, including those inside a function or under ``TYPE_CHECKING``:
a loop hidden there is still a loop a reader has to untangle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("jobs", "worker", "web", "devstack", "migrations", "bench")
#: package -> packages of ours it must never import.
FORBIDDEN = {
    "jobs": {"worker", "web", "devstack", "migrations", "bench", "tests"},
    "worker": {"web", "devstack", "migrations", "bench", "tests"},
    # The web process serves what `jobs` stores and reads; it never runs jobs itself.
    "web": {"worker", "devstack", "migrations", "bench", "tests"},
    "migrations": {"worker", "web", "devstack", "bench", "tests"},
    "devstack": {"worker", "bench", "tests"},
    "bench": {"tests"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module of ours that ``name`` imports, wherever the import statement sits."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            found = target
            while found and found not in known:
                found = found.rpartition(".")[0]
            if found and found != name:
                yield found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target in _imports(name, path, known):
            # A package's __init__ re-exports its modules; a module of the package reaching
            # the __init__ would only be `import jobs` for a submodule, counted above.
            if name.startswith(target + "."):
                continue
            edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_function_local_and_type_checking_imports() -> None:
    graph = _graph()
    # jobs.environment reaches devstack only through importlib (a string), never a statement.
    assert "devstack.services" not in graph["jobs.environment"]
    # A statement inside a function counts: the demo command's lazy import, for one.
    assert "devstack.demo" in graph["devstack.__main__"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_loops() -> None:
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers(package: str) -> None:
    graph = _graph()
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] in FORBIDDEN[package]
    )
    assert wrong == []


def test_the_dev_stack_is_reached_from_one_place_only() -> None:
    """Only jobs.environment.resolve names the dev stack, and only as a module to load."""
    mentions = sorted(
        str(path.relative_to(ROOT))
        for package in ("jobs", "worker")
        for path in (ROOT / package).rglob("*.py")
        if '"devstack.services"' in path.read_text()
    )
    assert mentions == ["jobs/environment.py"]
