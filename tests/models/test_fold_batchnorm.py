"""BatchNorm folding: the folded copy computes the same logits, with no BatchNorm left."""

import keras
import numpy as np
import tensorflow as tf

from fcn_tf.export import logits_model, saved_model
from fcn_tf.models import build_fcn
from fcn_tf.models.fold_batchnorm import all_layers, conv_bn_pairs, fold_batchnorm
from tests.export.test_saved_model import (
    MAX_PIXELS,
    assert_logits_close,
    random_image,
    reference_logits,
    tiny_config,
)


def trained_looking(model, seed=0):
    """Non-trivial BatchNorm statistics, so that folding has something to fold."""
    rng = np.random.default_rng(seed)
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.normal(0, 0.1, n),
                    rng.normal(0, 0.1, n),
                    rng.uniform(0.5, 2, n),
                ]
            )
    return model


def test_fold_batchnorm_keeps_outputs():
    config = tiny_config()
    keras.utils.set_random_seed(1)
    model = trained_looking(build_fcn(config.model, sync_bn=False))
    plain = logits_model(model)
    folded = fold_batchnorm(plain)
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in all_layers(plain))
    assert n_bn == len(conv_bn_pairs(plain)) > 0
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in all_layers(folded))
    x = tf.random.stateless_normal([2, 40, 56, 3], seed=[1, 2])
    expected = plain(x, training=False).numpy()
    actual = folded(x, training=False).numpy()
    assert_logits_close(actual, expected)
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))
    # The serving graph takes the folded model as it is.
    server = saved_model.SegmentationServer(config, folded, max_pixels=MAX_PIXELS)
    image = random_image(14, 40, 56)
    out = server.predict_images_with_logits(tf.constant(image[np.newaxis]))
    assert_logits_close(out["logits"][0].numpy(), reference_logits(model, config, image))


def test_only_batchnorms_fed_by_a_conv_alone_are_folded():
    inputs = keras.Input((8, 8, 3))
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")(inputs)
    a = keras.layers.BatchNormalization(name="bn_shared")(shared)
    b = keras.layers.ReLU(name="relu")(shared)  # a second use: cannot fold into "shared"
    alone = keras.layers.Conv2D(4, 1, name="alone")(b)
    c = keras.layers.BatchNormalization(name="bn_alone")(alone)
    d = keras.layers.BatchNormalization(name="bn_after_add")(keras.layers.Add(name="add")([a, c]))
    model = trained_looking(keras.Model(inputs, d))
    assert {conv: bn.name for conv, bn in conv_bn_pairs(model).items()} == {"alone": "bn_alone"}
    folded = fold_batchnorm(model)
    x = tf.random.stateless_normal([2, 8, 8, 3], seed=[3, 4])
    assert_logits_close(folded(x, training=False).numpy(), model(x, training=False).numpy())
    kinds = {layer.name: type(layer).__name__ for layer in all_layers(folded)}
    assert kinds["bn_shared"] == kinds["bn_after_add"] == "BatchNormalization"
    assert kinds["bn_alone"] != "BatchNormalization"
