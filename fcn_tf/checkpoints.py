"""Where checkpoints live, how they are verified, saved and restored.

Training writes `tf.train.Checkpoint(model=..., optimizer=..., step=...,
iterator=...)` with a `tf.train.CheckpointManager` into `WORKDIR/checkpoints/`
(files `ckpt-STEP.index` and `ckpt-STEP.data-*`, listed newest last in the
manager's state file `checkpoint`). Evaluation, export and predict need only
the model, restored from a workdir's latest checkpoint, an explicit checkpoint
prefix, or a Keras `.weights.h5` file (e.g. a converted reference checkpoint).

Faults handled for training:

* resume (`newest_readable`): every tensor of the checkpoint about to be
  restored is read first (sizes and CRC32C checksums). A truncated or damaged
  newest checkpoint is moved to `checkpoints/unreadable/` (never deleted),
  dropped from the state file, and the newest readable one is used instead;
  when none is readable, `NoReadableCheckpointError` lists each checkpoint
  and its problem.
* save (`CheckpointManager`): a failed save (disk full, permissions, I/O error) removes its
  partial files and raises `CheckpointSaveError` naming the path, the space a
  checkpoint needs and the last good checkpoint.
* start (`remove_partial_saves`): the `ckpt-STEP_temp/` folders that a killed
  save leaves behind are removed. TensorFlow writes every save there first and
  renames the finished files out of it, so such a folder is never part of a
  checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid

import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import text_format

CHECKPOINT_SUBDIR = "checkpoints"
# The CheckpointManager's default `checkpoint_name`: files are ckpt-STEP.*.
CHECKPOINT_NAME = "ckpt"
STATE_FILE = "checkpoint"
UNREADABLE_SUBDIR = "unreadable"
# Verification reads the tensors in groups of about this many bytes, so its
# memory stays far below a restore's.
_VERIFY_CHUNK_BYTES = 64 << 20
_CHECKPOINT_INDEX = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)\.index$")
_PARTIAL_SAVE_DIR = re.compile(rf"^{CHECKPOINT_NAME}-\d+_temp$")
# tf.io's atomic write of the state file: `checkpoint.tmp` + a uuid4 hex.
_PARTIAL_STATE_FILE = re.compile(rf"^{STATE_FILE}\.tmp[0-9a-f]{{32}}$")


class UnreadableCheckpointError(RuntimeError):
    """One checkpoint cannot be read; `reason` names the file and what is wrong with it."""

    def __init__(self, prefix: str, reason: str):
        super().__init__(f"checkpoint {prefix} is unreadable: {reason}")
        self.prefix = prefix
        self.reason = reason


class NoReadableCheckpointError(RuntimeError):
    """A workdir has checkpoints but none of them can be read."""


class CheckpointMismatchError(RuntimeError):
    """A readable checkpoint whose objects do not match this run's model, optimizer or input pipeline."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; its partial files were removed."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_SUBDIR)


def latest_checkpoint(workdir: str) -> str | None:
    """The newest checkpoint prefix in `workdir`, or None."""
    return tf.train.latest_checkpoint(checkpoint_dir(workdir))


def resolve(path: str) -> str:
    """Turns a workdir, a checkpoint prefix or a `.weights.h5` file into a restorable path.

    Raises:
      FileNotFoundError: naming `path` when nothing restorable is there.
    """
    path = os.path.expanduser(path)
    if path.endswith(".weights.h5"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    if os.path.isdir(path):
        latest = latest_checkpoint(path) or tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path} (looked in {checkpoint_dir(path)} and {path})")
        return latest
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise FileNotFoundError(f"not a checkpoint prefix, workdir or .weights.h5 file: {path}")


def restore_model(model, path: str) -> str:
    """Loads the weights of `model` from a workdir, checkpoint prefix or `.weights.h5`.

    Only the model is read (optimizer and iterator state are left alone).
    Every model variable must be found in the checkpoint.

    Returns:
      The path actually restored.
    """
    resolved = resolve(path)
    if resolved.endswith(".weights.h5"):
        model.load_weights(resolved)
        return resolved
    status = tf.train.Checkpoint(model=model).restore(resolved)
    status.expect_partial()
    status.assert_existing_objects_matched()
    return resolved


# --------------------------------------------------------------------------- verification


def _files_of(prefix: str) -> list[str]:
    """The `.index` and `.data-*` files of checkpoint `prefix` (ckpt-6 does not match ckpt-60's)."""
    return sorted(tf.io.gfile.glob(prefix + ".index") + tf.io.gfile.glob(prefix + ".data-*"))


def _size(path: str) -> int:
    try:
        return tf.io.gfile.stat(path).length
    except tf.errors.OpError:
        return 0


