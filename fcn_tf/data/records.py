"""Random access to the examples of a prepared split, in TensorFlow graph ops.

TFDS stores a split as TFRecord shards, which `tf.data.TFRecordDataset`
reads front to back only. Training reads the examples in a fresh random
order every epoch (`fcn_tf.data.order`), so it needs example `i` on demand.
TensorFlow's `TFRecordDatasetV2` op takes a byte offset per file and seeks
there (the file is not read up to it), so with the offset of every record,
one record is read with its CRC checks by a one-element dataset
(`read_record`) inside the pipeline: no Python callback, no copy of the
data in another format, and an iterator whose state is a file position.

The offsets come from the TFRecord framing (per record: uint64 length,
uint32 CRC, the data, uint32 CRC), read once when the dataset is prepared
(`write_index`, a small .npz beside the shards) or, for a dataset prepared
before the index existed, from the shards when the pipeline is built.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import struct
from collections.abc import Callable

import numpy as np
import tensorflow as tf

INDEX_FILE = "record_offsets.npz"

# uint64 length + uint32 masked CRC of the length before the data, uint32
# masked CRC of the data after it.
_HEADER = 12
_FOOTER = 4


class CorruptShardError(ValueError):
    """A TFRecord shard's framing is cut short or disagrees with the dataset's counts."""


def record_offsets(path: str) -> np.ndarray:
    """Byte offsets (int64) of the records of one TFRecord file, in order.

    Args:
      path: the TFRecord file (any `tf.io.gfile` path).

    Raises:
      CorruptShardError: a record runs past the end of the file.
    """
    size = tf.io.gfile.stat(path).length
    offsets = []
    with tf.io.gfile.GFile(path, "rb") as f:
        position = 0
        while position < size:
            f.seek(position)
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                raise CorruptShardError(f"{path}: truncated record header at byte {position}")
            (length,) = struct.unpack("<Q", header[:8])
            offsets.append(position)
            position += _HEADER + length + _FOOTER
        if position != size:
            raise CorruptShardError(
                f"{path}: the last record ends at byte {position}, past the file's {size}"
            )
    return np.asarray(offsets, np.int64)


def write_index(dataset_dir: str, shard_files: list[str]) -> str:
    """Writes the record offsets of `shard_files` into `dataset_dir`/INDEX_FILE.

    Args:
      dataset_dir: the prepared dataset's folder (DATA_DIR/NAME/VERSION).
      shard_files: its TFRecord shards.

    Returns:
      the index file's path.
    """
    arrays = {os.path.basename(f): record_offsets(f) for f in shard_files}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = os.path.join(dataset_dir, INDEX_FILE)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


def load_offsets(dataset_dir: str, shard_files: list[str]) -> dict[str, np.ndarray]:
    """Shard basename -> record offsets, from the index or, without one, from the shards.

    Args:
      dataset_dir: the prepared dataset's folder.
      shard_files: the shards whose offsets are needed.
    """
    path = os.path.join(dataset_dir, INDEX_FILE)
    names = [os.path.basename(f) for f in shard_files]
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as f:
            stored = np.load(io.BytesIO(f.read()))
            if all(name in stored for name in names):
                return {name: stored[name] for name in names}
    logging.info(
        "%s: no record index (prepared by an older fcn_tf); reading the shards' record headers", path
    )
    return {os.path.basename(f): record_offsets(f) for f in shard_files}


@dataclasses.dataclass(frozen=True)
class RandomAccessSplit:
    """A split's examples by position, for the training order.

    Attributes:
      num_examples: examples in the split.
      read: `i (int64 scalar tensor) -> tf.data.Dataset` of the one example
        at position `i` of the stored order; graph ops only, usable in a
        `map` (`.get_single_element()`) or `flat_map`.
    """

    num_examples: int
    read: Callable[[tf.Tensor], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class RecordIndex:
    """Where each example of a split is: shard file and byte offset, in split order.

    Attributes:
      files: the shard files.
      file_of: int32 (n,), index into `files` of each example.
      offset: int64 (n,), byte offset of each example's record.
    """

    files: tuple[str, ...]
    file_of: np.ndarray
    offset: np.ndarray

    def __len__(self) -> int:
        return len(self.offset)


def split_index(dataset_dir: str, file_instructions) -> RecordIndex:
    """The RecordIndex of a TFDS split (or slice) from its file instructions.

    Args:
      dataset_dir: the prepared dataset's folder.
      file_instructions: `builder.info.splits[split].file_instructions`
        (shard filename, records to skip, records to take).

    Raises:
      CorruptShardError: a shard holds fewer records than the dataset info says.
    """
    files = sorted({str(fi.filename) for fi in file_instructions})
    offsets = load_offsets(dataset_dir, files)
    file_of, offset = [], []
    for fi in file_instructions:
        name = str(fi.filename)
        shard = offsets[os.path.basename(name)]
        if len(shard) != fi.examples_in_shard:
            raise CorruptShardError(
                f"{name}: {len(shard)} records, the dataset info says {fi.examples_in_shard}; prepare it again"
            )
        chosen = shard[fi.skip : fi.skip + fi.take]
        offset.append(chosen)
        file_of.append(np.full(len(chosen), files.index(name), np.int32))
    return RecordIndex(tuple(files), np.concatenate(file_of), np.concatenate(offset))


def read_record(index: RecordIndex, i) -> tf.data.Dataset:
    """A one-element dataset of the serialized record of example `i` (int64 scalar tensor).

    Use it inside a function of the pipeline only, as
    `read_record(...).get_single_element()` in a parallel `map` (the training
    pipeline: several reads in flight) or in `flat_map`: in TensorFlow 2.21
    the op's graph serialization drops `byte_offsets` ("3 inputs specified
    of 4"), which breaks a TFRecordDatasetV2 dataset iterated at top level,
    where tf.data serializes it to optimize it; the datasets made inside a
    function run are built at run time and never serialized.

    Args:
      index: the split's RecordIndex.
      i: the example's position in the split.
    """
    files = tf.constant(index.files)
    file = tf.gather(files, tf.gather(tf.constant(index.file_of), i))
    offset = tf.gather(tf.constant(index.offset), i)
    # buffer_size 0: the three reads of one record, without a read-ahead
    # buffer that would fetch bytes of the records next to it.
    variant = tf.raw_ops.TFRecordDatasetV2(
        filenames=file[tf.newaxis],
        compression_type="",
        buffer_size=tf.constant(0, tf.int64),
        byte_offsets=offset[tf.newaxis],
    )
    return tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.string)).take(1)
