"""Tests of build_dataset on in-memory sources: shapes, determinism, resume, sharding, eval."""

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.config import DataConfig
from fcn_tf.data import augment, build_dataset, encoded

IGNORE = 255
NUM = 10


def config(**kw):
    values = dict(
        crop_size=(32, 40),
        scale_target=(64, 32),
        ratio_range=(0.5, 2.0),
        global_batch_size=4,
        eval_target=(64, 32),
        seed=3,
    )
    values.update(kw)
    return DataConfig(**values)


def make_source(num=NUM, identity_labels=False):
    """Examples of varying sizes; with `identity_labels` example k's label is all k."""
    images, labels, ids = [], [], []
    rs = np.random.RandomState(0)
    for k in range(num):
        h, w = 30 + 3 * k, 50 - 2 * k
        images.append(rs.randint(0, 256, (h, w, 3)).astype(np.uint8))
        if identity_labels:
            label = np.full((h, w), k, np.uint8)
        else:
            label = np.kron(rs.randint(0, 5, (h // 6 + 1, w // 6 + 1)), np.ones((6, 6), int))[:h, :w].astype(
                np.uint8
            )
            label[rs.uniform(size=(h, w)) < 0.05] = IGNORE
        labels.append(label)
        ids.append(f"img{k}")

    # Concatenated from_tensors, not from_generator: iterators over it can be
    # checkpointed.
    ds = tf.data.Dataset.from_tensors({"image": images[0], "label": labels[0], "image_id": ids[0]})
    for image, label, image_id in zip(images[1:], labels[1:], ids[1:]):
        ds = ds.concatenate(
            tf.data.Dataset.from_tensors({"image": image, "label": label, "image_id": image_id})
        )
    return ds, images, labels


def take(ds, n):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_train_batches_shapes_and_labels():
    source, _, _ = make_source()
    for images, labels in take(build_dataset(config(), True, source=source), 4):
        assert images.shape == (4, 32, 40, 3) and images.dtype == np.float32
        assert labels.shape == (4, 32, 40) and labels.dtype == np.int32
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 4, IGNORE}
    # Infinite: more batches than one epoch of 10 examples holds.
    assert len(take(build_dataset(config(), True, source=source), 6)) == 6


def test_same_seed_same_batches_different_seed_different():
    source, _, _ = make_source()
    a = take(build_dataset(config(), True, source=source), 5)
    b = take(build_dataset(config(), True, source=source), 5)
    c = take(build_dataset(config(seed=4), True, source=source), 5)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0][0], c[0][0])


def test_epochs_are_augmented_differently():
    # Each stream position has its own seed, so epoch 2 is not a copy of
    # epoch 1 even where it reads the examples in the same order (a
    # one-example source).
    source, _, _ = make_source(num=1)
    batches = take(build_dataset(config(), True, source=source), 2)
    assert not np.array_equal(batches[0][0], batches[1][0])


def test_iterator_checkpoint_restores_the_stream(tmp_path):
    source, _, _ = make_source()
    cfg = config()
    reference = take(build_dataset(cfg, True, source=source), 7)

    iterator = iter(build_dataset(cfg, True, source=source))
    for _ in range(3):
        next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
    after = [tuple(t.numpy() for t in next(iterator)) for _ in range(4)]
    assert_same_batches(after, reference[3:])

    fresh = iter(build_dataset(cfg, True, source=source))
    tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
    restored = [tuple(t.numpy() for t in next(fresh)) for _ in range(4)]
    assert_same_batches(restored, reference[3:])


def test_sharding_by_input_context_is_disjoint_with_per_replica_batch():
    source, _, _ = make_source(identity_labels=True)
    cfg = config(photometric=False)
    seen = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        ds = build_dataset(cfg, True, input_context=context, source=source)
        assert (
            ds.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.OFF
        )
        ids = set()
        for images, labels in take(ds, 6):
            assert images.shape == (2, 32, 40, 3) and labels.shape == (2, 32, 40)
            for label in labels:
                values = set(np.unique(label).tolist()) - {IGNORE}
                assert len(values) == 1  # one source example per crop
                ids |= values
        seen.append(ids)
    assert seen[0] == {0, 2, 4, 6, 8} and seen[1] == {1, 3, 5, 7, 9}


def test_shards_use_different_augmentation_seeds():
    # Two identical examples, one per pipeline: the pipeline id enters the
    # per-example seeds, so the two streams still differ.
    source, _, _ = make_source(num=1)
    out = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        out.append(
            take(build_dataset(config(), True, input_context=context, source=source.repeat(2)), 1)[0][0]
        )
    assert not np.array_equal(out[0], out[1])


def test_eval_mode_sizes_labels_and_ids():
    source, images, labels = make_source()
    cfg = config()
    examples = list(build_dataset(cfg, False, source=source))
    assert len(examples) == NUM  # one pass
    for k, ex in enumerate(examples):
        h, w = labels[k].shape
        eh, ew = augment.keep_ratio_size(h, w, cfg.eval_target)
        assert ex["image"].shape == (1, int(eh), int(ew), 3) and ex["image"].dtype == tf.float32
        assert ex["label"].dtype == tf.int32
        np.testing.assert_array_equal(ex["label"][0], labels[k])  # untouched
        assert ex["image_id"].numpy().tolist() == [f"img{k}".encode()]


