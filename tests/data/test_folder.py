"""The folder dataset: index and RGB annotations prepare to the same labels, the class info reaches the
experiment's config, and every bad input ends in one line naming the file with nothing written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import experiments
from fcn_tf.config import ConfigError, DataConfig
from fcn_tf.data import folder, folder_info, raw_examples, sources, synthetic

tfds.disable_progress_bar()
REPO = Path(__file__).resolve().parents[2]
NAMES = ("sea", "blob", "box", "wedge", "hoop")


def _write(root: Path, coloured: bool = False) -> Path:
    synthetic.write_dataset(root, num_train=3, num_val=2, height=16, width=20, layout="folder", coloured=coloured)
    # The user's own class names (same order and colours as the synthetic ones).
    lines = (root / "classes.txt").read_text().splitlines()
    renamed = [f"{name} {line.split(maxsplit=1)[1]}" if coloured else name for name, line in zip(NAMES, lines)]
    (root / "classes.txt").write_text("\n".join(renamed + lines[len(NAMES) :]) + "\n")
    return root


def _labels(data_dir: Path, name: str) -> dict:
    config = DataConfig(dataset="folder", name=name, data_dir=str(data_dir))
    return {
        split: [ex["label"].numpy() for ex in sources.load_split(config, split)] for split in ("train", "val")
    }


def _assert_nothing_written(out: Path):
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
    assert left == [], f"left behind: {left}"


def test_index_and_rgb_annotations_prepare_to_the_same_labels(tmp_path):
    out = tmp_path / "tfds"
    index = sources.prepare("folder", _write(tmp_path / "index"), out, name="shapes_index")
    rgb = sources.prepare("folder", _write(tmp_path / "rgb", coloured=True), out, name="shapes_rgb")
    assert index.num_examples == rgb.num_examples == {"train": 3, "val": 2}
    assert index.path == out / "shapes_index" / "1.0.0"
    a, b = _labels(out, "shapes_index"), _labels(out, "shapes_rgb")
    for split in a:
        for x, y in zip(a[split], b[split]):
            np.testing.assert_array_equal(x, y)
    assert any((x == 255).any() for x in a["train"])  # the ignore band, white in the RGB masks
    info = folder_info.read_class_info(str(out), "shapes_rgb")
    assert info["class_names"] == list(NAMES) and info["palette"][1] == [230, 25, 75]
    assert sum(info["pixels"]["val"]) == sum(int((x < 5).sum()) for x in a["val"])


def test_experiment_reads_classes_from_the_prepared_dataset(tmp_path):
    sources.prepare("folder", _write(tmp_path / "raw", coloured=True), tmp_path / "tfds", name="mine")
    overrides = [f"data.data_dir={tmp_path / 'tfds'}", "data.name=mine"]
    config = experiments.resolve("folder_r50_os16", overrides=overrides)
    assert config.model.num_classes == 5 and config.data.class_names == NAMES
    assert config.data.palette[3:6] == (230, 25, 75)
    assert config.data.eval_split == "val" and config.data.crop_size == (512, 512)
    assert sources.num_examples(config.data, "train") == 3
    with pytest.raises(ConfigError, match="pass --override=data.name=NAME"):
        experiments.resolve("folder_r50_os8")
    with pytest.raises(ConfigError, match="folder dataset 'other' is not prepared"):
        experiments.resolve("folder_r50_os8", overrides=[f"data.data_dir={tmp_path / 'tfds'}", "data.name=other"])


def _size_mismatch(root: Path):
    path = root / "annotations/train/train_00001.png"
    path.write_bytes(tf.io.encode_png(np.zeros((16, 21, 1), np.uint8)).numpy())
    return path, "label size 21x16 differs from image size 20x16"


def _index_too_large(root: Path):
    path = root / "annotations/val/val_00000.png"
    label = np.zeros((16, 20, 1), np.uint8)
    label[:2, :3] = 7
    path.write_bytes(tf.io.encode_png(label).numpy())
    return path, "class index 7 >= the 5 classes of classes.txt (6 pixels; 255 is ignore)"


def _no_annotation(root: Path):
    (root / "annotations/train/train_00002.png").unlink()
    return root / "images/train/train_00002.jpg", "image has no annotation"


def _no_image(root: Path):
    (root / "images/val/val_00001.jpg").unlink()
    return root / "annotations/val/val_00001.png", "annotation has no image in"


def _unknown_colour(root: Path):
    path = root / "annotations/train/train_00000.png"
    rgb = tf.io.decode_png(path.read_bytes(), channels=3).numpy()
    rgb[0, :4] = (1, 2, 3)
    path.write_bytes(tf.io.encode_png(rgb).numpy())
    return path, "colour (1, 2, 3) on 4 pixels not in classes.txt"


BAD = {
    "size mismatch": (False, _size_mismatch),
    "class index": (False, _index_too_large),
    "image without annotation": (False, _no_annotation),
    "annotation without image": (False, _no_image),
    "unknown colour": (True, _unknown_colour),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_file_and_writes_nothing(case, tmp_path):
    coloured, damage = BAD[case]
    root = _write(tmp_path / "raw", coloured=coloured)
    path, problem = damage(root)
    out = tmp_path / "tfds"
    with pytest.raises(raw_examples.BadExampleError) as info:
        sources.prepare("folder", root, out, name="mine")
    assert info.value.path == str(path) and problem in str(info.value)
    _assert_nothing_written(out)
    skipped = sources.prepare("folder", root, out, name="mine", skip_bad_examples=True)
    assert [e.path for e in skipped.skipped] == [str(path)]
    assert sum(skipped.num_examples.values()) == 4


@pytest.mark.parametrize(
    "text, problem",
    [
        ("only\n", "lists 1 class(es)"),
        ("a 1 2 3\nb\n", "give a colour (name R G B) on every class line or on none"),
        ("a\na\n", "class 'a' is listed twice"),
        ("a\nb\nignore 255 255 255\n", "'ignore R G B' lines need class colours"),
    ],
)
def test_bad_classes_file(text, problem, tmp_path):
    root = _write(tmp_path / "raw")
    (root / "classes.txt").write_text(text)
    with pytest.raises(raw_examples.DatasetLayoutError, match="classes.txt"):
        sources.prepare("folder", root, tmp_path / "tfds", name="mine")
    with pytest.raises(folder_info.ClassFileError, match=re.escape(problem)):
        folder_info.parse_classes(text, "classes.txt")
    _assert_nothing_written(tmp_path / "tfds")


def test_classes_file_names_with_spaces_and_ignore_colours():
    parsed = folder_info.parse_classes("# comment\nchest of drawers 1 2 3\nsky 4 5 6\nignore 0 0 0\n", "c")
    assert parsed.names == ("chest of drawers", "sky") and parsed.ignore_colours == ((0, 0, 0),)


def test_class_shares_name_the_classes_that_never_occur(tmp_path):
    sources.prepare("folder", _write(tmp_path / "raw"), tmp_path / "tfds", name="mine")
    info = folder_info.read_class_info(str(tmp_path / "tfds"), "mine")
    info["pixels"]["val"] = [10, 5, 0, 3, 2]
    lines = folder.class_shares(info, "val")
    assert [line.split() for line in lines[:5]][1] == ["1", "blob", "25.00%"]
    assert lines[-1] == "  never occur in val: box"


def test_prepare_script_bad_input_is_one_line(tmp_path):
    root = _write(tmp_path / "raw")
    path, problem = _index_too_large(root)
    bad = subprocess.run(
        [sys.executable, f"{REPO}/scripts/prepare_data.py", "--dataset=folder", f"--manual_dir={root}",
         "--name=mine", f"--data_dir={tmp_path / 'tfds'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: bad example {path}: {problem}") and "Traceback" not in bad.stderr
    _assert_nothing_written(tmp_path / "tfds")
