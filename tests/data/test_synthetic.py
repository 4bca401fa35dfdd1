"""Synthetic shapes: determinism, VOC layout, learnable content, preparation through the VOC reader."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fcn_tf.config import DataConfig
from fcn_tf.data import classes, encoded, png, raw_examples, sources, synthetic
from harness import runs

tfds.disable_progress_bar()

CONFIG = dict(num_train=6, num_val=3, height=40, width=56)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    synthetic.write_dataset(out, seed=3, **CONFIG)
    return out


def test_same_seed_same_bytes_other_seed_other_content(raw, tmp_path):
    synthetic.write_dataset(tmp_path / "again", seed=3, **CONFIG)
    synthetic.write_dataset(tmp_path / "other", seed=4, **CONFIG)
    assert _files(tmp_path / "again") == _files(raw)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(raw).keys()
    assert other != _files(raw)


def test_voc_layout(raw):
    voc = raw / "VOCdevkit" / "VOC2012"
    train = (voc / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 3 and not set(train) & set(val)
    for image_id in train + val:
        image = tf.io.decode_jpeg((voc / "JPEGImages" / f"{image_id}.jpg").read_bytes()).numpy()
        assert image.shape == (40, 56, 3)
        data = (voc / "SegmentationClass" / f"{image_id}.png").read_bytes()
        head = png.header(data)
        assert head["color_type"] == png.PALETTE and (head["width"], head["height"]) == (56, 40)
        label = raw_examples.decode_label_png(data, image_id)
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 255}


def test_content_has_every_class_and_a_thin_ignore_band():
    rng = np.random.default_rng(0)
    seen = set()
    ignored = []
    for _ in range(40):
        image, label = synthetic.generate_example(rng, 96, 128)
        assert image.dtype == np.uint8 and image.shape == (96, 128, 3)
        seen |= set(np.unique(label).tolist())
        ignored.append(np.mean(label == 255))
        # The band separates classes: no two different classes touch directly.
        valid = label != 255
        horizontal = valid[:, 1:] & valid[:, :-1]
        assert np.all(label[:, 1:][horizontal] == label[:, :-1][horizontal])
    assert seen == {0, 1, 2, 3, 4, 255}
    assert 0.005 < np.mean(ignored) < 0.15  # thin, like VOC's band


def test_each_shape_class_has_a_colour_tendency():
    # Colour is a cue (learnable in minutes) though not the whole answer.
    rng = np.random.default_rng(1)
    pixels = {k: [] for k in range(1, 5)}
    for _ in range(60):
        image, label = synthetic.generate_example(rng, 96, 128)
        for k in pixels:
            pixels[k].append(image[label == k].astype(np.float64))
    base = synthetic._CLASS_COLOURS[1:]
    for k, chunks in pixels.items():
        mean = np.concatenate(chunks).mean(axis=0)
        assert np.argmin(np.linalg.norm(base - mean, axis=1)) == k - 1, (k, mean)
    assert len(classes.class_names("synthetic")) == synthetic.NUM_CLASSES == 5
    assert len(np.unique(classes.palette("synthetic"), axis=0)) == 5


def test_prepares_through_the_voc_reader_and_load_split_contract(raw, tmp_path):
    result = sources.prepare("synthetic", raw, tmp_path / "tfds")
    assert result.path == tmp_path / "tfds" / "synthetic" / "1.0.0"
    assert result.num_examples == {"train": 6, "validation": 3}
    config = DataConfig(dataset="synthetic", data_dir=str(tmp_path / "tfds"))
    assert sources.num_examples(config, "validation") == 3
    ds = sources.load_split(config, "train")
    assert ds.element_spec["image"] == tf.TensorSpec((None, None, 3), tf.uint8)
    assert ds.element_spec["label"] == tf.TensorSpec((None, None), tf.uint8)
    assert ds.element_spec["image_id"] == tf.TensorSpec((), tf.string)
    voc = raw / "VOCdevkit" / "VOC2012"
    for ex in tfds.as_numpy(ds):
        image_id = ex["image_id"].decode()
        assert ex["image"].shape == (40, 56, 3) and ex["label"].shape == (40, 56)
        raw_label = raw_examples.decode_label_png(
            (voc / "SegmentationClass" / f"{image_id}.png").read_bytes(), ""
        )
        np.testing.assert_array_equal(ex["label"], raw_label)
        jpeg = (voc / "JPEGImages" / f"{image_id}.jpg").read_bytes()
        np.testing.assert_array_equal(ex["image"], tf.io.decode_jpeg(jpeg).numpy())


def test_unprepared_dataset_error_says_what_to_run(tmp_path):
    config = DataConfig(dataset="synthetic", data_dir=str(tmp_path / "nothing"))
    with pytest.raises(
        sources.DatasetNotPreparedError, match=r"make_synthetic\.py.*prepare_data\.py --dataset=synthetic"
    ):
        sources.load_split(config, "train")
    config = DataConfig(dataset="voc_aug", data_dir=str(tmp_path / "nothing"))
    with pytest.raises(
        sources.DatasetNotPreparedError, match=r"prepare_data\.py --dataset=voc_aug --manual_dir=RAW"
    ):
        sources.num_examples(config, "train")


def test_default_demo_size_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    synthetic.write_dataset(tmp_path, num_train=100, num_val=20)
    assert time.perf_counter() - start < 15  # 500 images take a few seconds


def test_encoded_split_keeps_the_original_image_bytes(raw, tmp_path):
    sources.prepare("synthetic", raw, tmp_path / "tfds")
    config = DataConfig(dataset="synthetic", data_dir=str(tmp_path / "tfds"))
    ds = sources.encoded_split(config, "validation")
    # The image stored whole: one strip, its original bytes.
    assert ds.element_spec["image_strips"] == tf.TensorSpec((1,), tf.string)
    assert ds.element_spec["label_png"] == tf.TensorSpec((), tf.string)
    example = next(iter(ds))
    ex = tfds.as_numpy(example)
    voc = raw / "VOCdevkit" / "VOC2012"
    image_id = ex["image_id"].decode()
    assert ex["image_strips"].tolist() == [(voc / "JPEGImages" / f"{image_id}.jpg").read_bytes()]
    raw_label = raw_examples.decode_label_png(
        (voc / "SegmentationClass" / f"{image_id}.png").read_bytes(), ""
    )
    np.testing.assert_array_equal(encoded.decode_label(example), raw_label)


def test_script_refuses_a_bad_size_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, f"{runs.REPO}/scripts/make_synthetic.py", f"--output_dir={tmp_path}", "--height=4"],
        capture_output=True,
        text=True,
        env=runs.subprocess_env(),
        timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: need num_train, num_val >= 1 and a size >= 8x8, got 400, 100, 4x128"
    )
    assert not any(tmp_path.iterdir())  # nothing written
