"""The training workdir: an exclusive lock while a run uses it, and the resolved config it trains.

`WORKDIR/config.json` is read back by `fcn_tf.config.read_workdir_config`
(evaluation, export, predict and a resumed run rebuild what was trained).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from fcn_tf.config import WORKDIR_CONFIG, ExperimentConfig, to_json

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another training run holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds an exclusive `fcntl` lock on WORKDIR/.lock for the duration of the block.

    The lock dies with the process (even on SIGKILL), so a crashed run never
    leaves a stale lock behind.

    Args:
      workdir: the training workdir (created if missing).

    Raises:
      WorkdirLockedError: another process holds it; the message names the
        workdir and that process's pid.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirLockedError(
            f"workdir {workdir} is in use by another training run (pid {holder}); "
            f"wait for it to finish or choose another --workdir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_config(config: ExperimentConfig, workdir: str) -> str:
    """Writes the resolved config to WORKDIR/config.json (atomically) and returns the path.

    Args:
      config: the validated experiment.
      workdir: the training workdir.
    """
    path = os.path.join(workdir, WORKDIR_CONFIG)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(config) + "\n")
    os.replace(tmp, path)
    return path
