"""The training order: every epoch a uniform permutation of each worker's shard; a small input state."""

import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from fcn_tf.config import DataConfig
from fcn_tf.data import build_dataset, encoded, order, records
from fcn_tf.data.pipeline import training_examples

NUM = 20_000
DRAWN = 2_000


def sorted_ids(num):
    return [f"id{i:06d}" for i in range(num)]


def id_source(num):
    """A sorted source of ids only: what the order is tested on."""
    return tf.data.Dataset.from_tensor_slices({"image_id": sorted_ids(num)})


def context(num_pipelines, pipeline_id):
    if num_pipelines == 1:
        return None
    return tf.distribute.InputContext(
        num_input_pipelines=num_pipelines, input_pipeline_id=pipeline_id, num_replicas_in_sync=num_pipelines
    )


def drawn_ranks(num_pipelines, pipeline_id, count, seed=0, num=NUM):
    """Ranks in the sorted split of the first `count` ids of one pipeline's training stream."""
    ds = training_examples(DataConfig(seed=seed), context(num_pipelines, pipeline_id), id_source(num))
    ds = ds.map(
        lambda position, example: (
            position,
            tf.strings.to_number(tf.strings.substr(example["image_id"], 2, 6), tf.int64),
        )
    )
    # Batched: iterating element by element in Python would cost more than the pipeline.
    positions, ranks = zip(*ds.take(count).batch(4096).as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate(positions), np.arange(count))
    return np.concatenate(ranks)


