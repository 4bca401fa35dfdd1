"""Random access to prepared splits: record offsets, the index written by prepare, old datasets, bad shards."""

import dataclasses
import shutil
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils.shard_utils import FileInstruction

from fcn_tf.config import DataConfig
from fcn_tf.data import build_dataset, records, sources, synthetic
from fcn_tf.data.order import training_order
from fcn_tf.data.pipeline import training_examples

tfds.disable_progress_bar()

NUM_TRAIN = 7


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    synthetic.write_dataset(raw, num_train=NUM_TRAIN, num_val=3, seed=1, height=24, width=32)
    data_dir = tmp_path_factory.mktemp("tfds")
    result = sources.prepare("synthetic", raw, data_dir)
    return DataConfig(dataset="synthetic", data_dir=str(data_dir)), result.path


def _stored(config, split="train"):
    """The encoded examples in stored (sorted id) order."""
    return list(sources.encoded_split(config, split).as_numpy_iterator())


def _read(read, i):
    # Inside flat_map, as the pipeline reads: see records.read_record.
    return next(tf.data.Dataset.from_tensors(tf.constant(i, tf.int64)).flat_map(read).as_numpy_iterator())


def _by_position(config, split="train"):
    access = sources.random_access_split(config, split)
    return [_read(access.read, i) for i in range(access.num_examples)]


def _assert_same_examples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == y[key], key


def test_prepare_writes_the_index_and_random_access_reads_the_stored_examples(prepared):
    config, path = prepared
    assert (path / records.INDEX_FILE).is_file()
    stored = _stored(config)
    ids = [e["image_id"].decode() for e in stored]
    assert ids == sorted(ids) and len(ids) == NUM_TRAIN
    _assert_same_examples(_by_position(config), stored)
    _assert_same_examples(_by_position(config, "validation"), _stored(config, "validation"))
    # A TFDS slice reads the slice's examples.
    _assert_same_examples(_by_position(config, "train[2:5]"), stored[2:5])


def test_a_dataset_prepared_without_an_index_is_read_from_the_record_headers(prepared, tmp_path):
    config, path = prepared
    copy = tmp_path / "synthetic" / path.name
    shutil.copytree(path, copy)
    (copy / records.INDEX_FILE).unlink()
    old = DataConfig(dataset="synthetic", data_dir=str(tmp_path))
    _assert_same_examples(_by_position(old), _stored(config))


def test_two_epochs_of_a_prepared_split_are_two_permutations(prepared):
    config, _ = prepared
    ids = sorted(e["image_id"] for e in _stored(config))
    drawn = [e["image_id"] for _, e in training_examples(config).take(2 * NUM_TRAIN).as_numpy_iterator()]
    assert sorted(drawn[:NUM_TRAIN]) == ids and sorted(drawn[NUM_TRAIN:]) == ids
    assert drawn[:NUM_TRAIN] != drawn[NUM_TRAIN:]
    assert drawn[:NUM_TRAIN] != ids  # not the stored order (1 chance in 5,040)


def test_prepared_training_stream_resumes_from_a_checkpoint(prepared, tmp_path):
    config, _ = prepared
    config = dataclasses.replace(config, crop_size=(16, 16), scale_target=(32, 24), global_batch_size=2)
    iterator = iter(build_dataset(config, True))
    for _ in range(5):
        next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
    # Past the first epoch (7 examples): the next permutation is resumed too.
    expected = [next(iterator)[0].numpy() for _ in range(4)]
    fresh = iter(build_dataset(config, True))
    tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
    for batch in expected:
        np.testing.assert_array_equal(next(fresh)[0].numpy(), batch)


def test_evaluation_reads_in_sorted_order(prepared):
    config, _ = prepared
    ids = [e["image_id"][0].decode() for e in build_dataset(config, False).as_numpy_iterator()]
    assert ids == sorted(ids) and len(ids) == 3


def _write_shard(path, payloads):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for p in payloads:
            writer.write(p)


def test_split_index_over_several_shards_and_slices(tmp_path):
    payloads = [bytes([k]) * (k * 37 % 200 + 1) for k in range(10)]
    _write_shard(tmp_path / "d-train.tfrecord-00000-of-00002", payloads[:6])
    _write_shard(tmp_path / "d-train.tfrecord-00001-of-00002", payloads[6:])
    first, second = (str(tmp_path / f"d-train.tfrecord-0000{k}-of-00002") for k in range(2))
    records.write_index(str(tmp_path), [first, second])
    # train[4:9]: the last 2 of shard 0 and the first 3 of shard 1.
    instructions = [
        FileInstruction(filename=first, skip=4, take=2, examples_in_shard=6),
        FileInstruction(filename=second, skip=0, take=3, examples_in_shard=4),
    ]
    index = records.split_index(str(tmp_path), instructions)
    got = [_read(lambda i: records.read_record(index, i), i) for i in range(len(index))]
    assert got == payloads[4:9]


def test_a_truncated_or_miscounted_shard_is_a_one_line_error(tmp_path):
    shard = tmp_path / "d-train.tfrecord-00000-of-00001"
    _write_shard(shard, [b"x" * 100, b"y" * 100])
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(
        records.CorruptShardError, match=r"d-train\.tfrecord-00000-of-00001: the last record ends"
    ):
        records.record_offsets(str(shard))
    shard.write_bytes(data)
    with pytest.raises(
        records.CorruptShardError, match=r"2 records, the dataset info says 3; prepare it again"
    ):
        records.split_index(str(tmp_path), [FileInstruction(str(shard), skip=0, take=3, examples_in_shard=3)])


class _ReadCounter:
    """Reads that take a while (as a record on shared storage does), counting how many run at once."""

    def __init__(self, seconds: float):
        self.seconds, self.running, self.most = seconds, 0, 0
        self.lock = threading.Lock()

    def read(self, i):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return i

    def split(self, size: int) -> records.RandomAccessSplit:
        def read(i):
            slow = tf.data.Dataset.from_tensors(i).map(lambda i: tf.py_function(self.read, [i], tf.int64))
            return slow.map(
                lambda i: {
                    "image": tf.fill([4, 4, 3], tf.cast(i, tf.uint8)),
                    "label": tf.zeros([4, 4], tf.uint8),
                    "image_id": tf.strings.as_string(i),
                }
            )

        return records.RandomAccessSplit(size, read)


@pytest.mark.parametrize("reads", [1, 6])
def test_training_keeps_several_reads_in_flight_in_the_training_order(reads):
    size, taken = 9, 24
    config = DataConfig(seed=5, reads_in_flight=reads)
    counter = _ReadCounter(0.05)
    stream = training_examples(config, source=counter.split(size)).take(taken)
    got = [(int(p), int(e["image_id"])) for p, e in stream.as_numpy_iterator()]
    # The training order, read one record at a time or several at once.
    expected = training_order(size, config.seed, 1, 0).take(taken)
    assert got == [(int(p), int(i)) for p, i in expected.as_numpy_iterator()]
    if reads == 1:
        assert counter.most == 1
    else:
        assert counter.most > 1, "one read at a time"


def test_reads_benchmark_times_the_training_reads_with_the_added_latency(prepared):
    from benchmarks import reads

    config, _ = prepared
    split = sources.random_access_split(config, "train")
    quick = reads.measure(config, split, reads=1, latency_ms=0, count=8, repeats=1)
    # 8 reads one at a time with 50 ms each take at least 0.4 s: at most 20 records/s.
    slow = reads.measure(config, split, reads=1, latency_ms=50, count=8, repeats=1)
    assert slow <= 20 < quick
