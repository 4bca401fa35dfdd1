"""User paths go through TensorFlow's filesystem layer (fcn_tf/storage.py).

A scan of the library and scripts for calls that would read or write a user
path behind `tf.io.gfile`'s back (`open`, `os.path.abspath/isfile/...`,
`os.makedirs`, `shutil`, `fcntl`, `pathlib`): each one left is in the
allow-list below with the reason it never sees a user path (or only a local
one on purpose). The runs on `ram://` and `file://` workdirs are in
tests/training/test_storage_runs.py.
"""

from __future__ import annotations

import ast
import os

import pytest

from fcn_tf import storage
from harness import runs

# Calls that touch a filesystem directly (or resolve against the current directory).
FORBIDDEN_OS_PATH = {
    "abspath", "realpath", "relpath", "exists", "lexists", "isfile", "isdir", "islink",
    "getsize", "getmtime", "expanduser",
}  # fmt: skip
FORBIDDEN_OS = {
    "makedirs", "mkdir", "remove", "unlink", "rename", "replace", "listdir", "scandir", "walk",
    "stat", "rmdir", "open", "pread", "pwrite", "ftruncate",
}  # fmt: skip
ALLOWED_SHUTIL = {"which"}  # looks up a program on PATH, not a user path

# (file, enclosing function) -> why the call may stay.
ALLOWED = {
    ("fcn_tf/storage.py", "normalize"): "expands ~ of local paths only, URLs kept",
    ("fcn_tf/storage.py", "local_path"): "the local path behind a plain path or file:// URL",
    ("fcn_tf/training/workdir.py", "_flock"): "flock needs a local file descriptor (local_path only)",
    ("fcn_tf/checkpoints.py", "_free_space"): "free space of a local folder (local_path only)",
    ("fcn_tf/config.py", "read_workdir_config"): "expands ~ of a local workdir only (URLs kept)",
    ("fcn_tf/training/loop.py", "_train_locked"): "removes the run's own local scratch folder (tempfile)",
    # Dataset preparation builds on local folders (TFDS stages and renames there); prepare()
    # refuses a URL in one line: prepare locally, copy to the bucket (docs/clusters.md).
    ("fcn_tf/data/sources.py", "prepare"): "local folders checked by _local_folder",
    ("fcn_tf/data/sources.py", "_local_folder"): "the local folder behind a path or file:// URL",
    ("fcn_tf/data/tfds_builder.py", "list_splits"): "TFDS's manual_dir, local (prepare)",
    ("fcn_tf/data/synthetic.py", "write_dataset"): "writes raw synthetic files into a local folder",
    ("fcn_tf/startup.py", "_no_gpu_here"): "looks for the NVIDIA driver's device node, not a user path",
    ("scripts/benchmark.py", "<module>"): "the repository's own folder on sys.path",
}


def _calls(tree):
    """(function name, dotted call) of every call, with its enclosing top-level or nested def."""

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                yield name, _dotted(child.func), child.lineno
            yield from visit(child, name)

    yield from visit(tree, "<module>")


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _forbidden(call: str) -> bool:
    parts = call.split(".")
    if call in ("open", "Path", "pathlib.Path", "glob.glob", "io.open"):
        return True
    if parts[:2] == ["os", "path"] and len(parts) == 3:
        return parts[2] in FORBIDDEN_OS_PATH
    if parts[0] == "os" and len(parts) == 2:
        return parts[1] in FORBIDDEN_OS
    if parts[0] == "shutil":
        return parts[-1] not in ALLOWED_SHUTIL
    return parts[0] == "fcntl"


def _library_files():
    for folder in ("fcn_tf", "scripts"):
        for root, _, files in os.walk(os.path.join(runs.REPO, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(root, name), runs.REPO)


def test_no_library_call_bypasses_tensorflows_filesystem_layer():
    found = []
    used = set()
    for path in _library_files():
        with open(os.path.join(runs.REPO, path)) as f:
            tree = ast.parse(f.read())
        for function, call, line in _calls(tree):
            if not _forbidden(call):
                continue
            if (path, function) in ALLOWED:
                used.add((path, function))
                continue
            found.append(f"{path}:{line} {function}: {call}()")
    assert not found, "calls on paths outside tf.io.gfile (use fcn_tf.storage):\n" + "\n".join(found)
    assert used == set(ALLOWED), f"allow-list entries no longer needed: {set(ALLOWED) - used}"


def test_the_scan_sees_what_it_forbids():
    tree = ast.parse(
        "import os, shutil, fcntl\n"
        "def f(p):\n"
        "    open(p)\n    os.path.abspath(p)\n    os.makedirs(p)\n    shutil.rmtree(p)\n"
        "    fcntl.flock(p, 0)\n    os.path.join(p, 'x')\n    shutil.which('x')\n"
    )
    calls = [call for _, call, _ in _calls(tree) if _forbidden(call)]
    assert calls == ["open", "os.path.abspath", "os.makedirs", "shutil.rmtree", "fcntl.flock"]


@pytest.mark.parametrize(
    "path, normalized, local",
    [
        ("gs://b/run", "gs://b/run", None),
        ("file:///tmp/run", "file:///tmp/run", "/tmp/run"),
        ("ram://run", "ram://run", None),
        ("runs/x", "runs/x", "runs/x"),
    ],
)
def test_urls_are_kept_as_given(path, normalized, local):
    assert storage.normalize(path) == normalized
    assert storage.local_path(path) == local
    assert storage.relative(f"{path}/checkpoints/ckpt-5", f"{path}/checkpoints") == "ckpt-5"
