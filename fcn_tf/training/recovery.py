"""Resuming from the newest readable checkpoint, and the state-file bookkeeping around it.

Before a run resumes, every tensor of the checkpoint about to be restored is
read (`fcn_tf.verify`: sizes and CRC32C checksums). A truncated
or damaged newest checkpoint is moved to `checkpoints/unreadable/` (never
deleted), dropped from the CheckpointManager's state file, and the newest
readable one is used instead (`newest_readable`); when none is readable,
`NoReadableCheckpointError` lists each checkpoint and its problem. A step
whose save failed in a later part is removed with its state-file entry
(`discard`).
"""

from __future__ import annotations

import os
import time
import uuid

import tensorflow as tf
from absl import logging
from google.protobuf import text_format

from fcn_tf import storage
from fcn_tf.checkpoints import (
    STATE_FILE,
    UnreadableCheckpointError,
    checkpoint_steps,
    files_of,
    prefix_of,
    step_of,
    verify,
)

UNREADABLE_SUBDIR = "unreadable"


class NoReadableCheckpointError(RuntimeError):
    """A workdir has checkpoints but none of them can be read."""


def _read_state(directory: str):
    """(CheckpointState proto or None, problem or None) of the manager's state file."""
    path = os.path.join(directory, STATE_FILE)
    if not tf.io.gfile.exists(path):
        return None, "is missing"
    try:
        state = tf.train.get_checkpoint_state(directory)
    except ValueError as e:  # parsed, but without a model_checkpoint_path
        return None, f"is damaged ({e})"
    if state is None:  # TensorFlow logged the parse error and gave up
        return None, "is damaged (not a CheckpointState)"
    return state, None


def _candidates(directory: str):
    """(checkpoint prefixes newest first, state proto or None, state problem or None)."""
    state, problem = _read_state(directory)
    if state is not None:
        paths = list(state.all_model_checkpoint_paths)
        if state.model_checkpoint_path not in paths:
            paths.append(state.model_checkpoint_path)
        return sorted(set(paths), key=step_of, reverse=True), state, None
    # No usable bookkeeping: the checkpoint files themselves say what exists.
    prefixes = [prefix_of(directory, step) for step in checkpoint_steps(directory)]
    if not prefixes:
        return [], None, None
    return prefixes, None, problem


def _free_target(directory: str, name: str) -> str:
    """DIRECTORY/unreadable/NAME, or NAME.1, NAME.2, ... if something of that name was set aside before."""
    target_dir = os.path.join(directory, UNREADABLE_SUBDIR)
    tf.io.gfile.makedirs(target_dir)
    target, copy = os.path.join(target_dir, name), 0
    while tf.io.gfile.glob(target) or tf.io.gfile.glob(target + ".*"):
        copy += 1
        target = os.path.join(target_dir, f"{name}.{copy}")
    return target


def _set_aside_checkpoint(prefix: str, directory: str) -> None:
    """Moves the files of `prefix` into DIRECTORY/unreadable/, keeping them one loadable prefix."""
    name = os.path.basename(prefix)
    target = _free_target(directory, name)
    for path in files_of(prefix):
        tf.io.gfile.rename(path, target + os.path.basename(path)[len(name) :])


def _write_state(directory: str, newest: str, state, dropped: set[str]) -> None:
    """Rewrites the manager's state file with `newest` as the latest and without `dropped`.

    The remaining entries keep their timestamps, so keep-N deletion carries on
    as before; paths are written relative, as CheckpointManager does.
    """
    if state is not None:
        paths = list(state.all_model_checkpoint_paths)
        times = list(state.all_model_checkpoint_timestamps)
        if len(times) != len(paths):  # CheckpointManager's reading of an old state file
            times = [state.last_preserved_timestamp] * len(paths)
        entries = dict(zip(paths, times))
        preserved = state.last_preserved_timestamp
    else:
        # Rebuilt from the files: every checkpoint up to `newest`, with its file time.
        found = [prefix_of(directory, step) for step in checkpoint_steps(directory)]
        entries = {p: tf.io.gfile.stat(p + ".index").mtime_nsec / 1e9 for p in found}
        preserved = min(entries.values(), default=time.time()) - 1.0
    entries.setdefault(newest, time.time())
    kept = sorted(
        (p for p in entries if p not in dropped and step_of(p) <= step_of(newest)),
        key=step_of,
    )
    proto = tf.compat.v1.train.generate_checkpoint_state_proto(
        directory,
        storage.relative(newest, directory),
        all_model_checkpoint_paths=[storage.relative(p, directory) for p in kept],
        all_model_checkpoint_timestamps=[entries[p] for p in kept],
        last_preserved_timestamp=preserved,
    )
    # Written as CheckpointManager writes it: a temporary file renamed over the old one.
    path = os.path.join(directory, STATE_FILE)
    tmp = f"{path}.tmp{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text_format.MessageToString(proto))
    tf.io.gfile.rename(tmp, path, overwrite=True)


