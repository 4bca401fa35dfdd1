"""Running a test file as a fresh process (`FILE --child`) and reading its RESULT line.

For checks that need a process of their own: logical CPU devices set before
TensorFlow initializes, process-wide settings such as op determinism.
"""

import json
import os
import subprocess
import sys

from harness import runs


def child_results(path: str, timeout: int = 600) -> dict:
    """Runs `python PATH --child` from the checkout; returns the JSON after its last "RESULT " line."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(path), "--child"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=runs.subprocess_env(),
        cwd=runs.REPO,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT ") :])


def print_result(result: dict) -> None:
    """What the child prints last: its results as one RESULT line."""
    print("RESULT " + json.dumps(result))
