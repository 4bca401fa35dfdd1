"""BatchNorm synchronized across replicas in one packed all-reduce per pass, and its XLA guard.

Keras' synchronized BatchNorm makes several all-reduces per pass and
computes the variance as E[x^2] - E[x]^2 in float32; here each pass
exchanges one packed tensor, and the statistics stay exact for data far
from zero (`sync_batch_norm`). `fcn_tf.models.layers.BatchNorm` chooses
between the two per layer.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

_REDUCE_AXES = [0, 1, 2]


class SyncBatchNormXlaError(RuntimeError):
    """XLA with BatchNorm synchronized over replicas that are not all GPUs (see `check_xla_sync_bn`)."""


def check_xla_sync_bn(devices, replicas: int, collective: str | None = None) -> None:
    """Refuses XLA-compiled synchronized BatchNorm where TensorFlow cannot run it.

    TensorFlow runs a cross-replica all-reduce inside a jit-compiled function
    only when every replica is a GPU (MirroredStrategy's and
    MultiWorkerMirroredStrategy's `_use_merge_call`); elsewhere the all-reduce
    becomes a `merge_call` inside the compiled function, which fails (tried on
    2 CPU replicas with TensorFlow 2.21).

    Args:
      devices: the replicas' device strings (`strategy.extended.worker_devices`).
      replicas: replicas in sync; one replica needs no all-reduce.
      collective: the all-reduce between workers ("nccl" or "ring"), None on
        one machine. A compiled all-reduce between GPUs runs on NCCL: a ring
        hint cannot be honoured there.

    Raises:
      SyncBatchNormXlaError: several replicas, not all of them GPUs, or a
        ring all-reduce between workers.
    """
    if replicas > 1 and not all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices):
        raise SyncBatchNormXlaError(
            f"trainer.jit_compile=true with BatchNorm synchronized over {replicas} replicas on "
            f"{', '.join(devices)}: TensorFlow compiles the cross-replica all-reduce into XLA only when every "
            "replica is a GPU; set trainer.jit_compile=false or model.sync_bn=false"
        )
    if replicas > 1 and collective == "ring":
        raise SyncBatchNormXlaError(
            "trainer.jit_compile=true with synchronized BatchNorm and trainer.collective=ring: XLA compiles the "
            "cross-worker all-reduce only with NCCL; set trainer.collective=auto (NCCL on GPUs) or "
            "trainer.jit_compile=false"
        )


def _shifted(x, shift):
    return tf.cast(x, tf.float32) - shift


def _global_statistics(x, shift, replica_ctx):
    """The forward pass's one packed SUM all-reduce: (count, mean, biased variance, mean - shift).

    Each replica puts its count, its shift, its mean relative to the shift
    and its sum of squared deviations from its mean in its own row of a
    [replicas, 1 + 3C] tensor, so the SUM gathers every replica's
    statistics; they are combined with Chan et al.'s parallel formula (the
    squared deviations of the replica means from the global mean are
    added). That stays exact where E[x^2] - E[x]^2 in float32 loses the
    variance (inputs with mean 1e3 and std 1).
    """
    channels = x.shape[-1]
    replicas = replica_ctx.num_replicas_in_sync
    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    local_offset, local_variance = tf.nn.moments(_shifted(x, shift), axes=_REDUCE_AXES)
    row = tf.concat([count[None], shift, local_offset, local_variance * count], 0)
    replica = tf.cast(replica_ctx.replica_id_in_sync_group, tf.int32)
    rows = tf.scatter_nd(tf.reshape(replica, [1, 1]), row[None], [replicas, 1 + 3 * channels])
    # Statistics are constants to the tape: `_normalize`'s gradient accounts
    # for their dependence on x (and no gradient all-reduce is made for them).
    rows = tf.stop_gradient(replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows))
    counts, shifts = rows[:, :1], rows[:, 1 : 1 + channels]
    offsets, squares = rows[:, 1 + channels : 1 + 2 * channels], rows[:, 1 + 2 * channels :]
    total = tf.reduce_sum(counts)
    # Every replica's mean relative to replica 0's shift; the global mean is
    # shift + delta, kept in two parts so x - mean stays exact to rounding.
    base = shifts[0]
    relative_means = (shifts - base) + offsets
    delta = tf.reduce_sum(counts * relative_means, 0) / total
    spread = relative_means - delta
    variance = (tf.reduce_sum(squares, 0) + tf.reduce_sum(counts * spread * spread, 0)) / total
    mean = base + delta
    # The global mean relative to this replica's shift (small: both are near the data).
    mean_from_shift = (base - shift) + delta
    return total, mean, variance, mean_from_shift


def _normalize(x, gamma, beta, shift, mean_from_shift, inv_std, total):
    """The normalization by the global statistics; its gradient is the backward pass's one packed SUM.

    The SUM of (sum dy, sum dy * x_hat) per channel gives the input gradient
    of the global normalization; the gamma and beta gradients are this
    replica's share (the train step sums gradients over replicas).
    """
    channels = x.shape[-1]

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        scale = gamma * inv_std
        # From x - shift: x * scale - mean * scale would cancel for x near a large mean.
        outputs = _shifted(x, shift) * scale + (beta - mean_from_shift * scale)

        def grad(dy):
            dy = tf.cast(dy, tf.float32)
            # Recomputed rather than kept from the forward: one float32 map less held.
            x_s = _shifted(x, shift)
            # sum dy * x_hat = (sum dy * (x - shift) - mean_from_shift * sum dy) / std.
            local_dy = tf.reduce_sum(dy, _REDUCE_AXES)
            local_dy_x_hat = (tf.reduce_sum(dy * x_s, _REDUCE_AXES) - mean_from_shift * local_dy) * inv_std
            sums = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.concat([local_dy, local_dy_x_hat], 0)
            )
            sum_dy, sum_dy_x_hat = sums[:channels], sums[channels:]
            # dx = scale (dy - (sum dy + x_hat sum dy x_hat) / N) as per-channel
            # factors of dy and x - shift: fewer passes over the map.
            slope = -scale * inv_std * sum_dy_x_hat / total
            dx = scale * dy + (x_s * slope - (scale * sum_dy / total + mean_from_shift * slope))
            return tf.cast(dx, x.dtype), local_dy_x_hat, local_dy

        return tf.cast(outputs, x.dtype), grad

    return normalize(x, gamma, beta)


def sync_batch_norm(x, gamma, beta, epsilon: float, replica_ctx=None):
    """Training-mode BatchNorm of NHWC `x` over the global batch of all replicas.

    One SUM all-reduce per pass: the statistics forward
    (`_global_statistics`), the gradient's per-channel sums backward
    (`_normalize`). Statistics are of x - shift, with one sample of this
    replica as the shift, and the global mean is kept as shift + offset, so
    x - mean is exact to rounding too. Statistics and the normalization run
    in float32; `x` stays in its dtype (the copy the backward keeps).

    Args:
      x: NHWC tensor (float32, float16 or bfloat16).
      gamma: float32 (C,) scale.
      beta: float32 (C,) offset.
      epsilon: added to the variance.
      replica_ctx: the replica context (default: the current one).

    Returns:
      (outputs in x.dtype, global mean, global biased variance, global
      count): the statistics float32 (C,), the count of values per channel
      over all replicas a float32 scalar (to unbias the variance for the
      moving average, as PyTorch's SyncBatchNorm).

    Raises:
      SyncBatchNormXlaError: traced inside XLA on replicas that are not all GPUs.
    """
    replica_ctx = replica_ctx or tf.distribute.get_replica_context()
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        # Also checked before training starts (`apply_training_settings`); this covers other callers.
        check_xla_sync_bn(replica_ctx.strategy.extended.worker_devices, replica_ctx.num_replicas_in_sync)
    # Sums of small deviations, not of large values (float32 holds a mean
    # near 1e3 only to ~3e-5, which would shift every normalized value).
    shift = tf.stop_gradient(tf.cast(x[0, 0, 0], tf.float32))
    total, mean, variance, mean_from_shift = _global_statistics(x, shift, replica_ctx)
    inv_std = tf.math.rsqrt(variance + epsilon)
    outputs = _normalize(x, gamma, beta, shift, mean_from_shift, inv_std, total)
    return outputs, mean, variance, total
