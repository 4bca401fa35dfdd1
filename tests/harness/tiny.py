"""Tiny models and datasets that follow the training contracts, for tests of the training code.

The model obeys the segmenter contract (dict with "logits" and "aux_logits"
at input resolution, BatchNorm synchronized across replicas) in a few
hundred parameters, so a train step takes milliseconds. It is made of the
segmenter's own layers (fcn_tf.models.layers: the convolution with its
hand-written gradients, the fused BatchNorm when not synchronized).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from fcn_tf.models.layers import BatchNorm, Conv2D

NUM_CLASSES = 3


def tiny_segmenter(num_classes: int = NUM_CLASSES, sync_bn: bool = True, bn: bool = True) -> keras.Model:
    inputs = keras.Input((None, None, 3))
    x = Conv2D(4, 3, padding="same", use_bias=not bn, name="conv")(inputs)
    if bn:
        x = BatchNorm(momentum=0.9, epsilon=1e-5, synchronized=sync_bn, name="bn")(x)
    x = keras.layers.ReLU()(x)
    logits = Conv2D(num_classes, 1, name="classifier")(x)
    aux = Conv2D(num_classes, 1, name="aux_classifier")(x)
    return keras.Model(inputs, {"logits": logits, "aux_logits": aux}, name="tiny")


def batch(
    seed: int, size: int = 4, hw: int = 8, num_classes: int = NUM_CLASSES, ignore_fraction: float = 0.2
):
    """A random (images, labels) batch with some ignored (255) pixels, unevenly spread."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(size, hw, hw, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(size, hw, hw)).astype(np.int32)
    # Uneven ignore fractions per image: a per-image mean would differ from the per-pixel mean.
    for i in range(size):
        mask = rng.random((hw, hw)) < ignore_fraction * (i + 1) / size * 2
        labels[i][mask] = 255
    return images, labels


def dataset_fn(global_batch: int = 4, hw: int = 8, seed: int = 0, num_examples: int = 64):
    """`input_context -> dataset`: an infinite, shuffled, sharded stream of random examples."""
    images, labels = batch(seed, num_examples, hw)

    def make(input_context: tf.distribute.InputContext | None = None):
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        per_replica = global_batch
        if input_context is not None:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
            per_replica = input_context.get_per_replica_batch_size(global_batch)
        return ds.repeat().shuffle(16, seed=seed).batch(per_replica, drop_remainder=True)

    return make


def eval_dataset_fn(hw: int = 8, count: int = 4, seed: int = 1):
    images, labels = batch(seed, count, hw)

    def make():
        return tf.data.Dataset.from_tensor_slices(
            {"image": images[:, None], "label": labels[:, None], "image_id": np.array([[b"x"]] * count)}
        )

    return make
