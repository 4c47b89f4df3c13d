"""The shape of the code: modules by stage, data flowing one way.

Reads the imports of every module of recsys/ (ast, function bodies included) and fails on an
import of a higher layer, on a cycle within a layer, on an import inside a function body of a
recsys module (the way cycles get dodged), and on a module no layer names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "recsys"

# Lowest first. A module may import its own layer (without a cycle) and any lower one.
LAYERS = [
    ("base", ["recsys", "recsys.atomic", "recsys.errors", "recsys.distributed", "recsys.logs", "recsys.memory"]),
    ("config", ["recsys.config"]),
    ("data", ["recsys.data", "recsys.data.*"]),
    ("model and loss", ["recsys.model", "recsys.loss"]),
    ("parallelize", ["recsys.parallelize"]),
    ("training", ["recsys.training", "recsys.training.*"]),
    ("evaluation", ["recsys.evaluation", "recsys.evaluation.*"]),
    ("closed form and stacking", ["recsys.spectral", "recsys.stack"]),
    ("export and reports", ["recsys.exporter", "recsys.report"]),
    ("end of run", ["recsys.finish"]),
    ("entry points", ["recsys.cli", "recsys.train", "recsys.evaluate", "recsys.export", "recsys.prepare",
                      "recsys.plan"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
                return index
    raise KeyError(name)


def imports(path: Path, known: set) -> list:
    """(imported recsys module, line, inside a function body) of a file."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = package.rsplit(".", child.level - 1)[0] if child.level else ""  # relative: from its package
                base = ".".join(p for p in (base, child.module or "") if p)
                # `from recsys import cli` imports the module recsys.cli; `from recsys.x import f` imports recsys.x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            for target in targets:
                if target == "recsys" or target.startswith("recsys."):
                    while target not in known and "." in target:  # a name inside a module
                        target = target.rsplit(".", 1)[0]
                    out.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def graph() -> dict:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) for name, path in mods.items()}


def test_every_module_has_a_layer():
    missing = []
    for name in modules():
        try:
            layer_of(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"modules in no layer (add them to LAYERS): {missing}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for name, deps in graph().items():
        for target, line, _ in deps:
            if layer_of(target) > layer_of(name):
                upward.append(f"{name}:{line} imports {target} ({LAYERS[layer_of(name)][0]} -> "
                              f"{LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


def test_no_recsys_import_inside_a_function():
    inside = [f"{name}:{line} imports {target} inside a function" for name, deps in graph().items()
              for target, line, in_function in deps if in_function]
    assert not inside, "\n".join(inside)


def test_no_import_cycle():
    edges = {name: {t for t, _, _ in deps if t != name} for name, deps in graph().items()}
    state, stack, cycles = {}, [], []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert not cycles, "\n".join(cycles)
