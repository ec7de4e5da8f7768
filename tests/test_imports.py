"""maskparam's modules import each other without cycles, function-level imports included."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "maskparam"

# Edges allowed for now, each with its reason; every entry must still exist (so that it is
# removed as soon as it is not needed).
TRANSITIONAL: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """The most specific maskparam module that ``name`` (a module or a name in one) is."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    """Every maskparam module ``module`` imports, at any level, with the packages whose
    ``__init__`` that runs (except its own ancestors, which are running already)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "maskparam" or name.startswith("maskparam."):
                target = _resolve(name)
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if not (module == step or module.startswith(step + ".")):
                        targets.add(step)
    targets.discard(module)
    return targets


def _graph() -> dict[str, set[str]]:
    return {module: _imports(module, path) for module, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles() -> None:
    graph = _graph()
    for source, target in TRANSITIONAL:
        assert target in graph[source], (
            f"{source} no longer imports {target}: remove the entry from TRANSITIONAL"
        )
        graph[source].discard(target)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_function_level_imports(tmp_path: Path) -> None:
    assert "maskparam.taps" in _imports("maskparam.apply", MODULES["maskparam.apply"])
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_rest_of_the_package_imports_only_the_taps_init() -> None:
    graph = _graph()
    for module, targets in graph.items():
        if module == "maskparam.taps" or module.startswith("maskparam.taps."):
            continue
        inside = {t for t in targets if t.startswith("maskparam.taps.")}
        assert not inside, f"{module} imports {sorted(inside)}; import maskparam.taps instead"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)
