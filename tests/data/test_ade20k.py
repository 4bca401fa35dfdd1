"""ADE20k builder: counts, the 0 -> 255 / k -> k-1 shift, class table."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fcn_tf.config import DataConfig
from fcn_tf.data import ade20k, classes, raw_examples, sources

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
_spec = importlib.util.spec_from_file_location("make_fixtures", TESTDATA / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    sources.prepare("ade20k", TESTDATA / "ade20k", out, allow_count_mismatch=True)
    return out


def _examples(data_dir, split):
    config = DataConfig(dataset="ade20k", data_dir=str(data_dir))
    return {ex["image_id"].decode(): ex for ex in tfds.as_numpy(sources.load_split(config, split))}


def test_counts_and_ids(data_dir):
    config = DataConfig(dataset="ade20k", data_dir=str(data_dir))
    assert sources.num_examples(config, "train") == len(fixtures.ADE_TRAIN)
    assert sources.num_examples(config, "validation") == len(fixtures.ADE_VAL)
    assert list(_examples(data_dir, "train")) == fixtures.ADE_TRAIN
    assert list(_examples(data_dir, "validation")) == fixtures.ADE_VAL


def test_labels_are_shifted_zero_becomes_ignore(data_dir):
    for split, ids in (("train", fixtures.ADE_TRAIN), ("validation", fixtures.ADE_VAL)):
        examples = _examples(data_dir, split)
        for image_id in ids:
            raw = fixtures.raw_label("ade20k", image_id).astype(np.int64)
            expected = np.where(raw == 0, 255, raw - 1)
            got = examples[image_id]["label"]
            np.testing.assert_array_equal(got, expected)
            assert got.dtype == np.uint8 and got.shape == (fixtures.HEIGHT, fixtures.WIDTH)
            assert 255 in got and 149 in got  # raw 0 and raw 150 are in every fixture label


def test_lookup_table_entries():
    table = ade20k.LABEL_TABLE
    assert table[0] == 255
    assert all(table[k] == k - 1 for k in range(1, 151))
    assert all(table[k] == raw_examples.INVALID for k in range(151, 256))


def test_class_table_matches_the_reference():
    names = classes.class_names("ade20k")
    assert len(names) == 150 and names[0] == "wall" and names[7] == "bed" and names[149] == "flag"
    pal = classes.palette("ade20k")
    assert pal.shape == (150, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [120, 120, 120] and pal[149].tolist() == [92, 0, 255]


def test_missing_image_folder_is_a_layout_error(tmp_path):
    raw = tmp_path / "raw" / "ADEChallengeData2016" / "images" / "training"
    raw.mkdir(parents=True)
    with pytest.raises(raw_examples.DatasetLayoutError, match=r"images/validation"):
        sources.prepare("ade20k", tmp_path / "raw", tmp_path / "out", allow_count_mismatch=True)
