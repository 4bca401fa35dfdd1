"""Cityscapes builder: the whole label id -> train id table, folders and the official zips."""

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fcn_tf.config import DataConfig
from fcn_tf.data import cityscapes, classes, raw_examples, sources

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
_spec = importlib.util.spec_from_file_location("make_fixtures", TESTDATA / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

tfds.disable_progress_bar()

# cityscapesscripts/helpers/labels.py: label id -> train id (255 and -1 -> ignored).
OFFICIAL_TRAIN_IDS = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3,
    13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18, -1: 255,
}  # fmt: skip
OFFICIAL_TRAIN_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip


def _zip_fixture(target: Path) -> Path:
    """The official zips' layout: members leftImg8bit/... and gtFine/..., plus stray files."""
    target.mkdir(parents=True, exist_ok=True)
    for folder, archive in (
        ("leftImg8bit", "leftImg8bit_trainvaltest.zip"),
        ("gtFine", "gtFine_trainvaltest.zip"),
    ):
        with zipfile.ZipFile(target / archive, "w") as zf:
            zf.writestr("README", "Cityscapes\n")
            zf.writestr("license.txt", "license\n")
            for path in sorted((TESTDATA / "cityscapes" / folder).rglob("*")):
                zf.write(path, path.relative_to(TESTDATA / "cityscapes").as_posix())
    return target


def _examples(data_dir, split):
    config = DataConfig(dataset="cityscapes", data_dir=str(data_dir))
    return {ex["image_id"].decode(): ex for ex in tfds.as_numpy(sources.load_split(config, split))}


def _expected_train_ids(raw):
    lookup = {label_id % 256: train_id for label_id, train_id in OFFICIAL_TRAIN_IDS.items()}
    return np.vectorize(lookup.__getitem__)(raw).astype(np.uint8)


def test_table_has_every_official_label_and_train_id():
    encoded = {label_id: train_id for _, label_id, train_id in cityscapes.LABELS}
    assert encoded == OFFICIAL_TRAIN_IDS
    names = {train_id: name for name, _, train_id in cityscapes.LABELS if train_id != 255}
    assert [names[i] for i in range(19)] == OFFICIAL_TRAIN_NAMES == classes.class_names("cityscapes")


def test_lookup_table_matches_the_official_table_for_all_256_values():
    for raw in range(256):
        label_id = -1 if raw == 255 else raw
        expected = OFFICIAL_TRAIN_IDS.get(label_id, raw_examples.INVALID)
        assert cityscapes.LABEL_TABLE[raw] == expected, raw


@pytest.mark.parametrize("variant", ["folders", "zips"])
def test_end_to_end_pixels(variant, tmp_path):
    raw_dir = TESTDATA / "cityscapes" if variant == "folders" else _zip_fixture(tmp_path / "raw")
    result = sources.prepare("cityscapes", raw_dir, tmp_path / "out", allow_count_mismatch=True)
    assert result.num_examples == {"train": 3, "validation": 2}
    for split, folder in (("train", "train"), ("validation", "val")):
        examples = _examples(tmp_path / "out", split)
        assert list(examples) == [base for _, base in fixtures.CITYSCAPES[folder]]
        for city, base in fixtures.CITYSCAPES[folder]:
            ex = examples[base]
            raw = fixtures.raw_label("cityscapes", base)
            assert set(np.unique(raw)) == set(fixtures.CITYSCAPES_RAW_VALUES)  # every id is exercised
            np.testing.assert_array_equal(ex["label"], _expected_train_ids(raw))
            image_file = TESTDATA / "cityscapes" / "leftImg8bit" / folder / city / f"{base}_leftImg8bit.png"
            np.testing.assert_array_equal(ex["image"], tf.io.decode_png(image_file.read_bytes()).numpy())


def test_unreadable_zip_is_a_layout_error(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "leftImg8bit_trainvaltest.zip").write_bytes(b"not a zip")
    (tmp_path / "raw" / "gtFine").mkdir()
    with pytest.raises(
        raw_examples.DatasetLayoutError, match=r"leftImg8bit_trainvaltest\.zip: cannot open zip"
    ):
        sources.prepare("cityscapes", tmp_path / "raw", tmp_path / "out", allow_count_mismatch=True)


def test_palette_is_the_official_one():
    pal = classes.palette("cityscapes")
    assert pal.shape == (19, 3)
    assert (
        pal[0].tolist() == [128, 64, 128]
        and pal[13].tolist() == [0, 0, 142]
        and pal[18].tolist() == [119, 11, 32]
    )