def _error_text(error: Exception, prefix: str) -> str:
    """TensorFlow's message in one short line: no op/function decoration, paths relative to the checkpoint."""
    text = error.message if isinstance(error, tf.errors.OpError) else str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\]", "", text)
    text = " ".join(text.split()).replace(os.path.dirname(prefix) + os.sep, "")
    return text or type(error).__name__


def _data_files_label(prefix: str) -> str:
    data = tf.io.gfile.glob(prefix + ".data-*")
    if len(data) == 1:
        return f"{os.path.basename(data[0])} ({_size(data[0])} bytes)"
    return f"the data files {os.path.basename(prefix)}.data-* ({len(data)} found)"


def verify(prefix: str) -> None:
    """Reads every tensor of checkpoint `prefix`, checking the index, sizes and checksums.

    The tensors are read in groups (`RestoreV2` on the CPU) and dropped, so
    the cost is reading the files once, less than a restore, which also
    assigns every value (measured, see BENCHMARKS.md).

    Args:
      prefix: a checkpoint prefix such as `WORKDIR/checkpoints/ckpt-300`.

    Raises:
      UnreadableCheckpointError: naming the damaged or missing file and why
        (truncated, checksum mismatch, not an index, ...).
    """
    name = os.path.basename(prefix)
    index = prefix + ".index"
    if not tf.io.gfile.exists(index):
        raise UnreadableCheckpointError(prefix, f"{name}.index is missing")
    try:
        reader = tf.train.load_checkpoint(prefix)
        dtypes = reader.get_variable_to_dtype_map()
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as e:
        raise UnreadableCheckpointError(
            prefix, f"{name}.index ({_size(index)} bytes) is damaged: {_error_text(e, prefix)}"
        ) from e
    if not tf.io.gfile.glob(prefix + ".data-*"):
        raise UnreadableCheckpointError(prefix, f"{name}.data-* is missing (its index is there)")
    chunks, chunk, chunk_bytes = [], [], 0
    for key in sorted(dtypes):
        chunk.append(key)
        # Strings and variants (the input pipeline's state) have no fixed size: counted as 1 byte each.
        chunk_bytes += int(np.prod(shapes[key])) * max(dtypes[key].size, 1)
        if chunk_bytes >= _VERIFY_CHUNK_BYTES:
            chunks.append(chunk)
            chunk, chunk_bytes = [], 0
    if chunk:
        chunks.append(chunk)
    try:
        with tf.device("CPU:0"):
            for keys in chunks:
                tf.raw_ops.RestoreV2(
                    prefix=prefix,
                    tensor_names=keys,
                    shape_and_slices=[""] * len(keys),
                    dtypes=[dtypes[k] for k in keys],
                )
    except (tf.errors.OutOfRangeError, IndexError) as e:
        raise UnreadableCheckpointError(
            prefix, f"{_data_files_label(prefix)} is truncated: it ends before the tensors its index lists"
        ) from e
    except tf.errors.OpError as e:
        raise UnreadableCheckpointError(
            prefix, f"{_data_files_label(prefix)} is damaged: {_error_text(e, prefix)}"
        ) from e


# --------------------------------------------------------------------------- resume


