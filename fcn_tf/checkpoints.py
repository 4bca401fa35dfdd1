"""Where checkpoints live, how they are verified, saved and restored.

Checkpoints are `tf.train.CheckpointManager` checkpoints named `ckpt-STEP`
(files `ckpt-STEP.index` and `ckpt-STEP.data-*`, listed newest last in the
manager's state file `checkpoint`); `step_of`, `prefix_of` and
`checkpoint_steps` are the one place that reads and writes those names.
Training keeps two kinds under the same steps (fcn_tf/training/resume.py):
the model checkpoint (model, optimizer, step, dropout RNG state) in
`WORKDIR/checkpoints/`, and each worker's own input position in
`WORKDIR/checkpoints/input/worker-K/`. Evaluation, export and predict need
only the model, restored from a workdir's latest checkpoint, an explicit
checkpoint prefix, or a Keras `.weights.h5` file (e.g. a converted reference
checkpoint).

Faults handled for training:

* resume (`verify`): every tensor of the checkpoint about to be restored is
  read first (sizes and CRC32C checksums); fcn_tf/training/recovery.py sets
  an unreadable one aside and falls back to the newest readable one.
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
import shutil  # disk_usage of a local checkpoint folder (_free_space)

import numpy as np
import tensorflow as tf
from absl import logging

from fcn_tf import storage

CHECKPOINT_SUBDIR = "checkpoints"
# The CheckpointManager's default `checkpoint_name`: files are ckpt-STEP.*.
CHECKPOINT_NAME = "ckpt"
STATE_FILE = "checkpoint"
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


class CheckpointMismatchError(RuntimeError):
    """A readable checkpoint whose objects do not match this run's model, optimizer or input pipeline."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; its partial files were removed."""


def checkpoint_dir(workdir: str) -> str:
    """WORKDIR/checkpoints: the model checkpoints of a training workdir.

    Args:
      workdir: the training workdir.
    """
    return os.path.join(workdir, CHECKPOINT_SUBDIR)


def step_of(prefix: str) -> int:
    """The STEP of a checkpoint prefix `.../ckpt-STEP`; -1 for a name without one.

    Args:
      prefix: a checkpoint prefix (a path or a bare name).
    """
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


def prefix_of(directory: str, step: int) -> str:
    """The prefix `DIRECTORY/ckpt-STEP` of the checkpoint of `step`.

    Args:
      directory: a checkpoint directory.
      step: the step (the checkpoint number).
    """
    return os.path.join(directory, f"{CHECKPOINT_NAME}-{step}")


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the checkpoints whose `ckpt-STEP.index` file is in `directory`, newest first.

    TensorFlow writes the `.index` file last (after the data files are
    merged), so a save killed half-way leaves none. The manager's state file
    is not read.

    Args:
      directory: a checkpoint directory (missing: no steps).
    """
    names = tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []
    return sorted((int(m.group(1)) for m in map(_CHECKPOINT_INDEX.match, names) if m), reverse=True)


def latest_checkpoint(workdir: str) -> str | None:
    """The newest checkpoint prefix in `workdir`, or None.

    Args:
      workdir: the training workdir.
    """
    return tf.train.latest_checkpoint(checkpoint_dir(workdir))


def read_checkpoint(prefix: str):
    """A reader of the checkpoint at `prefix` (never taken for a folder).

    `tf.train.load_checkpoint` first asks whether the prefix is a folder;
    filesystems without real folders (TensorFlow's `ram://`) answer yes for
    any prefix of a file name.
    """
    return tf.compat.v1.train.NewCheckpointReader(prefix)


def resolve(path: str) -> str:
    """Turns a workdir, a checkpoint prefix or a `.weights.h5` file into a restorable path.

    Args:
      path: a workdir (its latest checkpoint), a checkpoint folder, a
        checkpoint prefix or a `.weights.h5` file.

    Raises:
      FileNotFoundError: naming `path` when nothing restorable is there.
    """
    path = storage.normalize(path)
    if path.endswith(".weights.h5"):
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    if tf.io.gfile.isdir(path):
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

    Args:
      model: the built model.
      path: as in `resolve`.

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


def files_of(prefix: str) -> list[str]:
    """The `.index` and `.data-*` files of checkpoint `prefix` (ckpt-6 does not match ckpt-60's).

    Args:
      prefix: a checkpoint prefix such as `WORKDIR/checkpoints/ckpt-300`.
    """
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
        reader = read_checkpoint(prefix)
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


def restore_for_resume(checkpoint: tf.train.Checkpoint, prefix: str, config_file: str) -> None:
    """Restores a verified checkpoint into the objects of a training run.

    Every object of this run must be found; extra entries (the preemption
    handler's run counter, save_counter) are read later or not needed.

    Args:
      checkpoint: the run's `tf.train.Checkpoint`.
      prefix: a verified checkpoint (`fcn_tf.training.recovery.newest_readable`).
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
        prefix = prefix_of(self.directory, number)
        previous = self.latest_checkpoint
        resume = self._resume_point() if self._resume_point else previous
        existing = set(files_of(prefix))
        state_tmp_pattern = os.path.join(self.directory, STATE_FILE + ".tmp*")
        state_tmp_before = set(tf.io.gfile.glob(state_tmp_pattern))
        try:
            return super().save(checkpoint_number, check_interval=check_interval, options=options)
        except (tf.errors.OpError, OSError) as e:
            partial = [p for p in files_of(prefix) if p not in existing]
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
        if previous and files_of(previous):
            needed = f"{_format_bytes(sum(_size(p) for p in files_of(previous)))} (the size of {previous})"
        else:
            needed = f"{_format_bytes(_variables_bytes(self.checkpoint))} for the variables alone"
        free = _free_space(self.directory)
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


def _free_space(directory: str) -> str:
    """'N free there' for a local folder (a `file://` URL included); object stores have no such figure."""
    local = storage.local_path(directory)
    if local is None:
        return "free space unknown (not a local filesystem)"
    try:
        return f"{_format_bytes(shutil.disk_usage(local).free)} free there"
    except OSError:
        return "free space unknown"
