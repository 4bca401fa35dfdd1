"""Tiny models and datasets following the training contracts, for the training tests.

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


# --------------------------------------------------------------------------- end-to-end helpers

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))

# A seconds-sized variant of synthetic_r18_os8 for subprocess tests of scripts/train.py.
TINY_OVERRIDES = (
    "model.backbone_depth=18",
    "model.head_channels=32",
    "model.aux_channels=16",
    "data.crop_size=32,32",
    "data.scale_target=48,32",
    "data.eval_target=48,32",
    "data.global_batch_size=2",
    "eval.crop_size=32,32",
    "eval.stride=32,32",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.image_summary_every=0",
    "trainer.checkpoint_every=2",
    "trainer.deterministic=true",
)


def make_synthetic_tfds(root, num_train: int = 12, num_val: int = 3) -> str:
    """Writes and prepares a tiny synthetic dataset under `root`; returns its TFDS data_dir."""
    import os

    from fcn_tf.data import sources, synthetic

    raw, data_dir = os.path.join(root, "raw"), os.path.join(root, "tfds")
    synthetic.write_dataset(raw, num_train=num_train, num_val=num_val, height=48, width=64)
    sources.prepare("synthetic", raw, data_dir, allow_count_mismatch=True)
    return data_dir


def train_command(workdir, data_dir, *overrides, experiment="synthetic_r18_os8", extra=()):
    """The scripts/train.py command line for a tiny run."""
    import sys

    args = [sys.executable, f"{REPO}/scripts/train.py", f"--experiment={experiment}", f"--workdir={workdir}"]
    args.append(f"--data_dir={data_dir}")
    args += [f"--override={o}" for o in (*TINY_OVERRIDES, *overrides)]
    return args + list(extra)


def subprocess_env(**extra):
    import os

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def checkpoint_variables(prefix: str) -> dict:
    """Model and optimizer variables of a checkpoint (iterator and bookkeeping state left out)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    keys = [
        k
        for k in reader.get_variable_to_shape_map()
        if (k.startswith("model/") or k.startswith("optimizer/")) and "OBJECT_GRAPH" not in k
    ]
    return {k: reader.get_tensor(k) for k in keys}
