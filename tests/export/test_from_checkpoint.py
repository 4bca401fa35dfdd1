"""A checkpoint to its exports in one call: checks before any work, then every format from one model."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.export import ExportError, common, export_checkpoint, load_runner
from fcn_tf.models import build_fcn
from tests.export.test_saved_model import NAME, assert_logits_close, random_image, tiny_config


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = build_fcn(tiny_config().model, sync_bn=False)
    path = str(tmp_path_factory.mktemp("weights") / "model.weights.h5")
    model.save_weights(path)
    return path


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(formats=["saved_model", "tflite"]), ExportError, "unknown export format 'tflite'"),
        (
            dict(formats=["litert"], litert_variants=["int4"]),
            ExportError,
            r"unknown export variant \('litert', 'int4'\)",
        ),
        (dict(version=1), FileExistsError, "export version already exists, not overwriting: .*/1"),
        (
            dict(formats=["onnx"]),
            FileExistsError,
            "export file already exists, not overwriting: .*model.onnx",
        ),
    ],
)
def test_bad_requests_fail_before_the_model_is_built(tmp_path, kwargs, error, message):
    export_dir = tmp_path / NAME
    (export_dir / "1").mkdir(parents=True)
    (export_dir / "model.onnx").write_bytes(b"")
    # The checkpoint is never read: every check comes first.
    with pytest.raises(error, match=message):
        export_checkpoint(tiny_config(), str(tmp_path / "no-such-checkpoint"), str(export_dir), **kwargs)
    assert sorted(os.listdir(export_dir)) == ["1", "model.onnx"]


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint prefix, workdir or .weights.h5 file"):
        export_checkpoint(tiny_config(), str(tmp_path / "no-such-checkpoint"), str(tmp_path / NAME))
    assert not (tmp_path / NAME).exists()


def test_every_format_from_one_folded_model(weights, tmp_path):
    config = tiny_config()
    lines = []
    written = export_checkpoint(
        config,
        weights,
        str(tmp_path / NAME),
        formats=["saved_model", "onnx"],
        fold_bn=True,
        size=(24, 32),
        log=lines.append,
    )
    version, onnx_file = written
    assert version == str(tmp_path / NAME / "1") and onnx_file == str(tmp_path / NAME / "model.onnx")
    exported = [line for line in lines if line.startswith("exported")]
    assert exported == [f"exported {config.name} ({weights}) to {path}" for path in written]
    assert common.read_config(version) == common.read_config(str(tmp_path / NAME)) == config

    model = build_fcn(config.model, sync_bn=False)
    model.load_weights(weights)
    image = random_image(30, 24, 32)  # at the eval target: the SavedModel does not resize it
    x = (image[np.newaxis].astype(np.float32) - np.array(config.data.mean, np.float32)) / np.array(
        config.data.std, np.float32
    )
    expected = model(x, training=False)["logits"].numpy()
    served = tf.saved_model.load(version).signatures["predict_images_with_logits"](images=image[np.newaxis])
    assert_logits_close(served["logits"].numpy(), expected)
    assert_logits_close(load_runner(onnx_file)(image[np.newaxis])["logits"], expected)