def test_eval_mode_size_voc_and_cityscapes():
    voc = {
        "image": np.zeros((375, 500, 3), np.uint8),
        "label": np.zeros((375, 500), np.uint8),
        "image_id": "a",
    }
    ex = next(iter(build_dataset(DataConfig(), False, source=tf.data.Dataset.from_tensors(voc))))
    assert ex["image"].shape == (1, 512, 683, 3) and ex["label"].shape == (1, 375, 500)
    city = {
        "image": np.zeros((256, 512, 3), np.uint8),
        "label": np.zeros((256, 512), np.uint8),
        "image_id": "b",
    }
    cfg = DataConfig(eval_target=(1024, 512))
    ex = next(iter(build_dataset(cfg, False, source=tf.data.Dataset.from_tensors(city))))
    assert ex["image"].shape == (1, 512, 1024, 3) and ex["label"].shape == (1, 256, 512)


@pytest.mark.parametrize("training", [True, False])
def test_encoded_bytes_source_matches_decoded_source(training):
    source, images, labels = make_source(num=4)
    files = tf.data.Dataset.from_tensor_slices(
        encoded.from_files(
            [tf.io.encode_png(i).numpy() for i in images],
            [tf.io.encode_png(label[..., None]).numpy() for label in labels],
            [f"img{k}" for k in range(4)],
        )
    )
    a = build_dataset(config(), training, source=source)
    b = build_dataset(config(), training, source=files)
    if training:
        assert_same_batches(take(a, 3), take(b, 3))
    else:
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])


def test_jpeg_window_decoding_matches_full_decoding():
    # JPEG sources are decoded only where the crop reads
    # (decode_and_crop_jpeg): the batches must equal those of the fully
    # decoded images.
    _, images, labels = make_source(num=4)
    jpegs = [tf.io.encode_jpeg(i, quality=90).numpy() for i in images]
    full = tf.data.Dataset.from_tensors({"image": tf.io.decode_jpeg(jpegs[0]), "label": labels[0]})
    for j, label in zip(jpegs[1:], labels[1:]):
        full = full.concatenate(tf.data.Dataset.from_tensors({"image": tf.io.decode_jpeg(j), "label": label}))
    files = tf.data.Dataset.from_tensor_slices(
        encoded.from_files(jpegs, [tf.io.encode_png(label[..., None]).numpy() for label in labels])
    )
    cfg = config(scale_target=(160, 100))  # upscaling: windows are parts of the images
    assert_same_batches(
        take(build_dataset(cfg, True, source=full), 4), take(build_dataset(cfg, True, source=files), 4)
    )


def test_benchmark_files_run_through_the_pipeline(tmp_path):
    # The input benchmark's synthetic files and file source, at a tiny size.
    import dataclasses

    from benchmarks import input as input_bench

    kind = dataclasses.replace(input_bench.KINDS["voc"], size=(40, 60), files=3)
    pairs = input_bench.write_synthetic(tmp_path, kind)
    assert len(pairs) == 3 and all(p.endswith(".jpg") for p, _ in pairs)
    for images, labels in take(build_dataset(config(), True, source=input_bench.file_source(pairs)), 2):
        assert images.shape == (4, 32, 40, 3) and labels.shape == (4, 32, 40)
        assert set(np.unique(labels).tolist()) <= set(range(21)) | {IGNORE}
    if input_bench.reference_available():
        image, label = input_bench.ReferencePipeline(config())(*pairs[0])
        assert image.shape == (32, 40, 3) and image.dtype == np.float32 and label.shape == (32, 40)


def test_benchmark_cityscapes_files_are_prepared_and_read_from_strips(tmp_path):
    # The Cityscapes side of the input benchmark reads what prepare_data.py writes.
    import dataclasses

    from benchmarks import input as input_bench
    from fcn_tf.data import sources

    kind = dataclasses.replace(input_bench.KINDS["cityscapes"], size=(300, 60), files=2)
    pairs = input_bench.write_synthetic(tmp_path / "files", kind)
    data_dir = input_bench.prepare_cityscapes(pairs, tmp_path / "prepared")
    cfg = dataclasses.replace(config(), dataset="cityscapes", data_dir=data_dir)
    for (image_path, label_path), ex in zip(pairs, sources.load_split(cfg, "train"), strict=True):
        # 300 rows: 3 strips of 128 rows; the exact pixels and train ids come back.
        np.testing.assert_array_equal(ex["image"], tf.io.decode_png(tf.io.read_file(image_path)))
        np.testing.assert_array_equal(ex["label"], tf.io.decode_png(tf.io.read_file(label_path))[..., 0])
    assert [len(ex["image_strips"]) for ex in sources.encoded_split(cfg, "train")] == [3, 3]
    for images, labels in take(build_dataset(cfg, True), 2):
        assert images.shape == (4, 32, 40, 3) and labels.shape == (4, 32, 40)
