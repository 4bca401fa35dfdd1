"""Evaluation over a dataset under a tf.distribute strategy: the reference's mIoU.

`evaluate(model, dataset, config, strategy)` runs each replica's example
through `fcn_tf.inference.predict` (the experiment's `EvalConfig`: whole,
slide, multi-scale + flip), scores the argmax at the original label size
with an int64 confusion matrix (`fcn_tf.metrics.confusion_matrix_update`),
and sums the matrices over replicas and workers with `strategy.reduce(SUM)`.
One `tf.function` with dynamic shapes serves images of every size. The
training loop calls it for periodic evaluation; `scripts/evaluate.py` is a
thin wrapper.

Predictions can be saved as PNGs: `DIR/color/ID.png` (RGB, the dataset's
palette) and, for Cityscapes, `DIR/labelIds/ID.png` with the official label
ids (train id -> label id), the format the Cityscapes benchmark server and
cityscapesscripts' evaluation read.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from fcn_tf import inference, visualize
from fcn_tf.config import ExperimentConfig
from fcn_tf.data import classes
from fcn_tf.data.pipeline import build_dataset
from fcn_tf.metrics import ConfusionMatrix, confusion_matrix_update


def _file_stem(image_id: str, index: int) -> str:
    # Ids may be paths ("frankfurt/frankfurt_000000_000294_leftImg8bit.png") or empty.
    stem = os.path.splitext(os.path.basename(image_id))[0]
    return stem or f"{index:06d}"


def save_prediction(
    prediction: np.ndarray,
    image_id: str,
    output_dir: str,
    palette: np.ndarray,
    label_ids=None,
    index: int = 0,
) -> list[str]:
    """Writes one prediction as PNGs; returns the paths written.

    Args:
      prediction: int (H, W) class ids in [0, C).
      image_id: the example's id; its base name without extension names the
        files (`index` when empty).
      output_dir: root; files go to `color/` and, with `label_ids`, `labelIds/`.
      palette: uint8 (C, 3) colours.
      label_ids: optional uint8 (C,) class -> submission id table (Cityscapes).
      index: fallback name for an empty id.
    """
    stem = _file_stem(image_id, index)
    prediction = np.asarray(prediction)
    outputs = [("color", visualize.colorize(prediction, palette))]
    if label_ids is not None:
        outputs.append(("labelIds", np.asarray(label_ids, np.uint8)[prediction][..., None]))
    paths = []
    for folder, pixels in outputs:
        path = os.path.join(output_dir, folder, f"{stem}.png")
        tf.io.gfile.makedirs(os.path.dirname(path))
        tf.io.write_file(path, tf.io.encode_png(pixels.astype(np.uint8)))
        paths.append(path)
    return paths


def _relax_batch_dim(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Makes the batch dimension unknown so a replica without data can get an empty batch.

    With several replicas the last step may have fewer examples than
    replicas; tf.distribute then hands the others empty batches (0 images),
    which must fit the traced signature.
    """
    if dataset.element_spec["image"].shape[0] is None:
        return dataset
    return dataset.unbatch().batch(1)


def _dataset_fn(dataset, config: ExperimentConfig, max_examples: int) -> Callable:
    """`input_context -> per-pipeline eval dataset` for `distribute_datasets_from_function`."""

    def make(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        num_pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
        if dataset is None:
            ds = build_dataset(config.data, False, input_context, max_examples=max_examples)
        else:
            ds = dataset() if callable(dataset) else dataset
            if max_examples:
                ds = ds.take(max_examples)
            if num_pipelines > 1:
                ds = ds.shard(num_pipelines, pipeline_id)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return _relax_batch_dim(ds).with_options(options)

    return make


class EvaluationInterrupted(Exception):
    """`stop_fn` asked to stop on some worker; every worker stopped after the same batch."""


def make_eval_step(
    model,
    config: ExperimentConfig,
    strategy: tf.distribute.Strategy,
    element_spec,
    with_predictions: bool = False,
) -> Callable:
    """The distributed eval step: `(batch, stop) -> (confusion matrix, examples, stops, [preds, ids])`.

    The confusion matrix, the example count and `stop` (this worker's wish
    to stop, 0 or 1) are summed over replicas and workers: a worker asking
    to stop is seen by all at the same batch.

    Args:
      model: segmenter returning {"logits": ...}.
      config: the experiment (model.num_classes, data.ignore_label, eval).
      strategy: the strategy the distributed dataset belongs to.
      element_spec: the distributed dataset's element spec (one trace for all sizes).
      with_predictions: also return each replica's uint8 argmax (N, H, W).
    """
    num_classes, ignore_label = config.model.num_classes, config.data.ignore_label
    logits_fn = inference.model_logits_fn(model)

    def replica_step(batch, stop):
        image, label = batch["image"], batch["label"]

        def run():
            scores = inference.predict(logits_fn, image, tf.shape(label)[1:3], config.eval, num_classes)
            prediction = tf.argmax(scores, axis=-1, output_type=tf.int32)
            cm = confusion_matrix_update(label, prediction, num_classes, ignore_label)
            return cm, tf.cast(prediction, tf.uint8)

        def empty():
            return tf.zeros([num_classes, num_classes], tf.int64), tf.zeros_like(label, tf.uint8)

        # A replica past the end of the data gets an empty batch: count nothing.
        cm, prediction = tf.cond(tf.size(label) > 0, run, empty)
        count = tf.cast(tf.size(batch["image_id"]), tf.int64)
        return cm, count, prediction, tf.identity(stop)  # one per replica: summed across workers

    @tf.function(input_signature=[element_spec, tf.TensorSpec([], tf.int64)])
    def step(batch, stop):
        cm, count, prediction, stops = strategy.run(replica_step, args=(batch, stop))
        # Counts are int64 and summed, never averaged, over replicas and workers.
        cm = strategy.reduce(tf.distribute.ReduceOp.SUM, cm, axis=None)
        count = strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None)
        stops = strategy.reduce(tf.distribute.ReduceOp.SUM, stops, axis=None)
        if with_predictions:
            return cm, count, stops, prediction, batch["image_id"]
        return cm, count, stops

    return step


