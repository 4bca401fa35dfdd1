"""Images stored as PNG strips: exact reassembly, window reads, the Cityscapes builder and pipeline path."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fcn_tf.config import DataConfig
from fcn_tf.data import build_dataset, cityscapes, sources, strips

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
_spec = importlib.util.spec_from_file_location("make_fixtures", TESTDATA / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

tfds.disable_progress_bar()

# The fixture images are 16 rows: strips of 5 rows give 5, 5, 5, 1.
STRIP = 5


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("height, strip_height, count", [(16, 5, 4), (16, 4, 4), (16, 16, 1), (7, 1, 7)])
def test_strips_reassemble_to_the_exact_pixels(height, strip_height, count):
    image = _image(height, 9)
    encoded = strips.encode_strips(image, strip_height)
    assert len(encoded) == count
    assert [tf.io.decode_png(s).shape[0] for s in encoded][:-1] == [strip_height] * (count - 1)
    np.testing.assert_array_equal(strips.decode_strips(tf.constant(encoded)), image)
    # The same inside tf.data (graph mode).
    ds = tf.data.Dataset.from_tensors(tf.constant(encoded)).map(strips.decode_strips)
    np.testing.assert_array_equal(next(iter(ds)), image)


def test_encode_strips_rejects_bad_input():
    with pytest.raises(ValueError, match="strip_height"):
        strips.encode_strips(_image(4, 4), 0)
    with pytest.raises(ValueError, match="uint8"):
        strips.encode_strips(np.zeros((4, 4, 3), np.float32), 2)


def test_read_window_equals_slicing_the_whole_image():
    image = _image(23, 11, seed=1)
    encoded = tf.constant(strips.encode_strips(image, STRIP))
    windows = [((0, 0), (23, 11)), ((5, 0), (5, 11)), ((4, 3), (2, 5)), ((22, 10), (1, 1)), ((9, 2), (13, 4))]
    rng = np.random.default_rng(2)
    for _ in range(30):
        top, left = rng.integers(0, 23), rng.integers(0, 11)
        windows.append(((top, left), (rng.integers(1, 24 - top), rng.integers(1, 12 - left))))
    read = tf.function(strips.read_window)
    for (top, left), (h, w) in windows:
        expected = image[top : top + h, left : left + w]
        start, size = tf.constant([top, left]), tf.constant([h, w])
        np.testing.assert_array_equal(strips.read_window(encoded, STRIP, start, size), expected)
        np.testing.assert_array_equal(read(encoded, tf.constant(STRIP), start, size), expected)


def test_read_window_decodes_only_the_strips_it_meets():
    image = _image(20, 6)
    encoded = strips.encode_strips(image, STRIP)
    # Strips 0 and 3 are not PNGs: a window that does not meet them must not decode them.
    broken = tf.constant([b"not a png", encoded[1], encoded[2], b"not a png"])
    window = strips.read_window(broken, STRIP, tf.constant([5, 1]), tf.constant([10, 4]))
    np.testing.assert_array_equal(window, image[5:15, 1:5])
    with pytest.raises(tf.errors.InvalidArgumentError):
        strips.read_window(broken, STRIP, tf.constant([4, 1]), tf.constant([2, 4]))


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """The Cityscapes fixture prepared with 5-row strips (the real height, 128, exceeds the 16-row images)."""
    monkeypatch.setattr(cityscapes.Cityscapes, "STRIP_HEIGHT", STRIP)
    sources.prepare("cityscapes", TESTDATA / "cityscapes", tmp_path / "out", allow_count_mismatch=True)
    sizes = dict(crop_size=(8, 16), scale_target=(64, 32), eval_target=(32, 16), ratio_range=(0.5, 2.0))
    return DataConfig(
        dataset="cityscapes", data_dir=str(tmp_path / "out"), global_batch_size=2, seed=5, **sizes
    )


def _original(folder, city, base):
    path = TESTDATA / "cityscapes" / "leftImg8bit" / folder / city / f"{base}_leftImg8bit.png"
    return path.read_bytes()


def test_builder_stores_train_in_strips_and_validation_whole(prepared):
    train = list(tfds.as_numpy(sources.encoded_split(prepared, "train")))
    assert [ex["image_id"].decode() for ex in train] == [b for _, b in fixtures.CITYSCAPES["train"]]
    for ex, (city, base) in zip(train, fixtures.CITYSCAPES["train"]):
        assert ex["strip_height"] == STRIP and len(ex["image_strips"]) == 4
        original = tf.io.decode_png(_original("train", city, base)).numpy()
        np.testing.assert_array_equal(strips.decode_strips(tf.constant(ex["image_strips"])), original)
    for ex, (city, base) in zip(
        tfds.as_numpy(sources.encoded_split(prepared, "validation")), fixtures.CITYSCAPES["val"]
    ):
        # Validation keeps the user's file, byte for byte.
        assert ex["strip_height"] == fixtures.CITYSCAPES_HEIGHT
        assert list(ex["image_strips"]) == [_original("val", city, base)]


def test_load_split_reassembles_the_exact_images(prepared):
    for split, folder in (("train", "train"), ("validation", "val")):
        examples = list(tfds.as_numpy(sources.load_split(prepared, split)))
        for ex, (city, base) in zip(examples, fixtures.CITYSCAPES[folder], strict=True):
            assert ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(
                ex["image"], tf.io.decode_png(_original(folder, city, base)).numpy()
            )


def test_training_batches_from_strips_equal_the_whole_image_path(prepared):
    # Default source: the strips, decoded only where each crop reads. Reference: the same
    # split decoded whole, cropped by the in-memory path. Same seeds: identical batches.
    from_strips = build_dataset(prepared, True)
    whole = build_dataset(prepared, True, source=sources.load_split(prepared, "train"))
    n = 0
    for (xa, ya), (xb, yb) in zip(from_strips.take(6), whole.take(6)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        n += 1
    assert n == 6


def test_eval_examples_from_the_strip_format(prepared):
    examples = list(build_dataset(prepared, False))
    assert len(examples) == 2
    assert examples[0]["image"].shape == (1, 16, 32, 3) and examples[0]["label"].shape == (1, 16, 32)


def test_old_format_asks_to_prepare_again(prepared, tmp_path):
    # A dataset written by the 1.0.0 builder (whole images) beside no 2.0.0 one.
    data_dir = Path(prepared.data_dir) / "cityscapes"
    (data_dir / str(cityscapes.Cityscapes.VERSION)).rename(data_dir / "1.0.0")
    info = json.loads((data_dir / "1.0.0" / "dataset_info.json").read_text())
    info["version"] = "1.0.0"
    (data_dir / "1.0.0" / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(
        sources.DatasetNotPreparedError, match=r"prepared in format 1\.0\.0.*prepare_data\.py"
    ):
        sources.load_split(prepared, "train")
