"""The package stack of docs/architecture.md: imports point down only, there is no import circle, every module
lives in a layer's package, and the method registry agrees with the method classes."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "deal_train"
LAYERS = {"config": 0, "outputs": 0, "model": 1, "data": 2, "deal": 3, "methods": 4, "train": 5, "cli": 6, "tools": 7,
          "__main__": 8}
"""Layer of each top-level module or package of deal_train (higher imports lower, never the reverse)."""
ENTRY_POINTS = {"compare", "sweep", "results", "bench", "estimate_memory", "export"}
"""One-line modules kept for ``python -m deal_train.<tool>``; they import their tool and nothing else."""


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return None if len(parts) == 1 else LAYERS.get(parts[1], 9 if parts[1] in ENTRY_POINTS else None)


def test_every_module_is_in_a_layer():
    assert [m for m in GRAPH if m != "deal_train" and _layer(m) is None] == []


def test_imports_point_down():
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets
              if a != "deal_train" and b != "deal_train" and _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_circle():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def test_registry_matches_the_classes():
    from deal_train.methods import METHOD_NAMES, REGISTRY, method_class, method_with_role

    assert all(method_class(name).name == name for name in REGISTRY) and METHOD_NAMES == tuple(REGISTRY)
    assert method_with_role("proposed") == "deal" and method_with_role("plain") == "seq_lora"
