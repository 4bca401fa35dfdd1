"""Semantic segmentation metrics from one transparent confusion matrix.

Everything is derived from an int64 confusion matrix `cm` of shape (C, C):
`cm[i, j]` counts the pixels whose label is class `i` and whose prediction is
class `j`. Pixels whose label is the ignore value are dropped *before*
counting, so they affect neither the labels' nor the predictions' counts.
Counts are summed over all evaluation pixels of the whole split (not averaged
per image) and, when distributed, over replicas and workers
(`strategy.reduce(SUM, ...)` of `confusion_matrix_update`).

Definitions, per class c (TP = cm[c, c], FP = column sum - TP, FN = row sum - TP):
  IoU_c  = TP / (TP + FP + FN)
  Acc_c  = TP / (TP + FN)                (recall)
  Dice_c = 2 TP / (2 TP + FP + FN)       (== F-score with beta 1)
  aAcc   = trace(cm) / sum(cm)           (overall pixel accuracy)

The absent-class rule (the reference's): a class with TP + FP + FN = 0, i.e.
one that occurs neither in the (non-ignored) labels nor in the predictions at
non-ignored pixels, has IoU nan and is skipped by the mean: mIoU is the
nan-mean of IoU_c. mmsegmentation does the same (`total_area_union` is 0, the
IoU is nan, and `np.nanmean` is reported), and so does sssegmentation. A class
that is predicted but never labelled therefore counts with IoU 0, and a class
that is labelled but never predicted counts with IoU 0; only a class absent
from both is skipped. Likewise mAcc nan-means over classes present in the
labels, and mDice/mF-score over classes present in labels or predictions.
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorflow as tf

from fcn_tf import devices


def confusion_matrix_update(labels, predictions, num_classes: int, ignore_label: int = 255) -> tf.Tensor:
    """The int64 confusion matrix of one batch, in pure TensorFlow.

    Usable inside a `tf.function` replica step; sum the per-replica results
    with `strategy.reduce(tf.distribute.ReduceOp.SUM, cm, axis=None)`. Works
    under `tf.config.experimental.enable_op_determinism()` on a GPU too (the
    counts then come from a sort instead of `tf.math.bincount`; the same
    integers).

    Args:
      labels: integer tensor of any shape; values in [0, num_classes) or
        `ignore_label`.
      predictions: integer tensor of the same shape, values in [0, num_classes).
      num_classes: number of classes C.
      ignore_label: label value whose pixels are not counted.

    Returns:
      int64 tensor (C, C), rows are labels and columns predictions.

    Raises:
      tf.errors.InvalidArgumentError: (when run) a label outside [0, C) that is
        not `ignore_label`, a prediction outside [0, C), or mismatched shapes.
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    predictions = tf.cast(tf.reshape(predictions, [-1]), tf.int64)
    tf.debugging.assert_equal(
        tf.size(labels, out_type=tf.int64),
        tf.size(predictions, out_type=tf.int64),
        message="labels and predictions have different sizes",
    )
    valid = tf.not_equal(labels, ignore_label)
    labels = tf.boolean_mask(labels, valid)
    predictions = tf.boolean_mask(predictions, valid)
    checks = [
        tf.debugging.assert_non_negative(labels, message="negative label (not the ignore label)"),
        tf.debugging.assert_less(
            labels,
            tf.constant(num_classes, tf.int64),
            message=f"label >= num_classes={num_classes}, not ignore",
        ),
        tf.debugging.assert_non_negative(predictions, message="negative prediction"),
        tf.debugging.assert_less(
            predictions,
            tf.constant(num_classes, tf.int64),
            message=f"prediction >= num_classes={num_classes}",
        ),
    ]
    with tf.control_dependencies(checks):
        flat = labels * num_classes + predictions
    size = num_classes * num_classes
    # `tf.math.bincount` has no deterministic GPU kernel: under op determinism
    # it raises there. Its CPU kernel is deterministic and stays the CPU path.
    if devices.deterministic_accelerator():
        counts = _counts_by_sorting(flat, size)
    else:
        counts = tf.math.bincount(flat, minlength=size, maxlength=size, dtype=tf.int64)
    return tf.reshape(counts, [num_classes, num_classes])


def _counts_by_sorting(flat, size: int) -> tf.Tensor:
    """`bincount(flat)` over [0, size) from deterministic ops on every device.

    The sorted values are unique whatever the sort's algorithm, and each
    count is the distance between the first positions of two consecutive
    values (`searchsorted`): exact integers, no atomic adds.
    """
    ordered = tf.sort(tf.cast(flat, tf.int32))
    edges = tf.searchsorted(ordered, tf.range(size + 1, dtype=tf.int32), side="left", out_type=tf.int64)
    return edges[1:] - edges[:-1]


def _to_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, tf.Tensor) else np.asarray(x)


