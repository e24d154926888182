"""The import structure of `kc`: layers import downwards only.

Every import in src/kc counts, lazy ones inside functions included. Two graphs must be free of cycles: modules, and
units (a sub-package such as kc.train is one unit; a top-level module such as kc.run is its own).
"""

import ast
from pathlib import Path

import kc

SRC = Path(kc.__file__).parent


def module_name(path: Path) -> str:
    parts = ("kc", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the kc modules it imports (anywhere in its body)."""
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in files:  # 'from kc.x import name' names a module or a member
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def unit(module: str) -> str:
    """kc.train.student -> kc.train; kc.run -> kc.run; kc -> kc."""
    parts = module.split(".")
    is_package = (SRC.joinpath(*parts[1:2]) / "__init__.py").is_file() if len(parts) > 1 else False
    return ".".join(parts[:2]) if is_package or len(parts) > 2 else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "kc.stages" in graph["kc.train.student"]  # a top-level import
    assert "kc.stages" in graph["kc.serve.runtime"]  # imported inside a function only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert unit("kc.train.student") == "kc.train" and unit("kc.run") == "kc.run" and unit("kc.data") == "kc.data"


def test_no_module_imports_itself_through_others():
    assert find_cycle(import_graph()) is None


def test_sub_packages_and_top_level_modules_import_downwards_only():
    units: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        units.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    cycle = find_cycle(units)
    assert cycle is None, f"units import each other: {' -> '.join(cycle)}"


def test_the_training_layer_does_not_depend_on_what_runs_it():
    graph = import_graph()
    above = {"kc.cli", "kc.pipeline", "kc.seeds", "kc.ablate", "kc.demo", "kc.bench", "kc.jobs"}
    for module, targets in graph.items():
        if unit(module) in {"kc.train", "kc.distill", "kc.evaluate", "kc.models", "kc.data", "kc.serve"}:
            assert not targets & above, f"{module} imports {sorted(targets & above)}"
