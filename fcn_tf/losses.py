"""Pixel cross-entropy over non-ignored pixels, correct across replicas.

The reference averages the per-pixel cross-entropy over all valid pixels of
the (global) batch: `sum_valid CE / num_valid` (a per-pixel mean, not a mean
of per-image means). Under `tf.distribute` each replica sees only its shard,
and the optimizer SUMS the replicas' gradients. So each replica returns
`local_sum / global_count`, with `global_count` all-reduced over replicas:
the sum of the replica losses (and of their gradients) is then exactly the
one-replica mean over the whole global batch, whatever the number of valid
pixels on each replica.
"""

from __future__ import annotations

import tensorflow as tf


def cross_entropy_sum(logits: tf.Tensor, labels: tf.Tensor, ignore_label: int) -> tf.Tensor:
    """Sum of per-pixel cross-entropy over the pixels whose label is not ignored.

    Args:
      logits: (N, H, W, C) scores, any float dtype.
      labels: (N, H, W) integer class ids; `ignore_label` marks excluded pixels.
      ignore_label: label value that contributes nothing.

    Returns:
      A float32 scalar.
    """
    # Computed in float32 even under mixed precision: a bfloat16 softmax over
    # 150 classes and a sum over millions of pixels lose too many bits.
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_label)
    # sparse_softmax_cross_entropy rejects out-of-range ids (255), so ignored
    # pixels get a dummy class 0 and are zeroed afterwards.
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
    return tf.reduce_sum(tf.where(valid, per_pixel, tf.zeros_like(per_pixel)))


def valid_pixel_count(labels: tf.Tensor, ignore_label: int) -> tf.Tensor:
    """Number of non-ignored pixels in `labels`, as a float32 scalar (local, not reduced)."""
    return tf.reduce_sum(tf.cast(tf.not_equal(tf.cast(labels, tf.int32), ignore_label), tf.float32))


def global_valid_pixel_count(labels: tf.Tensor, ignore_label: int) -> tf.Tensor:
    """Valid pixels summed over all replicas (this replica's count when not distributed).

    Must be called in a replica context (inside `strategy.run`) or outside any
    strategy; every replica has to call it (it is a collective).

    Args:
      labels: this replica's (N, H, W) labels.
      ignore_label: label value that is not counted.
    """
    local = valid_pixel_count(labels, ignore_label)
    replica_ctx = tf.distribute.get_replica_context()
    if replica_ctx is None:  # Cross-replica context: the caller holds the whole batch.
        return local
    # The collective that makes the loss replica-count invariant: every
    # replica divides its own sum by the same global denominator.
    # (float32 counts are exact up to 2**24 = 16.7M pixels per step.)
    return replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)


def segmentation_losses(
    outputs: dict[str, tf.Tensor],
    labels: tf.Tensor,
    global_count: tf.Tensor,
    ignore_label: int,
    aux_weight: float,
) -> dict[str, tf.Tensor]:
    """This replica's share of the main, auxiliary and total losses.

    Each value is `local CE sum / global_count`; summing it over replicas
    gives the global per-pixel mean. With no valid pixel anywhere the losses
    are 0 (the reference would produce NaN) so a fully ignored batch does not
    poison the weights.

    Args:
      outputs: the model's dict, "logits" and optionally "aux_logits",
        (N, H, W, C) at label resolution.
      labels: (N, H, W) integer labels.
      global_count: `global_valid_pixel_count` over the whole global batch
        (every replica and every accumulated micro-batch).
      ignore_label: label excluded from the loss.
      aux_weight: weight of the auxiliary loss (0.4 in the reference).

    Returns:
      {"main", "aux", "total"} float32 scalars; "aux" is 0 without an aux head.
    """
    denominator = tf.maximum(tf.cast(global_count, tf.float32), 1.0)
    main = cross_entropy_sum(outputs["logits"], labels, ignore_label) / denominator
    if "aux_logits" in outputs and aux_weight:
        aux = cross_entropy_sum(outputs["aux_logits"], labels, ignore_label) / denominator
    else:
        aux = tf.zeros([], tf.float32)
    # The reference's weighting: main x 1.0 + auxiliary x 0.4.
    return {"main": main, "aux": aux, "total": main + aux_weight * aux}
