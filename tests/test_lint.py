"""The code the book's readers read stays ruff-clean (lint and format)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["lora_lab", "tests", "benchmarks", "tools"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    return subprocess.run([exe, *args, *TARGETS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    out = ruff("check")
    assert out.returncode == 0, out.stdout[-4000:]


def test_ruff_format():
    out = ruff("format", "--check")
    assert out.returncode == 0, out.stdout[-4000:]


# ---------------------------------------------------------------------------- the package's seams
# Readers follow lora_lab module by module, so its imports go one way, a module's private names stay
# in it, and no function is longer than a page.

PACKAGE = ROOT / "lora_lab"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` runs a module as a script; its imports are not the module's."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and getattr(test.left, "id", "") == "__name__"
    )


def _walk(tree: ast.AST):
    """ast.walk, leaving out `if __name__ == "__main__":` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node) if not _is_main_guard(child))


def _imports(tree: ast.Module, modules: set[str]) -> dict[str, list[str]]:
    """{lora_lab module imported: [names imported from it]} (any depth, also inside functions)."""
    out: dict[str, list[str]] = {}
    for node in _walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "lora_lab":
            for alias in node.names:
                if alias.name in modules:
                    out.setdefault(alias.name, [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_lab."):
            out.setdefault(node.module.split(".")[1], []).extend(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lora_lab."):
                    out.setdefault(alias.name.split(".")[1], [])
    return out


def test_no_import_circle_inside_lora_lab():
    trees = _modules()
    graph = {name: set(_imports(tree, set(trees))) - {name} for name, tree in trees.items()}
    graph.pop("__init__")
    for edges in graph.values():
        edges.discard("__init__")
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path[path.index(nxt) :], nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def _defined_private_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_name_is_used_outside_its_module():
    trees = _modules()
    private = {name: _defined_private_names(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        for module, imported in _imports(tree, set(trees)).items():
            found += [
                f"{name} imports {module}.{n}" for n in imported if n.startswith("_") and module != name
            ]
        others = set().union(*(p for m, p in private.items() if m != name)) - private[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in others:
                found.append(f"{name} uses .{node.attr} (line {node.lineno}), private to another module")
    assert not found, "\n".join(found)


def test_no_function_in_lora_lab_is_longer_than_80_lines():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, "\n".join(long)


def test_init_imports_plainly():
    tree = _modules()["__init__"]
    assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
