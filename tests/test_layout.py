"""The package's shape: no import cycle, no oversized module or function, no module pulling in the
experiments or the benchmarks; BUILD.md maps the tree."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

from harness import runs

ROOT = runs.REPO


def _modules() -> list[str]:
    names = []
    for folder, _, files in os.walk(os.path.join(ROOT, "fcn_tf")):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.relpath(os.path.join(folder, file), ROOT)[:-3]
                names.append(path.replace(os.sep, ".").removesuffix(".__init__"))
    return sorted(names)


def test_library_imports_neither_experiments_nor_benchmarks():
    # A fresh process: what one module imports is not hidden by what another test imported.
    code = (
        "import importlib, sys\n"
        f"for name in {_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('experiments', 'benchmarks'))\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=runs.subprocess_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout


def _build_md_layout() -> list[str]:
    """Paths named in BUILD.md's layout block, relative to the repository root."""
    text = open(os.path.join(ROOT, "BUILD.md")).read()
    block = re.search(r"## Layout\s+```\n(.*?)```", text, re.S).group(1)
    paths, parents = [], {}
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        # A line starts with the names it describes (files "x.py", folders "x/"); a
        # continuation of a description starts with a word and names nothing.
        names = []
        for token in line.split():
            if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*(\.py|/)", token):
                break
            names.append(token)
        if not names:
            continue
        parent = next((parents[i] for i in sorted(parents, reverse=True) if i < indent), "")
        for name in names:
            paths.append(parent + name)
        if len(names) == 1 and names[0].endswith("/"):
            parents = {i: p for i, p in parents.items() if i < indent}
            parents[indent] = parent + names[0]
    return paths


def test_build_md_layout_matches_the_tree():
    named = _build_md_layout()
    missing = [p for p in named if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"BUILD.md names files that do not exist: {missing}"
    # A module is named by its file; a package (its __init__) by its folder.
    unnamed = [
        m
        for m in _modules()
        if m.replace(".", "/") + ".py" not in named and m.replace(".", "/") + "/" not in named
    ]
    assert not unnamed, f"modules missing from BUILD.md's layout: {unnamed}"


# Limits a newcomer can read in one sitting (nested functions count in their parent).
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_path(name: str) -> str:
    path = os.path.join(ROOT, *name.split("."))
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def _imports(name: str, modules: set[str]) -> set[str]:
    """The fcn_tf modules `name` imports anywhere in its file (inside functions too).

    `from package import module` counts as importing that module, not the package.
    """
    found = set()
    is_package = _module_path(name).endswith("__init__.py")
    for node in ast.walk(ast.parse(open(_module_path(name)).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def test_no_import_cycles():
    modules = set(_modules())
    graph = {m: _imports(m, modules) for m in modules}
    assert _cycles(graph) == []


def _long_functions(name: str) -> list[str]:
    long = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.end_lineno - child.lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{prefix}.{child.name}")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix)

    walk(ast.parse(open(_module_path(name)).read()), name)
    return long


def test_modules_and_functions_stay_readable():
    too_long = set()
    for name in _modules():
        if len(open(_module_path(name)).read().splitlines()) > MAX_MODULE_LINES:
            too_long.add(name)
        too_long.update(_long_functions(name))
    assert not too_long, (
        f"over {MAX_MODULE_LINES} lines per module or {MAX_FUNCTION_LINES} per function: {sorted(too_long)}"
    )


def test_build_md_tour_names_exist():
    text = open(os.path.join(ROOT, "BUILD.md")).read()
    tour = re.search(r"## A newcomer's tour\n(.*?)\n## ", text, re.S).group(1)
    entries = re.findall(r"`([\w/.*]+\.py)(?:::(\w+))?`", tour)
    assert len(entries) >= 10, entries
    missing = []
    for path, name in entries:
        if "*" in path:
            continue
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            missing.append(path)
        elif name and not re.search(rf"^(def|class) {name}\b|^{name}\b.*=", open(full).read(), re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"BUILD.md's tour names what does not exist: {missing}"