def evaluate(
    model,
    dataset,
    config: ExperimentConfig,
    strategy: tf.distribute.Strategy | None = None,
    max_examples: int = 0,
    save_predictions_dir: str | None = None,
    log_every: int = 100,
    stop_fn: Callable[[], bool] | None = None,
) -> dict:
    """Evaluates `model` on the eval dataset as the experiment says.

    Args:
      model: segmenter returning {"logits": (N, h, w, C)}; built under
        `strategy.scope()` when distributed.
      dataset: the eval dataset of dicts `{"image": float32 (1, h', w', 3),
        "label": int32 (1, H, W), "image_id": string (1,)}` (pipeline
        contract), a `() -> dataset` callable, or None to read the eval
        split through `fcn_tf.data.build_dataset(config.data, False, ...)`,
        one shard per input pipeline. A given dataset is read by every
        worker and sharded per worker.
      config: the experiment; `config.eval` chooses the inference mode.
      strategy: the tf.distribute strategy (default: the current one).
      max_examples: evaluate only the first N examples (0: all).
      save_predictions_dir: write colour (and, for Cityscapes, label-id)
        PNGs of the predictions there.
      log_every: log the running mIoU every this many steps.
      stop_fn: `() -> bool`, asked before each batch (e.g. "SIGTERM came");
        True on any worker stops every worker after the same batch.

    Returns:
      `ConfusionMatrix.result()` (miou, iou, aacc, acc, macc, dice, ...)
      plus `class_names`, `confusion_matrix` (int64 (C, C)), `num_examples`,
      `seconds` and `examples_per_second`.

    Raises:
      EvaluationInterrupted: `stop_fn` said so on some worker.
    """
    strategy = strategy or tf.distribute.get_strategy()
    num_classes = config.model.num_classes
    dist_dataset = strategy.distribute_datasets_from_function(_dataset_fn(dataset, config, max_examples))
    save = bool(save_predictions_dir)
    step = make_eval_step(model, config, strategy, dist_dataset.element_spec, with_predictions=save)
    palette = classes.palette_for(config.data.dataset, num_classes, config.data.palette) if save else None
    label_ids = classes.cityscapes_label_ids() if save and config.data.dataset == "cityscapes" else None

    matrix = ConfusionMatrix(num_classes, config.data.ignore_label)
    examples, steps, saved, start = 0, 0, 0, time.perf_counter()
    for batch in dist_dataset:
        outputs = step(batch, tf.constant(int(bool(stop_fn and stop_fn())), tf.int64))
        if int(outputs[2].numpy()):
            logging.warning("evaluation stopped after %d examples (a worker asked to stop)", examples)
            raise EvaluationInterrupted()
        matrix.add_counts(outputs[0].numpy())
        examples += int(outputs[1].numpy())
        steps += 1
        if save:
            saved = _save_predictions(strategy, outputs, save_predictions_dir, palette, label_ids, saved)
        if log_every and steps % log_every == 0:
            logging.info("eval: %d examples, running mIoU %.4f", examples, matrix.result()["miou"])
    seconds = time.perf_counter() - start
    if examples == 0:
        raise ValueError(f"the evaluation dataset of {config.name!r} yielded no examples")
    result = matrix.result()
    result.update(
        class_names=classes.class_names_for(config.data.dataset, num_classes, config.data.class_names),
        confusion_matrix=matrix.matrix.copy(),
        num_examples=examples,
        seconds=seconds,
        examples_per_second=examples / seconds if seconds > 0 else float("nan"),
    )
    logging.info(
        "eval: %d examples in %.1f s, mIoU %.4f aAcc %.4f mAcc %.4f",
        examples,
        seconds,
        result["miou"],
        result["aacc"],
        result["macc"],
    )
    return result


def _save_predictions(strategy, outputs, output_dir, palette, label_ids, saved: int) -> int:
    """Writes the predictions of one eval step; returns the running count of images written."""
    # Each worker writes the examples its own replicas evaluated.
    predictions = strategy.experimental_local_results(outputs[3])
    image_ids = strategy.experimental_local_results(outputs[4])
    for prediction, ids in zip(predictions, image_ids, strict=True):
        for prediction_i, image_id in zip(prediction.numpy(), ids.numpy(), strict=True):
            save_prediction(prediction_i, image_id.decode(), output_dir, palette, label_ids, index=saved)
            saved += 1
    return saved


def to_jsonable(result: dict) -> dict:
    """`result` with arrays as lists and nan as None, for `json.dump` (strict JSON has no NaN)."""

    def convert(value):
        if isinstance(value, np.ndarray):
            return [convert(v) for v in value.tolist()]
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (float, np.floating)):
            return None if math.isnan(value) else float(value)
        if isinstance(value, np.integer):
            return int(value)
        return value

    return convert(result)
