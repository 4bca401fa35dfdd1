"""Bad raw input: preparation stops naming the file, or skips and counts; never a half-written dataset."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fcn_tf.config import DataConfig
from fcn_tf.data import classes, png, raw_examples, sources

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
REPO = TESTDATA.parents[1]
_spec = importlib.util.spec_from_file_location("make_fixtures", TESTDATA / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

tfds.disable_progress_bar()

VOC = "VOCdevkit/VOC2012"
# Examples of the VOC fixture used below: a VOC-labelled train id, an
# SBD-labelled train id, and a val id.
VOC_ID, SBD_ID, VAL_ID = "2008_000001", "2008_000005", "2008_000003"


@pytest.fixture
def voc_raw(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(TESTDATA / "voc", raw)
    return raw


def _prepare(dataset, raw, out, **kwargs):
    return sources.prepare(dataset, raw, out, allow_count_mismatch=True, **kwargs)


def _assert_nothing_written(out: Path):
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
    assert left == [], f"left behind: {left}"


def _palette_png(label):
    return png.encode_palette_png(np.asarray(label, np.uint8), classes.voc_colormap(256))


def _corrupt(path: Path):
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not image data")


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_size(path: Path):
    path.write_bytes(_palette_png(np.zeros((fixtures.HEIGHT, fixtures.WIDTH + 1))))


def _value_21(path: Path):
    label = fixtures.raw_label("voc", path.stem)
    label[0, 0] = 21
    path.write_bytes(_palette_png(label))


def _sbd_value_21(path: Path):
    label = fixtures.raw_label("sbd", path.stem)
    label[3, 3] = 21
    fixtures.write_sbd_mat(path, label)


BAD_VOC_INPUTS = {
    "corrupt image": (f"{VOC}/JPEGImages/{VOC_ID}.jpg", _corrupt, "corrupt or truncated image"),
    "truncated image": (f"{VOC}/JPEGImages/{VAL_ID}.jpg", _truncate, "corrupt or truncated image"),
    "label size": (f"{VOC}/SegmentationClass/{VOC_ID}.png", _wrong_size, "label size 33x24 differs from image size 32x24"),
    "voc label value": (f"{VOC}/SegmentationClass/{VAL_ID}.png", _value_21, "label values not defined for this dataset: 21"),
    "sbd label value": (f"benchmark_RELEASE/dataset/cls/{SBD_ID}.mat", _sbd_value_21, "not defined for this dataset: 21"),
    "missing image": (f"{VOC}/JPEGImages/{SBD_ID}.jpg", Path.unlink, "file is missing"),
    "missing png label": (f"{VOC}/SegmentationClass/{VAL_ID}.png", Path.unlink, "file is missing"),
    "missing mat label": (f"benchmark_RELEASE/dataset/cls/{SBD_ID}.mat", Path.unlink, "file is missing"),
    "corrupt mat label": (f"benchmark_RELEASE/dataset/cls/{SBD_ID}.mat", _corrupt, "cannot read .mat file"),
    "corrupt png label": (f"{VOC}/SegmentationClass/{VOC_ID}.png", _truncate, "label"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_VOC_INPUTS))
def test_bad_example_stops_with_the_file_named(case, voc_raw, tmp_path):
    relative, damage, problem = BAD_VOC_INPUTS[case]
    damage(voc_raw / relative)
    with pytest.raises(raw_examples.BadExampleError) as info:
        _prepare("voc_aug", voc_raw, tmp_path / "out")
    assert info.value.path == str(voc_raw / relative)
    assert problem in str(info.value)
    _assert_nothing_written(tmp_path / "out")


def test_ade20k_label_above_150_is_bad(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(TESTDATA / "ade20k", raw)
    bad = raw / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    label = fixtures.raw_label("ade20k", bad.stem)
    label[0, :2] = [151, 200]
    bad.write_bytes(fixtures._png(label))
    with pytest.raises(
        raw_examples.BadExampleError, match=r"ADE_val_00000002\.png: label values not defined.*151, 200"
    ):
        _prepare("ade20k", raw, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_cityscapes_unknown_label_id_is_bad(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(TESTDATA / "cityscapes", raw)
    bad = raw / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    label = fixtures.raw_label("cityscapes", "bochum_000000_000313")
    label[2, 2] = 34
    bad.write_bytes(fixtures._png(label))
    with pytest.raises(
        raw_examples.BadExampleError, match=r"bochum_000000_000313_gtFine_labelIds\.png: .*: 34$"
    ):
        _prepare("cityscapes", raw, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_colour_label_png_is_rejected(voc_raw, tmp_path):
    path = voc_raw / VOC / "SegmentationClass" / f"{VOC_ID}.png"
    rgb = classes.voc_colormap(256)[fixtures.raw_label("voc", VOC_ID)]
    path.write_bytes(fixtures._png(rgb))  # RGB, the way some tools save VOC labels
    with pytest.raises(
        raw_examples.BadExampleError, match=r"colour type 2.*expected 8-bit palette or grayscale"
    ):
        _prepare("voc_aug", voc_raw, tmp_path / "out")


@pytest.mark.parametrize(
    "split_file", [f"{VOC}/ImageSets/Segmentation/val.txt", "benchmark_RELEASE/dataset/train.txt"]
)
def test_empty_split_list_is_an_error(split_file, voc_raw, tmp_path):
    (voc_raw / split_file).write_text("\n\n")
    with pytest.raises(raw_examples.DatasetLayoutError, match=rf"{split_file}: split list is empty"):
        _prepare("voc_aug", voc_raw, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_empty_image_folder_is_an_error(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(TESTDATA / "ade20k", raw)
    for image in (raw / "ADEChallengeData2016/images/validation").iterdir():
        image.unlink()
    with pytest.raises(
        raw_examples.DatasetLayoutError, match=r"images/validation/\*\.jpg: split 'validation' is empty"
    ):
        _prepare("ade20k", raw, tmp_path / "out")


def test_skip_flag_skips_and_counts(voc_raw, tmp_path):
    _corrupt(voc_raw / VOC / "JPEGImages" / f"{VOC_ID}.jpg")
    (voc_raw / "benchmark_RELEASE/dataset/cls" / f"{SBD_ID}.mat").unlink()
    result = _prepare("voc_aug", voc_raw, tmp_path / "out", skip_bad_examples=True)
    assert result.num_examples == {"train": 3, "validation": 2}
    assert sorted(e.path for e in result.skipped) == sorted(
        [
            str(voc_raw / VOC / "JPEGImages" / f"{VOC_ID}.jpg"),
            str(voc_raw / "benchmark_RELEASE/dataset/cls" / f"{SBD_ID}.mat"),
        ]
    )
    config = DataConfig(dataset="voc_aug", data_dir=str(tmp_path / "out"))
    ids = [ex["image_id"].decode() for ex in tfds.as_numpy(sources.load_split(config, "train"))]
    assert ids == [i for i in fixtures.TRAINAUG if i not in (VOC_ID, SBD_ID)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["voc_aug"]  # no temporary folder left


def test_a_split_emptied_by_skipping_is_an_error(voc_raw, tmp_path):
    for image_id in fixtures.VOC_VAL:
        _corrupt(voc_raw / VOC / "JPEGImages" / f"{image_id}.jpg")
    with pytest.raises(raw_examples.DatasetLayoutError, match=r"'validation' left empty after skipping 2"):
        _prepare("voc_aug", voc_raw, tmp_path / "out", skip_bad_examples=True)
    _assert_nothing_written(tmp_path / "out")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_failure_leaves_an_existing_dataset_untouched_and_success_replaces_it(voc_raw, tmp_path):
    out = tmp_path / "out"
    good = _prepare("voc_aug", voc_raw, out)
    before = _snapshot(out)
    _corrupt(voc_raw / VOC / "JPEGImages" / f"{VAL_ID}.jpg")
    with pytest.raises(raw_examples.BadExampleError):
        _prepare("voc_aug", voc_raw, out)
    assert _snapshot(out) == before
    config = DataConfig(dataset="voc_aug", data_dir=str(out))
    assert sources.num_examples(config, "validation") == 2
    # With skipping the rebuild succeeds and replaces the old dataset in place.
    result = _prepare("voc_aug", voc_raw, out, skip_bad_examples=True)
    assert result.path == good.path
    assert sources.num_examples(config, "validation") == 1
    assert sorted(p.name for p in out.iterdir()) == ["voc_aug"]


def _run_script(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_data.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def _script_args(raw, out):
    return ["--dataset=voc_aug", f"--manual_dir={raw}", f"--data_dir={out}", "--allow_count_mismatch"]


def test_script_stops_on_bad_input_naming_the_file(voc_raw, tmp_path):
    bad = voc_raw / VOC / "JPEGImages" / f"{VOC_ID}.jpg"
    _corrupt(bad)
    failed = _run_script(*_script_args(voc_raw, tmp_path / "out"))
    assert failed.returncode != 0
    assert f"error: bad example {bad}: corrupt or truncated image" in failed.stderr
    # One line says it all: what, where, and that nothing was written.
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: bad example {bad}") and last.endswith("skips and counts them)"), last
    _assert_nothing_written(tmp_path / "out")


def test_script_skips_and_lists_bad_examples_with_the_flag(voc_raw, tmp_path):
    bad = voc_raw / VOC / "JPEGImages" / f"{VOC_ID}.jpg"
    _corrupt(bad)
    skipped = _run_script(*_script_args(voc_raw, tmp_path / "out"), "--skip_bad_examples")
    assert skipped.returncode == 0, skipped.stderr
    assert (
        f"Prepared voc_aug in {tmp_path / 'out' / 'voc_aug' / '1.0.0'} (train: 4, validation: 2)"
        in skipped.stdout
    )
    assert f"Skipped 1 bad example(s):\n  {bad}: corrupt" in skipped.stdout
