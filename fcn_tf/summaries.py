"""TensorBoard helpers: scalars, colourized label images and predictions, memory figures.

Tags written by training (read back by tests/test_summaries.py):

  train: loss/total, loss/main, loss/aux, learning_rate, grad_norm,
         perf/images_per_sec, perf/step_time_sec, perf/peak_memory_mb
         images/input, images/ground_truth, images/prediction
  eval:  eval/mIoU, eval/aAcc, eval/mAcc (when given), eval/IoU/<class name>
"""

from __future__ import annotations

import os
import resource

import numpy as np
import tensorflow as tf

from fcn_tf import visualize
from fcn_tf.data import classes

TRAIN_SCALAR_TAGS = (
    "loss/total",
    "loss/main",
    "loss/aux",
    "learning_rate",
    "grad_norm",
    "perf/images_per_sec",
    "perf/step_time_sec",
    "perf/peak_memory_mb",
)
IMAGE_TAGS = ("images/input", "images/ground_truth", "images/prediction")


def summary_dir(workdir: str, name: str) -> str:
    """WORKDIR/tensorboard/<name>: one run per writer, `tensorboard --logdir WORKDIR`.

    Args:
      workdir: the training workdir.
      name: the run, "train" or "eval".
    """
    return os.path.join(workdir, "tensorboard", name)


def denormalize(images: tf.Tensor, mean, std) -> tf.Tensor:
    """Undoes the input normalization: (N, H, W, 3) float -> uint8 RGB.

    Args:
      images: normalized float images.
      mean: the normalization mean per channel.
      std: the normalization std per channel.
    """
    images = tf.cast(images, tf.float32) * tf.constant(std, tf.float32) + tf.constant(mean, tf.float32)
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def peak_memory_mb() -> float:
    """Peak memory in MiB: GPU:0's allocator peak when there is a GPU, else the process's max RSS."""
    if tf.config.list_logical_devices("GPU"):
        try:
            return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        except (ValueError, tf.errors.OpError):
            pass
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_scalars(writer: tf.summary.SummaryWriter, step: int, values: dict[str, float]) -> None:
    """Writes `{tag: value}` at `step` and flushes (so a killed run keeps its curves).

    Args:
      writer: the summary writer.
      step: global step.
      values: tag -> scalar.
    """
    with writer.as_default(step=step):
        for tag, value in values.items():
            tf.summary.scalar(tag, float(value))
    writer.flush()


def write_segmentation_images(
    writer: tf.summary.SummaryWriter,
    step: int,
    images: tf.Tensor,
    labels: tf.Tensor,
    predictions: tf.Tensor,
    palette: np.ndarray,
    mean,
    std,
    max_outputs: int = 3,
) -> None:
    """Writes input, ground truth and prediction images, coloured with `palette`.

    Args:
      writer: the summary writer.
      step: global step.
      images: (N, H, W, 3) normalized float inputs.
      labels: (N, H, W) ground truth ids.
      predictions: (N, H, W) predicted ids.
      palette: (num_classes, 3) uint8.
      mean: normalization mean (to show the input as seen by a person).
      std: normalization std.
      max_outputs: images per tag.
    """
    with writer.as_default(step=step):
        tf.summary.image("images/input", denormalize(images, mean, std), max_outputs=max_outputs)
        tf.summary.image(
            "images/ground_truth", visualize.colorize(np.asarray(labels), palette), max_outputs=max_outputs
        )
        tf.summary.image(
            "images/prediction", visualize.colorize(np.asarray(predictions), palette), max_outputs=max_outputs
        )
    writer.flush()


def eval_scalars(results: dict, class_names: list[str] | None = None) -> dict[str, float]:
    """Flattens an evaluation result into `eval/...` scalar tags.

    Args:
      results: `fcn_tf.eval_lib.evaluate`'s dict: "miou", "aacc", "macc"
        floats, "iou" per-class (NaN for classes absent from labels and
        predictions, which get no tag) and "class_names". The spellings
        "mIoU"/"aAcc"/"mAcc"/"IoU" are accepted too.
      class_names: names for the per-class values when `results` has none.
    """
    out = {}
    for key, tag in (("miou", "mIoU"), ("aacc", "aAcc"), ("macc", "mAcc")):
        value = results.get(key, results.get(tag))
        if value is not None:
            out[f"eval/{tag}"] = float(value)
    per_class = results.get("iou", results.get("IoU"))
    names = results.get("class_names") or class_names
    if per_class is not None:
        items = (
            per_class.items() if isinstance(per_class, dict) else enumerate(np.asarray(per_class).tolist())
        )
        for key, value in items:
            name = names[key] if isinstance(key, int) and names and key < len(names) else key
            if value is not None and np.isfinite(float(value)):  # absent classes have no IoU
                out[f"eval/IoU/{name}"] = float(value)
    return out


def class_names(config) -> list[str]:
    """The experiment's class names, for the per-class eval tags.

    Args:
      config: the experiment (data.dataset, model.num_classes).
    """
    return classes.class_names_for(config.data.dataset, config.model.num_classes, config.data.class_names)


def image_batch(dataset: tf.data.Dataset, count: int) -> tuple[list, list]:
    """The first `count` evaluation examples, kept for image summaries (labels resized to the input).

    Args:
      dataset: evaluation examples, dicts with a batched "image" and "label".
      count: how many to take.

    Returns:
      (images, labels): lists of `count` (1, H, W, 3) and (1, H, W) tensors.
    """
    images, labels = [], []
    for example in dataset.take(count):
        image = example["image"]
        label = tf.image.resize(example["label"][..., None], tf.shape(image)[1:3], method="nearest")[..., 0]
        images.append(image)
        labels.append(label)
    return images, labels


def write_predictions(writer: tf.summary.SummaryWriter, step: int, model, batch, config) -> None:
    """Writes the model's predictions on `batch` (`image_batch`) beside its inputs and ground truth.

    Args:
      writer: the summary writer.
      step: global step.
      model: the segmenter (its "logits" output is shown).
      batch: (images, labels) from `image_batch`; examples of different
        sizes cannot be stacked, and then only the first is shown.
      config: the experiment (the dataset's palette, the input normalization).
    """
    images, labels = batch
    predictions = [tf.argmax(model(x, training=False)["logits"], axis=-1) for x in images]
    palette = classes.palette_for(config.data.dataset, config.model.num_classes, config.data.palette)
    write_segmentation_images(
        writer,
        step,
        tf.concat(images, 0) if len({tuple(x.shape) for x in images}) == 1 else images[0],
        tf.concat(labels, 0) if len({tuple(y.shape) for y in labels}) == 1 else labels[0],
        tf.concat(predictions, 0) if len({tuple(p.shape) for p in predictions}) == 1 else predictions[0],
        palette,
        config.data.mean,
        config.data.std,
    )