@pytest.mark.parametrize("num_pipelines", [1, 2])
def test_every_epoch_is_a_uniform_permutation_of_the_shard(num_pipelines):
    shards = []
    first_drawn = []
    for pipeline_id in range(num_pipelines):
        size = order.shard_size(NUM, num_pipelines, pipeline_id)
        ranks = drawn_ranks(num_pipelines, pipeline_id, 2 * size)
        shard = np.arange(pipeline_id, NUM, num_pipelines)
        epoch1, epoch2 = ranks[:size], ranks[size:]
        np.testing.assert_array_equal(np.sort(epoch1), shard)
        np.testing.assert_array_equal(np.sort(epoch2), shard)
        # A new permutation: the two epochs agree in (about 1 / size of)
        # their positions only by chance.
        assert np.mean(epoch1 == epoch2) < 0.01
        shards.append(set(epoch1.tolist()))
        first_drawn.append(ranks[: DRAWN // num_pipelines])
        # Uniform over the split, not a window of the sorted order (a
        # shuffle buffer of 1,000 draws its first 2,000 from the first ~3,000).
        assert stats.kstest(ranks[:DRAWN] / NUM, "uniform").pvalue > 0.01
    assert set().union(*shards) == set(range(NUM))
    assert sum(len(s) for s in shards) == NUM  # disjoint
    # The first 2,000 of all workers together (the first global batches).
    together = np.concatenate(first_drawn) / NUM
    assert stats.kstest(together, "uniform").pvalue > 0.01


def test_the_uniformity_check_rejects_a_shuffle_buffer():
    # What the training pipeline did before: a window of 1,000 over the
    # sorted split. Its first 2,000 draws fail the test above.
    window = tf.data.Dataset.range(NUM).shuffle(1_000, seed=0).take(DRAWN)
    ranks = np.concatenate(list(window.batch(DRAWN).as_numpy_iterator()))
    assert stats.kstest(ranks / NUM, "uniform").pvalue < 1e-6


def test_same_seed_same_order_other_seed_other_order():
    a = drawn_ranks(2, 1, DRAWN, seed=5)
    np.testing.assert_array_equal(a, drawn_ranks(2, 1, DRAWN, seed=5))
    assert np.mean(a == drawn_ranks(2, 1, DRAWN, seed=6)) < 0.01
    # The pipelines' keys differ too: worker 0 does not read the neighbour
    # (in sorted order) of what worker 1 reads.
    assert np.mean(drawn_ranks(2, 0, DRAWN, seed=5) + 1 == a) < 0.01


def test_the_order_is_independent_of_the_stored_order():
    # The permutation acts on positions in the split: reversing the stored
    # order reverses which ids are drawn, position for position.
    ds = training_examples(DataConfig(seed=2), None, id_source(50))
    forward = [e["image_id"] for _, e in ds.take(100).as_numpy_iterator()]
    reversed_source = tf.data.Dataset.from_tensor_slices({"image_id": sorted_ids(50)[::-1]})
    ds = training_examples(DataConfig(seed=2), None, reversed_source)
    backward = [e["image_id"] for _, e in ds.take(100).as_numpy_iterator()]
    assert [sorted_ids(50)[49 - int(i[2:])].encode() for i in forward] == backward


def test_build_dataset_augments_the_examples_of_the_order():
    # Label of example k is all k: each crop of build_dataset must come from
    # the example that training_examples puts at its position.
    num = 7
    labels = [tf.io.encode_png(np.full((20, 24, 1), k, np.uint8)).numpy() for k in range(num)]
    images = [tf.io.encode_png(np.full((20, 24, 3), 9 * k, np.uint8)).numpy() for k in range(num)]
    source = tf.data.Dataset.from_tensor_slices(encoded.from_files(images, labels, [str(k) for k in range(num)]))
    cfg = DataConfig(
        crop_size=(16, 16),
        scale_target=(24, 20),
        global_batch_size=3,
        photometric=False,
        seed=1,
    )
    expected = [
        int(e["image_id"]) for _, e in training_examples(cfg, None, source).take(12).as_numpy_iterator()
    ]
    got = []
    for _, batch_labels in build_dataset(cfg, True, source=source).take(4).as_numpy_iterator():
        for label in batch_labels:
            values = set(np.unique(label).tolist()) - {255}
            assert len(values) == 1
            got.append(values.pop())
    assert got == expected
    assert sorted(expected[:num]) == list(range(num))


def test_a_split_smaller_than_the_number_of_workers_is_refused():
    with pytest.raises(ValueError, match="fewer than the 3 input pipelines"):
        training_examples(DataConfig(), context(3, 0), id_source(2))


def _tiny_encoded(num):
    rng = np.random.default_rng(0)
    label = tf.io.encode_png(rng.integers(0, 5, (40, 48, 1)).astype(np.uint8)).numpy()
    image = tf.io.encode_png(rng.integers(0, 255, (40, 48, 3)).astype(np.uint8)).numpy()
    return image, label


def memory_source(num):
    image, label = _tiny_encoded(num)
    return tf.data.Dataset.from_tensor_slices(encoded.from_files([image] * num, [label] * num, sorted_ids(num)))


def record_source(num, directory):
    """The prepared-dataset reader (record offsets + TFRecordDatasetV2) over a shard of `num` records."""
    image, label = _tiny_encoded(num)
    path = os.path.join(directory, f"shard-{num}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for image_id in sorted_ids(num):
            features = {
                key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
                for key, value in (("image", image), ("label", label), ("image_id", image_id.encode()))
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    offsets = records.record_offsets(path)
    assert len(offsets) == num
    index = records.RecordIndex((path,), np.zeros(num, np.int32), offsets)
    spec = {key: tf.io.FixedLenFeature([], tf.string) for key in ("image", "label", "image_id")}

    def read(i):
        def parse(serialized):
            e = tf.io.parse_single_example(serialized, spec)
            return encoded.from_files(e["image"], e["label"], e["image_id"])

        return records.read_record(index, i).map(parse)

    return records.RandomAccessSplit(num, read)


def saved_state_bytes(source, directory):
    cfg = DataConfig(crop_size=(32, 32), scale_target=(48, 40), global_batch_size=4, seed=0)
    iterator = iter(build_dataset(cfg, True, source=source))
    for _ in range(50):
        next(iterator)
    tf.train.Checkpoint(iterator=iterator).write(os.path.join(directory, "ckpt"))
    return sum(
        os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.startswith("ckpt")
    )


@pytest.mark.parametrize("kind", ["memory", "records"])
def test_saved_input_state_does_not_grow_with_the_split(kind, tmp_path):
    sizes = {}
    for num in (2_000, NUM):
        directory = tmp_path / f"{kind}{num}"
        directory.mkdir()
        source = memory_source(num) if kind == "memory" else record_source(num, str(directory))
        sizes[num] = saved_state_bytes(source, str(directory))
    assert abs(sizes[NUM] - sizes[2_000]) < 1 << 20, sizes
    # Symbolic checkpoint: positions only, no buffered examples (a shuffle
    # buffer of 1,000 of these 40x48 examples saved ~7 MB).
    assert max(sizes.values()) < 64 << 10, sizes
