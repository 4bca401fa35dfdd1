"""The training workdir: a lock while a run uses it, and the resolved config it trains.

The workdir may be a local path or any URL `tf.io.gfile` accepts
(`fcn_tf.storage`). `WORKDIR/config.json` is read back by
`fcn_tf.config.read_workdir_config` (evaluation, export, predict and a
resumed run rebuild what was trained).

The lock file `WORKDIR/.lock` records the holder (host and pid). On a local
or network filesystem (a plain path or a `file://` URL) it is also held with
`flock`, which dies with the process (even on SIGKILL), so a crashed run never
leaves a stale lock. Object stores (`gs://`, `s3://`, ...) have no locks:
there the file only records the holder, and one run per workdir is the
user's rule (docs/clusters.md, "One writer per workdir").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket

import tensorflow as tf
from absl import logging

from fcn_tf import storage
from fcn_tf.config import WORKDIR_CONFIG, ExperimentConfig, to_json

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another training run holds the workdir, or its filesystem cannot lock it."""


def _holder() -> str:
    return f"host {socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True):
    """Holds WORKDIR/.lock for the duration of the block (an exclusive `flock` where the disk is local).

    Args:
      workdir: the training workdir, a local path or URL (created if missing).
      enabled: False: no lock at all (a filesystem without `flock`; the
        caller makes sure one run at a time uses the workdir).

    Raises:
      WorkdirLockedError: another process holds it (the message names the
        workdir and the holder's host and pid), or the filesystem refuses
        `flock` (the message says what to do).
    """
    tf.io.gfile.makedirs(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    local = storage.local_path(path)
    if not enabled:
        yield path
    elif local is None:
        with _recorded_lock(workdir, path):
            yield path
    else:
        with _flock(workdir, local):
            yield path


@contextlib.contextmanager
def _recorded_lock(workdir: str, path: str):
    """Object stores: record the holder, warn about one already recorded, remove ours at the end."""
    if tf.io.gfile.exists(path):
        previous = storage.read_text(path).strip() or "unknown"
        logging.warning(
            "%s records another run (%s); %s has no file locks: if that run is still going, stop one of "
            "them (one run per workdir). A run that was killed leaves this record behind: then ignore this.",
            path,
            previous,
            workdir,
        )
    mine = _holder()
    storage.write_text(path, mine)
    try:
        yield
    finally:
        with contextlib.suppress(tf.errors.OpError):
            if storage.read_text(path).strip() == mine:
                tf.io.gfile.remove(path)


@contextlib.contextmanager
def _flock(workdir: str, path: str):
    # flock needs a file descriptor: `path` is the local file behind the workdir's lock file.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        holder = f"pid {holder}" if holder.isdigit() else holder  # written by an older fcn_tf
        os.close(fd)
        raise WorkdirLockedError(
            f"workdir {workdir} is in use by another training run ({holder}); "
            f"wait for it to finish or choose another --workdir"
        ) from None
    except OSError as e:
        os.close(fd)
        raise WorkdirLockedError(
            f"cannot lock workdir {workdir}: its filesystem refuses file locks (flock: {e.strerror}). "
            "Mount it with lock support (NFS: run lockd; Lustre: -o flock), or rerun with --nolock_workdir "
            "and make sure no other run uses this workdir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_config(config: ExperimentConfig, workdir: str) -> str:
    """Writes the resolved config to WORKDIR/config.json (atomically) and returns the path.

    Args:
      config: the validated experiment.
      workdir: the training workdir (local path or URL).
    """
    path = os.path.join(workdir, WORKDIR_CONFIG)
    storage.write_text(path, to_json(config) + "\n")
    return path