class ConfusionMatrix:
    """Streaming confusion matrix with the reference's metrics (see module docstring).

    Example:
      cm = ConfusionMatrix(num_classes=21)
      for labels, predictions in batches:
        cm.update(labels, predictions)
      print(format_table(cm.result(), class_names))
    """

    def __init__(self, num_classes: int, ignore_label: int = 255):
        """Args:
        num_classes: number of classes C (the ignore label is not one).
        ignore_label: label value excluded from counting.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, labels, predictions) -> ConfusionMatrix:
        """Adds a batch of any shape (numpy arrays or eager tensors).

        Args:
          labels: integers in [0, C) or the ignore label.
          predictions: integers in [0, C), same shape as `labels`.

        Returns:
          self, so that updates can be chained.

        Raises:
          ValueError: shapes differ, or a value is out of range (the message
            names the offending value).
        """
        labels, predictions = _to_numpy(labels), _to_numpy(predictions)
        if labels.shape != predictions.shape:
            raise ValueError(f"labels shape {labels.shape} != predictions shape {predictions.shape}")
        labels = labels.reshape(-1).astype(np.int64)
        predictions = predictions.reshape(-1).astype(np.int64)
        valid = labels != self.ignore_label
        labels, predictions = labels[valid], predictions[valid]
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"label value {labels[bad][0]} is outside [0, {self.num_classes}) and is not the "
                f"ignore label {self.ignore_label}"
            )
        bad = (predictions < 0) | (predictions >= self.num_classes)
        if bad.any():
            raise ValueError(f"prediction value {predictions[bad][0]} is outside [0, {self.num_classes})")
        counts = np.bincount(labels * self.num_classes + predictions, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).astype(np.int64)
        return self

    def add_counts(self, matrix) -> ConfusionMatrix:
        """Adds a (C, C) count matrix, e.g. from `confusion_matrix_update`."""
        matrix = _to_numpy(matrix)
        if matrix.shape != self.matrix.shape:
            raise ValueError(f"count matrix shape {matrix.shape} != {self.matrix.shape}")
        if not np.issubdtype(matrix.dtype, np.integer):
            raise ValueError(f"count matrix must be integer, got {matrix.dtype}")
        self.matrix += matrix.astype(np.int64)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Adds the counts of `other` (same classes and ignore label) into self."""
        if (other.num_classes, other.ignore_label) != (self.num_classes, self.ignore_label):
            raise ValueError(
                f"cannot merge ConfusionMatrix(num_classes={other.num_classes}, ignore_label="
                f"{other.ignore_label}) into (num_classes={self.num_classes}, ignore_label={self.ignore_label})"
            )
        self.matrix += other.matrix
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        total = ConfusionMatrix(self.num_classes, self.ignore_label)
        return total.merge(self).merge(other)

    def reset(self) -> None:
        self.matrix[...] = 0

    def result(self) -> dict:
        """The metrics of the counts so far.

        Returns:
          dict with scalars (python floats) `miou`, `aacc`, `macc`, `mdice`,
          `mfscore`, and per-class float64 arrays (C,) `iou`, `acc`, `dice`,
          `fscore`, `precision`, `recall`, with nan for classes the rule
          skips (see module docstring); plus `num_pixels` (int, counted
          pixels). Means of all-nan vectors are nan.
        """
        return metrics_from_confusion_matrix(self.matrix)


def _nanmean(x: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-nan -> nan, said in the docstring
        return float(np.nanmean(x)) if x.size else float("nan")


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = num.astype(np.float64), den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def metrics_from_confusion_matrix(matrix) -> dict:
    """Computes `ConfusionMatrix.result()` from a (C, C) count matrix."""
    cm = np.asarray(matrix, np.int64)
    tp = np.diag(cm)
    labelled = cm.sum(axis=1)  # TP + FN
    predicted = cm.sum(axis=0)  # TP + FP
    union = labelled + predicted - tp
    iou = _divide(tp, union)
    acc = _divide(tp, labelled)
    precision = _divide(tp, predicted)
    dice = _divide(2 * tp, labelled + predicted)
    total = int(cm.sum())
    return {
        "miou": _nanmean(iou),
        "aacc": float(tp.sum() / total) if total else float("nan"),
        "macc": _nanmean(acc),
        "mdice": _nanmean(dice),
        "mfscore": _nanmean(dice),
        "iou": iou,
        "acc": acc,
        "recall": acc,
        "precision": precision,
        "dice": dice,
        "fscore": dice,
        "num_pixels": total,
    }


def format_table(result: dict, class_names=None) -> str:
    """A per-class text table (IoU, Acc, Dice in %) followed by the summary.

    Args:
      result: a dict from `ConfusionMatrix.result()`.
      class_names: C names; defaults to the class indices.

    Returns:
      The table as one string; nan (skipped class) shows as "nan".
    """
    num_classes = len(result["iou"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    width = max([len("Class")] + [len(n) for n in names])

    def pct(v):
        return f"{100 * v:7.2f}" if np.isfinite(v) else f"{'nan':>7}"

    lines = [f"{'Class':<{width}}  {'IoU':>7}  {'Acc':>7}  {'Dice':>7}", "-" * (width + 27)]
    for i, name in enumerate(names):
        lines.append(
            f"{name:<{width}}  {pct(result['iou'][i])}  {pct(result['acc'][i])}  {pct(result['dice'][i])}"
        )
    lines.append("-" * (width + 27))
    lines.append(
        f"mIoU {pct(result['miou']).strip()}  mAcc {pct(result['macc']).strip()}  "
        f"aAcc {pct(result['aacc']).strip()}  mDice {pct(result['mdice']).strip()}  "
        f"(pixels: {result['num_pixels']})"
    )
    return "\n".join(lines)