def newest_readable(directory: str, *, set_aside: bool = True, usable=None) -> str | None:
    """The newest checkpoint in `directory` that `checkpoints.verify` accepts, repairing the bookkeeping around it.

    Candidates are the checkpoints listed in the manager's state file, newest
    step first; without a usable state file, the `ckpt-STEP.index` files
    present. Each unreadable newer checkpoint is logged as a warning naming
    the file and why.

    Args:
      directory: a checkpoint directory (`fcn_tf.checkpoints.checkpoint_dir(workdir)`).
      set_aside: move the files of unreadable checkpoints (and a damaged state
        file) into DIRECTORY/unreadable/ and rewrite the state file so the
        CheckpointManager created afterwards sees the readable checkpoint as
        the latest (its later saves and keep-N deletion then work as usual).
        Only the process that owns the workdir may do this (the chief);
        other workers pass False and only read.
      usable: optional `step -> bool`: checkpoints whose step it rejects are
        passed over without being verified or moved (e.g. a step for which
        not every worker saved its input position); they stay on disk and
        leave the state file, as a newer checkpoint that was never complete.

    Returns:
      The checkpoint prefix to restore, or None when `directory` holds no
      checkpoint at all.

    Raises:
      NoReadableCheckpointError: there are checkpoints, but none is readable;
        the one-line message lists each with its problem and what to do.
        Nothing is moved in that case.
    """
    candidates, state, state_problem = _candidates(directory)
    if not candidates:
        return None
    state_file = os.path.join(directory, STATE_FILE)
    if state_problem:
        logging.warning(
            "The checkpoint state file %s %s; looking for checkpoints by their file names (%s)",
            state_file,
            state_problem,
            ", ".join(os.path.basename(p) for p in candidates),
        )
    passed_over = []
    if usable is not None:
        candidates, passed_over = _pass_over_incomplete(candidates, usable)
        if not candidates:
            return None
    prefix, problems = _first_readable(candidates, directory)
    _report_unreadable(problems, prefix, directory, set_aside)
    if set_aside and (problems or state_problem or passed_over):
        if state_problem and tf.io.gfile.exists(state_file):
            tf.io.gfile.rename(state_file, _free_target(directory, STATE_FILE))
        _write_state(directory, prefix, state, {e.prefix for e in problems})
    return prefix


def _pass_over_incomplete(candidates: list[str], usable) -> tuple[list[str], list[str]]:
    """(the candidates whose step `usable` accepts, the others); the others are logged as incomplete."""
    passed_over = [p for p in candidates if not usable(step_of(p))]
    if passed_over:
        logging.warning(
            "Passing over %s: not complete (%s)",
            ", ".join(os.path.basename(p) for p in passed_over),
            "a save was interrupted before every part of that step was written",
        )
    return [p for p in candidates if p not in passed_over], passed_over


def _first_readable(candidates: list[str], directory: str) -> tuple[str, list[UnreadableCheckpointError]]:
    """(the first candidate `verify` accepts, the problems of those before it).

    Raises:
      NoReadableCheckpointError: none is readable (one line listing each problem).
    """
    problems: list[UnreadableCheckpointError] = []
    for prefix in candidates:
        try:
            verify(prefix)
        except UnreadableCheckpointError as e:
            problems.append(e)
            continue
        return prefix, problems
    found = "; ".join(f"{os.path.basename(e.prefix)}: {e.reason}" for e in problems)
    raise NoReadableCheckpointError(
        f"cannot resume: none of the {len(problems)} checkpoint(s) in {directory} is readable ({found}). "
        "Nothing was changed. Copy an intact checkpoint (its .index and .data-* files) into that folder "
        "and rerun, or start from step 0 with a new --workdir."
    )


def _report_unreadable(problems, prefix: str, directory: str, set_aside: bool) -> None:
    """A warning per unreadable checkpoint newer than `prefix`; with `set_aside`, its files are moved first."""
    unreadable_dir = os.path.join(directory, UNREADABLE_SUBDIR)
    for e in problems:
        moved = set_aside and bool(files_of(e.prefix))
        if moved:
            _set_aside_checkpoint(e.prefix, directory)
        logging.warning(
            "%s%s. Resuming from %s instead, the newest readable checkpoint.",
            e,
            f"; its files were moved to {unreadable_dir}" if moved else "",
            prefix,
        )


def discard(prefix: str) -> None:
    """Removes checkpoint `prefix` and its entry in the state file (the previous one becomes the latest).

    For a step whose save failed in a later part (a worker's input position):
    its model checkpoint alone is no resume point, and leaving it would make
    the state file name a checkpoint a rerun cannot use.

    Args:
      prefix: the checkpoint, e.g. `WORKDIR/checkpoints/ckpt-300`.
    """
    directory = os.path.dirname(prefix)
    for path in files_of(prefix):
        tf.io.gfile.remove(path)
    state, _ = _read_state(directory)
    if state is None:
        return
    remaining = [p for p in state.all_model_checkpoint_paths if step_of(p) != step_of(prefix)]
    if remaining:
        newest = max(remaining, key=step_of)
        _write_state(directory, os.path.join(directory, os.path.basename(newest)), state, {prefix})
    else:
        tf.io.gfile.remove(os.path.join(directory, STATE_FILE))
