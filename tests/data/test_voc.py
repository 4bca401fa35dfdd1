"""VOC + SBD trainaug builder: the set rule, SBD .mat labels, palette PNGs, both train sources."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds

from fcn_tf.config import DataConfig
from fcn_tf.data import classes, png, raw_examples, sources, voc
from fcn_tf.data.tfds_builder import CountMismatchError

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
_spec = importlib.util.spec_from_file_location("make_fixtures", TESTDATA / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

tfds.disable_progress_bar()


def _examples(data_dir, split):
    config = DataConfig(dataset="voc_aug", data_dir=str(data_dir))
    return {ex["image_id"].decode(): ex for ex in tfds.as_numpy(sources.load_split(config, split))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    result = sources.prepare("voc_aug", TESTDATA / "voc", data_dir, allow_count_mismatch=True)
    return data_dir, result


def test_trainaug_rule_is_a_sorted_set_difference():
    ids = voc.trainaug_ids(
        voc_train=["b", "a"], sbd_train=["b", "c", "e"], sbd_val=["e", "f"], voc_val=["c", "d"]
    )
    assert ids == ["a", "b", "e", "f"]


def test_counts_and_ids_follow_the_trainaug_rule(prepared):
    data_dir, result = prepared
    assert result.path == data_dir / "voc_aug" / "1.0.0"
    assert result.num_examples == {"train": len(fixtures.TRAINAUG), "validation": len(fixtures.VOC_VAL)}
    assert result.skipped == []
    config = DataConfig(dataset="voc_aug", data_dir=str(data_dir))
    assert sources.num_examples(config, "train") == 5
    assert sources.num_examples(config, "validation") == 2
    assert list(_examples(data_dir, "train")) == fixtures.TRAINAUG  # sorted, VOC val id excluded
    assert list(_examples(data_dir, "validation")) == fixtures.VOC_VAL


def test_labels_come_from_voc_png_or_sbd_mat(prepared):
    data_dir, _ = prepared
    for image_id, ex in _examples(data_dir, "train").items():
        source = "voc" if image_id in fixtures.VOC_TRAIN else "sbd"
        np.testing.assert_array_equal(ex["label"], fixtures.raw_label(source, image_id), err_msg=image_id)
    for image_id, ex in _examples(data_dir, "validation").items():
        np.testing.assert_array_equal(ex["label"], fixtures.raw_label("voc", image_id))
        assert 255 in ex["label"]  # VOC's boundary band survives as ignore


def test_images_keep_their_original_jpeg_bytes(prepared):
    data_dir, _ = prepared
    for image_id, ex in _examples(data_dir, "train").items():
        where = (
            "benchmark_RELEASE/dataset/img"
            if image_id == fixtures.SBD_ONLY_IMAGE
            else "VOCdevkit/VOC2012/JPEGImages"
        )
        data = (TESTDATA / "voc" / where / f"{image_id}.jpg").read_bytes()
        np.testing.assert_array_equal(ex["image"], tf.io.decode_jpeg(data).numpy())
        assert ex["image"].shape == (fixtures.HEIGHT, fixtures.WIDTH, 3)


def test_read_sbd_mat_reads_gtcls_segmentation(tmp_path):
    label = fixtures.raw_label("sbd", "x")
    fixtures.write_sbd_mat(tmp_path / "x.mat", label)
    got = voc.read_sbd_mat(str(tmp_path / "x.mat"))
    np.testing.assert_array_equal(got, label)
    scipy.io.savemat(str(tmp_path / "other.mat"), {"GTinst": {"Segmentation": label}})
    with pytest.raises(raw_examples.BadExampleError, match=r"other\.mat.*GTcls"):
        voc.read_sbd_mat(str(tmp_path / "other.mat"))


def test_palette_png_is_a_real_palette_png_and_reads_back_to_indices():
    indices = fixtures.raw_label("voc", "2008_000001")
    colours = classes.voc_colormap(256)
    data = png.encode_palette_png(indices, colours)
    assert png.header(data)["color_type"] == png.PALETTE
    # Any decoder applies the palette: TensorFlow gives the VOC colours.
    np.testing.assert_array_equal(tf.io.decode_png(data, channels=3).numpy(), colours[indices])
    np.testing.assert_array_equal(raw_examples.decode_label_png(data, "x.png"), indices)


def test_voc_colormap_matches_the_devkit():
    cmap = classes.voc_colormap(256)
    assert cmap[0].tolist() == [0, 0, 0]
    assert cmap[1].tolist() == [128, 0, 0]
    assert cmap[15].tolist() == [192, 128, 128]  # person
    assert cmap[255].tolist() == [224, 224, 192]  # the boundary colour
    assert len(np.unique(cmap, axis=0)) == 256
    assert classes.palette("voc_aug").shape == (21, 3) and len(classes.class_names("voc_aug")) == 21


def test_merged_segmentation_class_aug_variant(tmp_path):
    result = sources.prepare("voc_aug", TESTDATA / "voc_merged", tmp_path, allow_count_mismatch=True)
    assert result.num_examples == {"train": 5, "validation": 2}
    train = _examples(tmp_path, "train")
    assert list(train) == fixtures.TRAINAUG
    for image_id, ex in train.items():
        np.testing.assert_array_equal(ex["label"], fixtures.raw_label("voc", image_id))


def test_merged_trainaug_listing_a_val_id_is_rejected(tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(TESTDATA / "voc_merged", raw)
    lists = raw / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (lists / "trainaug.txt").write_text("\n".join(fixtures.TRAINAUG + fixtures.VOC_VAL[:1]))
    with pytest.raises(raw_examples.DatasetLayoutError, match=r"trainaug\.txt.*validation ids"):
        sources.prepare("voc_aug", raw, tmp_path / "out", allow_count_mismatch=True)


def test_count_mismatch_is_an_error_without_the_flag(tmp_path):
    with pytest.raises(
        CountMismatchError, match=r"'train' has 5 examples.*expected 10,582.*allow_count_mismatch"
    ):
        sources.prepare("voc_aug", TESTDATA / "voc", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing left behind


def test_missing_layout_names_the_expected_folders(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "README").write_text("not VOC")
    with pytest.raises(raw_examples.DatasetLayoutError, match=r"VOCdevkit/VOC2012"):
        sources.prepare("voc_aug", tmp_path / "raw", tmp_path / "out")


@pytest.mark.parametrize("name", ["voc", "voc_merged", "ade20k", "cityscapes"])
def test_fixtures_are_what_make_fixtures_writes(name, tmp_path):
    # Fixtures change only through tests/testdata/make_fixtures.py.
    fixtures.MAKERS[name](tmp_path)

    def files(root):
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    assert files(tmp_path) == files(TESTDATA / name)
