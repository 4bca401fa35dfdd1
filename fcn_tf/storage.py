"""User paths through TensorFlow's filesystem layer: local paths and URLs alike.

Every path a user gives (workdir, data_dir, pretrained weights, checkpoints,
exports, TensorBoard, evaluation outputs, predictions) may be a local path or
a URL that `tf.io.gfile` accepts (`gs://`, `file://`, `hdfs://`, `ram://`,
...). It is kept as given: `os.path.abspath("gs://b/run")` would be
`$PWD/gs:/b/run`, a local folder that silently takes the bucket's place. The
library reads and writes user paths only through `tf.io.gfile` (or
TensorFlow ops, which use the same layer); `tests/test_storage.py` scans the
package for `open`, `os.path`, `shutil` and `fcntl` calls that would bypass it.

Only string operations of `os.path` (`join`, `basename`, `dirname`,
`splitext`) are used on user paths: they treat a URL's `/` as they treat a
local one.
"""

from __future__ import annotations

import os
import uuid

import tensorflow as tf


def is_url(path: str) -> bool:
    """Whether `path` is a URL (`scheme://...`) rather than a local path."""
    return "://" in str(path)


def normalize(path: str) -> str:
    """A user path as the library uses it: `~` expanded for local paths, URLs unchanged.

    Relative local paths stay relative (TensorFlow resolves them against the
    current directory, as the user meant).
    """
    path = str(path)
    return path if is_url(path) else os.path.expanduser(path)


def local_path(path: str) -> str | None:
    """The local filesystem path behind `path` (`file://` URLs included), None for other URLs.

    For what only a local filesystem offers (file locks, free space, libraries
    that open files themselves).
    """
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://") :] or "/"
    return None if is_url(path) else os.path.expanduser(path)


# URL schemes TensorFlow Datasets opens (through etils.epath); `file://` is passed as its local path.
TFDS_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def tfds_path(path: str) -> str | None:
    """`path` as TensorFlow Datasets accepts it: local, or a URL of `TFDS_SCHEMES`; None if it cannot."""
    local = local_path(path)
    if local is not None:
        return local
    return path if path.startswith(TFDS_SCHEMES) else None


def relative(path: str, directory: str) -> str:
    """`path` relative to `directory` when it lies inside it (a string operation, no current directory)."""
    prefix = directory.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def read_text(path: str) -> str:
    """The text of a file at a local path or URL."""
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` (local or URL) through a temporary file renamed over it.

    A reader never sees half a file on a local disk; on an object store the
    rename is a copy, still never a partial object.
    """
    tmp = f"{path}.tmp{uuid.uuid4().hex[:8]}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` (local or URL), creating its folder."""
    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)


def rename_folder(source: str, target: str) -> None:
    """Renames the folder `source` to `target` (which must not exist).

    On a local disk (a `file://` URL included) one rename, atomic. Elsewhere
    file by file: object stores have no folders to rename (GCS renames each
    object anyway), and some filesystems rename only the object named
    (TensorFlow's `ram://`).
    """
    if local_path(source) is not None:
        tf.io.gfile.rename(source, target)
        return
    for folder, _, files in tf.io.gfile.walk(source):
        inner = relative(folder, source) if folder.rstrip("/") != source.rstrip("/") else ""
        tf.io.gfile.makedirs(os.path.join(target, inner))
        for name in files:
            tf.io.gfile.rename(os.path.join(folder, name), os.path.join(target, inner, name))
    tf.io.gfile.rmtree(source)


def read_bytes(path: str) -> bytes:
    """The bytes of a file at a local path or URL."""
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()