def _step_of(prefix: str) -> int:
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


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
        return sorted(set(paths), key=_step_of, reverse=True), state, None
    # No usable bookkeeping: the checkpoint files themselves say what exists.
    names = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
    prefixes = [os.path.join(directory, n[: -len(".index")]) for n in names if _CHECKPOINT_INDEX.match(n)]
    if not prefixes:
        return [], None, None
    return sorted(prefixes, key=_step_of, reverse=True), None, problem


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
    for path in _files_of(prefix):
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
        names = tf.io.gfile.listdir(directory)
        found = [os.path.join(directory, n[: -len(".index")]) for n in names if _CHECKPOINT_INDEX.match(n)]
        entries = {p: tf.io.gfile.stat(p + ".index").mtime_nsec / 1e9 for p in found}
        preserved = min(entries.values(), default=time.time()) - 1.0
    entries.setdefault(newest, time.time())
    kept = sorted((p for p in entries if p not in dropped and _step_of(p) <= _step_of(newest)), key=_step_of)
    proto = tf.compat.v1.train.generate_checkpoint_state_proto(
        directory,
        os.path.relpath(newest, directory),
        all_model_checkpoint_paths=[os.path.relpath(p, directory) for p in kept],
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
    """The newest checkpoint in `directory` that `verify` accepts, repairing the bookkeeping around it.

    Candidates are the checkpoints listed in the manager's state file, newest
    step first; without a usable state file, the `ckpt-STEP.index` files
    present. Each unreadable newer checkpoint is logged as a warning naming
    the file and why.

    Args:
      directory: a checkpoint directory (`checkpoint_dir(workdir)`).
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
    if usable is not None:
        passed_over = [p for p in candidates if not usable(_step_of(p))]
        candidates = [p for p in candidates if p not in passed_over]
        if passed_over:
            logging.warning(
                "Passing over %s: not complete (%s)",
                ", ".join(os.path.basename(p) for p in passed_over),
                "a save was interrupted before every part of that step was written",
            )
        if not candidates:
            return None
    problems: list[UnreadableCheckpointError] = []
    for prefix in candidates:
        try:
            verify(prefix)
        except UnreadableCheckpointError as e:
            problems.append(e)
            continue
        break
    else:
        found = "; ".join(f"{os.path.basename(e.prefix)}: {e.reason}" for e in problems)
        raise NoReadableCheckpointError(
            f"cannot resume: none of the {len(problems)} checkpoint(s) in {directory} is readable ({found}). "
            "Nothing was changed. Copy an intact checkpoint (its .index and .data-* files) into that folder "
            "and rerun, or start from step 0 with a new --workdir."
        )
    unreadable_dir = os.path.join(directory, UNREADABLE_SUBDIR)
    for e in problems:
        moved = set_aside and bool(_files_of(e.prefix))
        if moved:
            _set_aside_checkpoint(e.prefix, directory)
        logging.warning(
            "%s%s. Resuming from %s instead, the newest readable checkpoint.",
            e,
            f"; its files were moved to {unreadable_dir}" if moved else "",
            prefix,
        )
    if set_aside and (problems or state_problem or (usable is not None and passed_over)):
        if state_problem and tf.io.gfile.exists(state_file):
            tf.io.gfile.rename(state_file, _free_target(directory, STATE_FILE))
        _write_state(directory, prefix, state, {e.prefix for e in problems})
    return prefix


def restore_for_resume(checkpoint: tf.train.Checkpoint, prefix: str, config_file: str) -> None:
    """Restores a verified checkpoint into the objects of a training run.

    Every object of this run must be found; extra entries (the preemption
    handler's run counter, save_counter) are read later or not needed.

    Args:
      checkpoint: the run's `tf.train.Checkpoint`.
      prefix: a checkpoint `newest_readable` returned.
      config_file: the workdir's config.json, named in the mismatch message.

    Raises:
      CheckpointMismatchError: the checkpoint is readable but does not hold
        this run's model, optimizer or input pipeline.
    """
    try:
        checkpoint.restore(prefix).assert_existing_objects_matched().expect_partial()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        raise CheckpointMismatchError(
            f"cannot resume from {prefix}: {e}\n  The workdir was written by a different model or "
            f"input pipeline (compare {config_file} with this run's config), or use a new --workdir."
        ) from e


def remove_partial_saves(directory: str) -> list[str]:
    """Removes what killed saves left in `directory`: `ckpt-STEP_temp/` folders and `checkpoint.tmp*` files.

    Call it only while holding the workdir (no save can be under way).
    Checkpoints themselves are never touched.

    Args:
      directory: a checkpoint directory.

    Returns:
      The removed paths.
    """
    if not tf.io.gfile.isdir(directory):
        return []
    removed = []
    for name in sorted(tf.io.gfile.listdir(directory)):
        name = name.rstrip("/")
        path = os.path.join(directory, name)
        if _PARTIAL_SAVE_DIR.match(name) and tf.io.gfile.isdir(path):
            size = sum(_size(os.path.join(d, f)) for d, _, files in tf.io.gfile.walk(path) for f in files)
            tf.io.gfile.rmtree(path)
        elif _PARTIAL_STATE_FILE.match(name) and not tf.io.gfile.isdir(path):
            size = _size(path)
            tf.io.gfile.remove(path)
        else:
            continue
        logging.info("Removed %s (%s), left by an interrupted checkpoint save", path, _format_bytes(size))
        removed.append(path)
    return removed


def discard(prefix: str) -> None:
    """Removes checkpoint `prefix` and its entry in the state file (the previous one becomes the latest).

    For a step whose save failed in a later part (a worker's input position):
    its model checkpoint alone is no resume point, and leaving it would make
    the state file name a checkpoint a rerun cannot use.

    Args:
      prefix: the checkpoint, e.g. `WORKDIR/checkpoints/ckpt-300`.
    """
    directory = os.path.dirname(prefix)
    for path in _files_of(prefix):
        tf.io.gfile.remove(path)
    state, _ = _read_state(directory)
    if state is None:
        return
    remaining = [p for p in state.all_model_checkpoint_paths if _step_of(p) != _step_of(prefix)]
    if remaining:
        newest = max(remaining, key=_step_of)
        _write_state(directory, os.path.join(directory, os.path.basename(newest)), state, {prefix})
    else:
        tf.io.gfile.remove(os.path.join(directory, STATE_FILE))


# --------------------------------------------------------------------------- save


def _format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _variables_bytes(checkpoint) -> int:
    seen, total = set(), 0
    for obj in tf.train.TrackableView(checkpoint).descendants():
        if isinstance(obj, tf.Variable) and id(obj) not in seen:
            seen.add(id(obj))
            total += obj.shape.num_elements() * obj.dtype.size
    return total


class CheckpointManager(tf.train.CheckpointManager):
    """`tf.train.CheckpointManager` whose failed saves stop with one clear error and leave nothing behind.

    Every save goes through `save`: the periodic and final ones of the
    training loop and the one `PreemptionCheckpointHandler` makes on
    SIGTERM. Checkpoints are named `ckpt-NUMBER`.

    Args:
      checkpoint: the `tf.train.Checkpoint` to save.
      directory: where the checkpoints go.
      max_to_keep: how many of the newest checkpoints are kept (older ones
        are deleted after each save).
      resume_point: optional `() -> prefix or None`, the checkpoint a rerun
        resumes from, named in a failure's message; default this manager's
        latest. (A worker's input positions are one part of a step whose
        model checkpoint is what the user resumes from.)
    """

    def __init__(
        self,
        checkpoint: tf.train.Checkpoint,
        directory: str,
        max_to_keep: int | None,
        resume_point=None,
    ):
        super().__init__(checkpoint, directory, max_to_keep=max_to_keep, checkpoint_name=CHECKPOINT_NAME)
        self._resume_point = resume_point

    def save(self, checkpoint_number=None, check_interval=True, options=None):
        """`tf.train.CheckpointManager.save`; a failure removes the save's partial files.

        Those are its `ckpt-NUMBER_temp/` folder, any `ckpt-NUMBER.*` file this
        save created and a half-written state file. Earlier checkpoints are
        left as they are.

        Args:
          checkpoint_number: the number in the checkpoint's name (the
            training step); None numbers it by the checkpoint's save counter.
          check_interval: as in `tf.train.CheckpointManager.save`.
          options: as in `tf.train.CheckpointManager.save`.

        Returns:
          The saved checkpoint prefix.

        Raises:
          CheckpointSaveError: one line with the path, why it failed, the
            space a checkpoint needs, the last good checkpoint, and that
            rerunning the same command resumes from it.
        """
        number = (
            int(self.checkpoint.save_counter) + 1 if checkpoint_number is None else int(checkpoint_number)
        )
        prefix = os.path.join(self.directory, f"{CHECKPOINT_NAME}-{number}")
        previous = self.latest_checkpoint
        resume = self._resume_point() if self._resume_point else previous
        existing = set(_files_of(prefix))
        state_tmp_pattern = os.path.join(self.directory, STATE_FILE + ".tmp*")
        state_tmp_before = set(tf.io.gfile.glob(state_tmp_pattern))
        try:
            return super().save(checkpoint_number, check_interval=check_interval, options=options)
        except (tf.errors.OpError, OSError) as e:
            partial = [p for p in _files_of(prefix) if p not in existing]
            partial += sorted(set(tf.io.gfile.glob(state_tmp_pattern)) - state_tmp_before)
            partial += [prefix + "_temp"] if tf.io.gfile.isdir(prefix + "_temp") else []
            left = []
            for path in partial:
                try:
                    (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)
                except tf.errors.OpError:
                    left.append(path)
            raise CheckpointSaveError(self._failure_message(prefix, previous, resume, e, left)) from e

    def _failure_message(self, prefix, previous, resume, error: Exception, left: list[str]) -> str:
        # "PATH; No space left on device": the cause is what the user needs, the path is named already.
        reason = _error_text(error, prefix).rsplit("; ", 1)[-1]
        if previous and _files_of(previous):
            needed = f"{_format_bytes(sum(_size(p) for p in _files_of(previous)))} (the size of {previous})"
        else:
            needed = f"{_format_bytes(_variables_bytes(self.checkpoint))} for the variables alone"
        try:
            free = f"{_format_bytes(shutil.disk_usage(self.directory).free)} free there"
        except OSError:
            free = "free space unknown"
        if left:
            removed = f"Could not remove its partial files {', '.join(left)}; remove them by hand"
        else:
            removed = "Its partial files were removed"
        fix = "Free some space (or make the folder writable) and rerun the same command"
        if resume:
            rerun = f"the last good checkpoint is {resume}. {fix}: it resumes from there."
        else:
            rerun = f"there is no earlier checkpoint. {fix}: it starts from step 0."
        return (
            f"cannot save checkpoint {prefix}: {reason} ({type(error).__name__}). "
            f"A checkpoint needs about {needed}; {free}. {removed}; {rerun}"
        )
