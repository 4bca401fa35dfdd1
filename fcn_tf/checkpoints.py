"""Where checkpoints live and how a model is restored from one.

Training writes `tf.train.Checkpoint(model=..., optimizer=..., step=...,
iterator=...)` with a `tf.train.CheckpointManager` into `WORKDIR/checkpoints/`
(files `ckpt-STEP.*`). Evaluation, export and predict need only the model,
restored from a workdir's latest checkpoint, an explicit checkpoint prefix,
or a Keras `.weights.h5` file (e.g. a converted reference checkpoint).
"""

from __future__ import annotations

import os

import tensorflow as tf

CHECKPOINT_SUBDIR = "checkpoints"


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
