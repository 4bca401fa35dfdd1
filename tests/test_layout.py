"""The package's shape: no module pulls in the experiments or the benchmarks; BUILD.md maps the tree."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import tiny_models

ROOT = tiny_models.REPO


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
        env=tiny_models.subprocess_env(),
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
