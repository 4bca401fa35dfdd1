"""predict: segment image files from an export or a checkpoint, write pictures, report bad files."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from fcn_tf import predict_lib, visualize
from fcn_tf.config import override
from fcn_tf.export import saved_model
from fcn_tf.models import build_fcn
from harness import runs

MAX_PIXELS = 64 * 64
REPO = runs.REPO
OVERRIDES = ("model.head_channels=16", "model.aux_channels=8", "data.eval_target=32,24")


def tiny_config():
    return override(experiments.get("synthetic_r18_os8"), *OVERRIDES)


def random_image(seed, height, width, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    config = tiny_config()
    keras.utils.set_random_seed(0)
    model = build_fcn(config.model, sync_bn=False)
    weights = str(root / "model.weights.h5")
    model.save_weights(weights)
    base = str(root / "export" / "fcn")
    saved_model.export(config, model, base, max_pixels=MAX_PIXELS)
    inputs = root / "inputs"
    inputs.mkdir()
    (inputs / "photo.jpg").write_bytes(tf.io.encode_jpeg(random_image(0, 40, 56)).numpy())
    (inputs / "gray.png").write_bytes(tf.io.encode_png(random_image(1, 30, 20, 1)).numpy())
    (inputs / "rgba.png").write_bytes(tf.io.encode_png(random_image(2, 16, 24, 4)).numpy())
    (inputs / "broken.jpg").write_bytes(b"not a jpeg at all")
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "huge.png").write_bytes(tf.io.encode_png(random_image(3, 80, 80)).numpy())
    (inputs / "notes.txt").write_text("not an image name: skipped")
    return dict(config=config, weights=weights, base=base, inputs=str(inputs))


GOOD = {"gray": (30, 20), "photo": (40, 56), "rgba": (16, 24)}
BAD = {"broken.jpg": "is not an image", "empty.png": r"is empty \(0 bytes\)", "huge.png": "max_pixels=4096"}


def decode_png(path):
    return tf.io.decode_png(tf.io.read_file(path), channels=3).numpy()


def test_predict_files_from_export(setup, tmp_path):
    predictor = predict_lib.Predictor.load(setup["base"])  # BASE/NAME: latest version
    assert predictor.class_names[0] == "background" and predictor.palette.shape == (5, 3)
    paths = predict_lib.list_images(setup["inputs"])
    assert [os.path.basename(p) for p in paths] == [
        "broken.jpg",
        "empty.png",
        "gray.png",
        "huge.png",
        "photo.jpg",
        "rgba.png",
    ]
    lines = []
    results = predict_lib.predict_files(predictor, paths, str(tmp_path / "out"), log=lines.append)
    assert len(lines) == len(paths)
    by_name = {os.path.basename(r.path): r for r in results}
    for name, pattern in BAD.items():
        assert by_name[name].outputs == []
        assert by_name[name].error is not None
        assert re.search(pattern, by_name[name].error), by_name[name].error
    for stem, size in GOOD.items():
        result = next(r for r in results if os.path.basename(r.path).startswith(stem + "."))
        assert result.error is None and result.size == size
        labels_png, overlay_png = result.outputs
        assert labels_png.endswith(f"{stem}_labels.png") and overlay_png.endswith(f"{stem}_overlay.png")
        contents = open(result.path, "rb").read()
        labels, _ = predictor.segment(contents)
        image = tf.io.decode_image(contents, channels=3, expand_animations=False).numpy()
        np.testing.assert_array_equal(decode_png(labels_png), visualize.colorize(labels, predictor.palette))
        np.testing.assert_array_equal(
            decode_png(overlay_png), visualize.overlay(image, labels, predictor.palette)
        )
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"{s}_{k}.png" for s in GOOD for k in ("labels", "overlay")
    )
    assert (
        predict_lib.summary(results) == "3 of 6 images segmented, 3 failed: broken.jpg, empty.png, huge.png"
    )


def test_checkpoint_and_export_agree(setup):
    from_export = predict_lib.Predictor.load(setup["base"])
    from_checkpoint = predict_lib.Predictor.from_checkpoint(setup["config"], setup["weights"], MAX_PIXELS)
    assert from_checkpoint.class_names == from_export.class_names
    np.testing.assert_array_equal(from_checkpoint.palette, from_export.palette)
    contents = open(os.path.join(setup["inputs"], "photo.jpg"), "rb").read()
    a, conf_a = from_export.segment(contents)
    b, conf_b = from_checkpoint.segment(contents)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(conf_a, conf_b, rtol=1e-5)


def test_error_reason_extracts_the_message():
    error = tf.errors.InvalidArgumentError(
        None,
        None,
        "Graph execution error:\n\nDetected at node map/while/Assert\n<stack traces unavailable>\n"
        "assertion failed: [images[0] is empty (0 bytes)]\n\t [[{{node map/while/Assert}}]]",
    )
    assert predict_lib.error_reason(error) == "images[0] is empty (0 bytes)"
    error = tf.errors.InvalidArgumentError(
        None,
        None,
        "Graph execution error:\n\nDetected at node x\nInvalid JPEG data, size 60\n\t [[{{node x}}]]",
    )
    assert predict_lib.error_reason(error) == "Invalid JPEG data, size 60"
    assert predict_lib.error_reason(OSError("no such file")) == "no such file"


def test_list_images_and_output_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        predict_lib.list_images(str(tmp_path / "missing"))
    (tmp_path / "a.jpg").write_bytes(b"")
    assert predict_lib.list_images(str(tmp_path / "a.jpg")) == [str(tmp_path / "a.jpg")]
    assert predict_lib._output_stems(["d/a.jpg", "d/a.png", "d/b.png"]) == ["a_jpg", "a_png", "b"]


def _predict_script(*flags):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "predict.py"), *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=runs.subprocess_env(TF_CPP_MIN_LOG_LEVEL="3"),  # this checkout's fcn_tf, not an installed one
    )


def test_predict_script_reports_bad_files_and_exit_code(setup, tmp_path):
    out = tmp_path / "out"
    run = _predict_script(f"--export_dir={setup['base']}/1", f"--input={setup['inputs']}", f"--output={out}")
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "3 of 6 images segmented, 3 failed: broken.jpg, empty.png, huge.png"
    assert any(
        line.startswith("FAILED") and "broken.jpg" in line and "not an image" in line for line in lines
    )
    assert len(os.listdir(out)) == 6


@pytest.mark.slow  # a fresh interpreter builds and restores the model: ~25-40 s
def test_predict_script_single_good_file_from_checkpoint(setup, tmp_path):
    out = tmp_path / "out"
    run = _predict_script(
        "--experiment=synthetic_r18_os8",
        f"--checkpoint={setup['weights']}",
        *(f"--override={o}" for o in OVERRIDES),
        f"--input={setup['inputs']}/photo.jpg",
        f"--output={out}",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "1 of 1 images segmented, 0 failed"
    assert sorted(os.listdir(out)) == ["photo_labels.png", "photo_overlay.png"]
