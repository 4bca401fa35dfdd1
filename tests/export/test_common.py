"""What every export shares: the inference model (BatchNorm folding), class info, requirements, runners."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.export import common, fixed_size, saved_model
from harness.tiny import tiny_segmenter
from tests.export.test_saved_model import tiny_config


def batchnorms(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def trained_looking(model):
    """Non-trivial BatchNorm statistics, so that folding changes the weights."""
    rng = np.random.default_rng(0)
    for layer in batchnorms(model):
        n = layer.gamma.shape[0]
        layer.set_weights(
            [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)]
        )
    return model


def test_both_export_modules_fold_batchnorm_through_the_inference_model():
    keras.utils.set_random_seed(0)
    model = trained_looking(tiny_segmenter(sync_bn=False))
    config = tiny_config()
    assert batchnorms(model) and not batchnorms(common.inference_model(model, fold_bn=True))
    plain = common.inference_model(model)
    assert batchnorms(plain) and plain.output.shape == model.output["logits"].shape
    images = np.random.default_rng(1).integers(0, 256, (1, 12, 16, 3)).astype(np.uint8)
    server = saved_model.SegmentationServer(config, model, fold_bn=True)
    module = fixed_size.FixedSizeModel(config, model, (12, 16), fold_bn=True)
    assert not batchnorms(server.model) and not batchnorms(module.model)
    unfolded = fixed_size.FixedSizeModel(config, model, (12, 16))
    expected = unfolded.serve(tf.constant(images))["logits"].numpy()
    actual = module.serve(tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert not np.array_equal(actual, expected)  # folded: other weights, other rounding


def test_class_info_validates_overrides():
    config = tiny_config()
    with pytest.raises(ValueError, match="3 class names"):
        common.class_info(config, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="palette"):
        common.class_info(config, palette=np.zeros((5, 4)))


def test_missing_requirements_names_what_is_missing(monkeypatch):
    assert common.missing_requirements(["saved_model"]) is None
    monkeypatch.setitem(common.REQUIREMENTS, "litert", [("no_such_package.interpreter", "no-such-package")])
    assert common.missing_requirements(["saved_model", "litert"]) == (
        "the saved_model/litert export needs no-such-package, which is not installed"
    )
    with pytest.raises(common.ExportError, match="unknown export format 'tflite'"):
        common.missing_requirements(["tflite"])


class Echo(common.Runner):
    path = "echo.bin"
    input_shape = (1, 2, 3, 3)
    input_dtype = np.dtype(np.uint8)

    def _run(self, images):
        return {"logits": images.astype(np.float32), "labels": images[..., 0].astype(np.int32)}


def test_a_runner_checks_its_fixed_input():
    runner = Echo()
    assert runner(np.zeros((1, 2, 3, 3), np.uint8))["labels"].shape == (1, 2, 3)
    with pytest.raises(
        ValueError, match=r"echo.bin takes uint8 \(1, 2, 3, 3\) images, got float32 \(1, 2, 3, 3\)"
    ):
        runner(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \(2, 2, 3, 3\)"):
        runner(np.zeros((2, 2, 3, 3), np.uint8))
