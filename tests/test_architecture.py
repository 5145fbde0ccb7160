"""The house's rules, checked on the code's own imports (every ``import``, also those inside functions).

- Layers, lowest first: ``infra`` → ``features`` → ``models`` → ``experiments`` → ``serving`` →
  ``orchestration`` / ``bench`` → ``cli``. A package imports only its own layer's modules and those below;
  nothing imports ``cli`` (the top floor), and ``orchestration`` and ``bench`` do not import each other.
- No import cycle between modules of the project (tests aside).
- Only the lifecycle room (``models.lifecycle``) imports ``mlflow``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"infra": 0, "features": 1, "models": 2, "experiments": 3, "serving": 4, "orchestration": 5, "bench": 5,
          "cli": 6}
MLFLOW_ROOM = "models.lifecycle"


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every package of the project (tests aside)."""
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of its code (lazy imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    modules = project_modules()
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
            elif colour[child] == 1:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        here = module.split(".")[0]
        for target in sorted(targets):
            there = target.split(".")[0]
            if here == there:
                continue
            if LAYERS[there] >= LAYERS[here]:  # up, or sideways into another package of the same floor
                out.append(f"{module} ({here}, layer {LAYERS[here]}) imports {target} ({there}, layer {LAYERS[there]})")
    return out


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    assert layer_violations(project_graph()) == []


def test_the_project_has_no_import_cycle() -> None:
    assert find_cycle(project_graph()) is None


def test_only_the_lifecycle_room_imports_mlflow() -> None:
    outside = sorted(name for name, path in project_modules().items()
                     if not (name == MLFLOW_ROOM or name.startswith(MLFLOW_ROOM + "."))
                     and any(m == "mlflow" or m.startswith("mlflow.") for m in imports_of(path)))
    assert outside == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, None),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected


def test_the_layer_check_catches_an_upward_import() -> None:
    assert layer_violations({"features.x": {"models.y"}, "models.y": {"features.x"}}) == [
        "features.x (features, layer 1) imports models.y (models, layer 2)"]
    assert layer_violations({"bench.a": {"orchestration.b"}}) != []  # same layer, different package
