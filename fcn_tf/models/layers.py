"""Conv2D and BatchNorm layers with faster training steps on the CPU.

Conv2D: the backward pass is computed with fast CPU kernels.

TensorFlow's CPU kernels for a convolution's gradients are far slower than
its forward kernel on the wide layers of a dilated FCN: at 512x512 input,
the filter gradient of the head's 3x3 conv (2048 -> 512 channels on a 64x64
map) took 5x the forward's time with oneDNN (BENCHMARKS.md). Both gradients
of a stride-1 "same" convolution can be written with the fast kernels:

- input gradient: the forward convolution of the output gradient with the
  kernel rotated by 180 degrees and its channel axes swapped (same
  dilation, same padding);
- filter gradient: for each kernel tap, one matrix product of the input
  with the output gradient shifted by that tap.

The forward op and the layer's variables are Keras' own (names, weights and
checkpoints unchanged); only the gradient differs, by float32 rounding
(summation order). Strided convolutions keep TensorFlow's gradients.

BatchNorm: the training step runs as fused kernels (see the class).

With oneDNN on a CPU, two choices depend on the channel count, measured
(constants below): narrow 1x1 filter gradients use oneDNN's own kernel, and
wide BatchNorms compute their statistics by reductions.

All of this is CPU tuning. Each layer takes `kernels`: "cpu_fast" runs the
gradients above, "tensorflow" TensorFlow's own (cuDNN's backprop kernels on
a GPU, which XLA can also use) and the fused BatchNorm, "auto" picks
"cpu_fast" only when no GPU or TPU is visible (`resolve_kernels`; the model
builders resolve it once and hand the result to every layer).

With BatchNorm synchronized across replicas, each layer exchanges one packed
tensor in the forward pass and one in the backward pass
(`sync_batch_norm`).
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from fcn_tf import devices
from fcn_tf.config import KERNELS

# Kernel choices of the "cpu_fast" kernels made only where oneDNN runs
# (TF_ENABLE_ONEDNN_OPTS=1 is the training default on CPU, see
# fcn_tf.devices.prefer_onednn), from measurements on the project's CPU at
# the R50-D8 shapes (BENCHMARKS.md). Both sides of each choice compute the
# same values; only the speed differs.
# A 1x1 filter gradient is a plain matmul when both channel counts reach this
# (157-170 GFLOP/s), else oneDNN's Conv2DBackpropFilter (113-136, where its
# matmul gets 61-89; 1024 <-> 256 channels on 64x64: 37 vs 52-55 ms).
_ONEDNN_MATMUL_MIN_CHANNELS = 512
# BatchNorm statistics by two reductions instead of oneDNN's fused kernel from
# this many channels (2 x 64 x 64 x 2048, forward + backward: 78 vs 99 ms;
# x 1024: 43 vs 52 ms; x 512 and below: no gain).
_ONEDNN_REDUCED_BN_MIN_CHANNELS = 1024
# The filter gradient gathers its k*k shifted output gradients one kernel row
# at a time from this gathered width (k*k*out): 3x3 convs with 512+ output
# channels, whose full copy is 151 MB at 2 x 64 x 64 (R50-D8 at 512x512,
# batch 2). It was the training step's peak: -90 MB, time within noise.
_FILTER_GRAD_ROWWISE_MIN_WIDTH = 9 * 512


# Name scope of the ops only the "cpu_fast" kernels make (hand-written
# gradients, BatchNorm by reductions): the GPU check and the tests look for it
# in a traced train step (it must not appear on an accelerator).
CPU_KERNEL_SCOPE = "cpu_fast"


@functools.cache
def _onednn() -> bool:
    # Fixed for the process: TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import.
    return devices.onednn_enabled()


def resolve_kernels(kernels: str) -> str:
    """The kernels a layer runs: "cpu_fast" or "tensorflow" (see the module docstring).

    Args:
      kernels: "auto" ("cpu_fast" when `fcn_tf.devices.accelerators_visible()`
        is false, else "tensorflow"), "tensorflow" or "cpu_fast".

    Raises:
      ValueError: an unknown value.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} not in {KERNELS}")
    if kernels == "auto":
        return "tensorflow" if devices.accelerators_visible() else "cpu_fast"
    return kernels


def _input_grad(dy, kernel, dilation: int):
    # The flipped kernel depends only on the weights: without the control
    # dependency it is computed when the step starts and held until the
    # backward pass reaches this layer (~90 MB at the R50-D8 training peak).
    with tf.control_dependencies([dy]):
        flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])
    return tf.nn.convolution(dy, flipped, padding="SAME", dilations=dilation)


def _filter_grad(x, dy, kernel_size: int, dilation: int):
    """d(loss)/d(kernel) of a stride-1 "same" conv as ONE wide matmul.

    y[p] = sum_t x[p + d * (t - c)] @ w[t] with c = k // 2 and zeros outside
    the map, hence dw[t] = sum_q x[q]^T dy[q - d * (t - c)]. The input is
    flattened and transposed once; the output gradient is zero-padded and
    gathered into all k*k shifted copies side by side, (positions, k*k*out),
    in one copy (one per kernel row for wide convs, to bound the memory);
    then dw = x^T @ that, (in, k*k*out), reordered to the kernel layout. One
    wide matmul runs near the machine's sgemm peak where k*k narrow ones did
    not (oneDNN: 107 vs 165 GFLOP/s for 512 -> 512 channels at 64x64, 89 vs
    173 for 1024 -> 256; BENCHMARKS.md).
    """
    c_in, c_out = x.shape[-1], dy.shape[-1]
    # Written as an explicit transpose; Grappler may fold it into the matmul
    # (transpose_a), which measured the same on these shapes (BENCHMARKS.md).
    x_t = tf.transpose(tf.reshape(x, [-1, c_in]))
    if kernel_size == 1:
        if _onednn() and min(c_in, c_out) < _ONEDNN_MATMUL_MIN_CHANNELS:
            # oneDNN's matmul runs these narrow products slowly (61-89
            # GFLOP/s); its own 1x1 filter-gradient kernel gets 113-136.
            return tf.raw_ops.Conv2DBackpropFilter(
                input=x,
                filter_sizes=[1, 1, c_in, c_out],
                out_backprop=dy,
                strides=[1, 1, 1, 1],
                padding="VALID",
            )
        return tf.reshape(tf.matmul(x_t, tf.reshape(dy, [-1, c_out])), [1, 1, c_in, c_out])
    c = kernel_size // 2
    pad = dilation * c
    shape = tf.shape(dy)
    batch, height, width = shape[0], shape[1], shape[2]
    padded_h, padded_w = height + 2 * pad, width + 2 * pad
    dy_padded = tf.reshape(tf.pad(dy, [[0, 0], [pad, pad], [pad, pad], [0, 0]]), [-1, c_out])
    # Row of dy_padded holding dy[q - d * (t - c)] for tap t = (i, j): the
    # padded position of q shifted by d * (2c - i) rows and d * (2c - j) columns.
    rows = (tf.range(batch)[:, None, None] * padded_h + tf.range(height)[None, :, None]) * padded_w
    rows = tf.reshape(rows + tf.range(width)[None, None, :], [-1, 1])
    taps = [(i, j) for i in range(kernel_size) for j in range(kernel_size)]
    # Gathered one kernel row at a time when the copy is wide (with a control
    # dependency, so one row's copy is freed before the next is made).
    groups = kernel_size if len(taps) * c_out >= _FILTER_GRAD_ROWWISE_MIN_WIDTH else 1
    per_group = len(taps) // groups
    products = []
    for group in range(groups):
        group_taps = taps[group * per_group : (group + 1) * per_group]
        shift = tf.constant([dilation * (2 * c - i) for i, _ in group_taps]) * padded_w + tf.constant(
            [dilation * (2 * c - j) for _, j in group_taps]
        )
        with tf.control_dependencies(products[-1:]):
            shifted = tf.gather(dy_padded, rows + shift[None, :])
        products.append(tf.matmul(x_t, tf.reshape(shifted, [-1, len(group_taps) * c_out])))
    dw = tf.reshape(
        tf.concat(products, 1) if groups > 1 else products[0], [c_in, kernel_size, kernel_size, c_out]
    )
    return tf.transpose(dw, [1, 2, 0, 3])


def conv2d_same(x, kernel, dilation: int = 1):
    """Stride-1 "same" NHWC convolution with the gradients described above.

    Args:
      x: NHWC input.
      kernel: (k, k, in, out) with an odd k.
      dilation: dilation rate (both spatial axes).
    """
    kernel_size = kernel.shape[0]

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.convolution(x, kernel, padding="SAME", dilations=dilation)

        def grad(dy):
            with tf.name_scope(CPU_KERNEL_SCOPE):
                return _input_grad(dy, kernel, dilation), _filter_grad(x, dy, kernel_size, dilation)

        return y, grad

    return conv(x, kernel)


@keras.saving.register_keras_serializable(package="fcn_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` using `conv2d_same` where it applies.

    That is: with the "cpu_fast" kernels, stride 1, "same" padding (or a 1x1
    kernel), a square odd kernel, equal dilations, channels-last. Every other
    configuration runs Keras' own convolution.

    Args:
      *args: as `keras.layers.Conv2D`.
      kernels: "auto", "tensorflow" or "cpu_fast" (`resolve_kernels`); the
        resolved value is kept in the config.
      **kwargs: as `keras.layers.Conv2D`.
    """

    def __init__(self, *args, kernels: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = resolve_kernels(kernels)

    def get_config(self):
        return {**super().get_config(), "kernels": self.kernels}

    def _fast_backward(self) -> bool:
        k = self.kernel_size
        return (
            self.kernels == "cpu_fast"
            and tuple(self.strides) == (1, 1)
            and (self.padding == "same" or k == (1, 1))
            and self.data_format == "channels_last"
            and k[0] == k[1]
            and k[0] % 2 == 1
            and self.dilation_rate[0] == self.dilation_rate[1]
            and self.groups == 1
        )

    def convolution_op(self, inputs, kernel):
        if not self._fast_backward():
            return super().convolution_op(inputs, kernel)
        return conv2d_same(tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel), self.dilation_rate[0])


def _batch_norm_by_reductions(x, gamma, beta, epsilon: float):
    """Training-mode BatchNorm of NHWC `x`; returns (outputs, mean, biased variance).

    The statistics are two reductions over all but the channel axis (the
    mean, then the mean squared deviation from it), the output one
    multiply-add per element, and the gradient TensorFlow's fused kernel
    (`FusedBatchNormGradV3`, given the batch mean and biased variance, as the
    fused forward kernel hands them on). Mean and variance are constants to
    the tape here: the fused gradient already includes their dependence on x.
    """
    # Under mixed precision `x` stays in its compute dtype (the one copy the
    # backward keeps); only the transient float32 casts feed the statistics.
    mean, variance = tf.nn.moments(tf.cast(x, tf.float32), axes=[0, 1, 2])

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        scale = gamma * tf.math.rsqrt(variance + epsilon)
        outputs = tf.cast(tf.cast(x, tf.float32) * scale + (beta - mean * scale), x.dtype)

        def grad(dy):
            dx, dgamma, dbeta, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=x,
                scale=gamma,
                reserve_space_1=mean,
                reserve_space_2=variance,
                reserve_space_3=tf.zeros([0]),
                epsilon=epsilon,
                is_training=True,
            )
            return dx, dgamma, dbeta

        return outputs, grad

    return normalize(x, gamma, beta), mean, variance


class SyncBatchNormXlaError(RuntimeError):
    """XLA with BatchNorm synchronized over replicas that are not all GPUs (see `check_xla_sync_bn`)."""


def check_xla_sync_bn(devices, replicas: int) -> None:
    """Refuses XLA-compiled synchronized BatchNorm where TensorFlow cannot run it.

    TensorFlow runs a cross-replica all-reduce inside a jit-compiled function
    only when every replica is a GPU (MirroredStrategy's and
    MultiWorkerMirroredStrategy's `_use_merge_call`); elsewhere the all-reduce
    becomes a `merge_call` inside the compiled function, which fails (tried on
    2 CPU replicas with TensorFlow 2.21).

    Args:
      devices: the replicas' device strings (`strategy.extended.worker_devices`).
      replicas: replicas in sync; one replica needs no all-reduce.

    Raises:
      SyncBatchNormXlaError: several replicas, not all of them GPUs.
    """
    if replicas > 1 and not all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices):
        raise SyncBatchNormXlaError(
            f"trainer.jit_compile=true with BatchNorm synchronized over {replicas} replicas on "
            f"{', '.join(devices)}: TensorFlow compiles the cross-replica all-reduce into XLA only when every "
            "replica is a GPU; set trainer.jit_compile=false or model.sync_bn=false"
        )


def sync_batch_norm(x, gamma, beta, epsilon: float, replica_ctx=None):
    """Training-mode BatchNorm of NHWC `x` over the global batch of all replicas.

    One SUM all-reduce per pass. Forward: each replica puts its count, a
    shift (one of its samples), its mean relative to the shift and its sum
    of squared deviations from its mean in its own row of a
    [replicas, 1 + 3C] tensor, so the SUM gathers every replica's
    statistics; they are combined with Chan et al.'s parallel formula (the
    squared deviations of the replica means from the global mean are
    added). That stays exact where E[x^2] - E[x]^2 in float32 loses the
    variance (inputs with mean 1e3 and std 1), and the global mean is kept
    as shift + offset, so x - mean is exact to rounding too. Backward: one packed SUM of (sum dy, sum dy * x_hat) per channel
    gives the input gradient of the global normalization; the gamma and beta
    gradients are this replica's share (the train step sums gradients over
    replicas). Statistics and the normalization run in float32; `x` stays in
    its dtype (the copy the backward keeps).

    Args:
      x: NHWC tensor (float32, float16 or bfloat16).
      gamma: float32 (C,) scale.
      beta: float32 (C,) offset.
      epsilon: added to the variance.
      replica_ctx: the replica context (default: the current one).

    Returns:
      (outputs in x.dtype, global mean, global biased variance), the
      statistics float32 (C,).

    Raises:
      SyncBatchNormXlaError: traced inside XLA on replicas that are not all GPUs.
    """
    replica_ctx = replica_ctx or tf.distribute.get_replica_context()
    replicas = replica_ctx.num_replicas_in_sync
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        # Also checked before training starts (fcn_tf.train_lib.apply_training_settings); this covers other callers.
        check_xla_sync_bn(replica_ctx.strategy.extended.worker_devices, replicas)
    channels = x.shape[-1]
    reduce_axes = [0, 1, 2]
    # Statistics of x - shift, with one sample of this replica as the shift:
    # sums of small deviations, not of large values (float32 holds a mean
    # near 1e3 only to ~3e-5, which would shift every normalized value).
    shift = tf.stop_gradient(tf.cast(x[0, 0, 0], tf.float32))

    def shifted(x):
        return tf.cast(x, tf.float32) - shift

    count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
    local_offset, local_variance = tf.nn.moments(shifted(x), axes=reduce_axes)
    row = tf.concat([count[None], shift, local_offset, local_variance * count], 0)
    replica = tf.cast(replica_ctx.replica_id_in_sync_group, tf.int32)
    rows = tf.scatter_nd(tf.reshape(replica, [1, 1]), row[None], [replicas, 1 + 3 * channels])
    # Statistics are constants to the tape: `normalize`'s gradient accounts
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
    inv_std = tf.math.rsqrt(variance + epsilon)

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        scale = gamma * inv_std
        # From x - shift: x * scale - mean * scale would cancel for x near a large mean.
        outputs = shifted(x) * scale + (beta - mean_from_shift * scale)

        def grad(dy):
            dy = tf.cast(dy, tf.float32)
            # Recomputed rather than kept from the forward: one float32 map less held.
            x_s = shifted(x)
            # sum dy * x_hat = (sum dy * (x - shift) - mean_from_shift * sum dy) / std.
            local_dy = tf.reduce_sum(dy, reduce_axes)
            local_dy_x_hat = (tf.reduce_sum(dy * x_s, reduce_axes) - mean_from_shift * local_dy) * inv_std
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

    return normalize(x, gamma, beta), mean, variance


@keras.saving.register_keras_serializable(package="fcn_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step runs as fused kernels.

    Keras 3 computes BatchNorm in training as separate ops (`moments`, then
    `batch_normalization`), several passes over every feature map;
    `tf.nn.fused_batch_norm` does the forward and the backward in one kernel
    each. Measured on the R50-D8 train step at 512x512: about 3% faster and
    100-180 MB less peak memory (BENCHMARKS.md). With the "cpu_fast" kernels
    under oneDNN, from 1024 channels, the forward is two reductions and one
    multiply-add instead (`_batch_norm_by_reductions`; the backward stays
    fused): oneDNN's fused forward is slow on such wide maps (-0.2 s per
    R50-D8 step). Under mixed precision the fused kernel takes the
    (b)float16 input itself, with float32 statistics, scale and offset.

    Synchronized (`synchronized=True`), the training step is `sync_batch_norm`:
    one packed all-reduce per pass instead of Keras' several.

    The moving statistics are updated exactly as Keras does (with the biased
    batch variance, as Keras' synchronized implementation). Inference,
    masks, renorm and inputs other than 4-D channels-last run Keras' own
    implementation; the variables are the same in every path (checkpoints
    are interchangeable).

    Args:
      *args: as `keras.layers.BatchNormalization`.
      kernels: "auto", "tensorflow" or "cpu_fast" (`resolve_kernels`); the
        resolved value is kept in the config.
      **kwargs: as `keras.layers.BatchNormalization`.
    """

    # False: synchronized layers run Keras' own synchronized implementation
    # (for side-by-side comparisons; same variables and statistics).
    packed_sync = True

    def __init__(self, *args, kernels: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = resolve_kernels(kernels)

    def get_config(self):
        return {**super().get_config(), "kernels": self.kernels}

    def _trains_with_own_kernels(self, inputs, training, mask) -> bool:
        return bool(
            training
            and self.trainable
            and not self.renorm
            and mask is None
            and self.center
            and self.scale
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
        )

    def _can_fuse(self, inputs, training, mask) -> bool:
        return not self.synchronized and self._trains_with_own_kernels(inputs, training, mask)

    def _can_sync(self, inputs, training, mask) -> bool:
        return (
            self.synchronized
            and self.packed_sync
            and tf.distribute.in_cross_replica_context() is False
            and self._trains_with_own_kernels(inputs, training, mask)
        )

    def call(self, inputs, training=None, mask=None):
        gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
        if self._can_sync(inputs, training, mask):
            outputs, mean, variance = sync_batch_norm(inputs, gamma, beta, self.epsilon)
        elif not self._can_fuse(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        elif self.kernels == "cpu_fast" and _onednn() and inputs.shape[-1] >= _ONEDNN_REDUCED_BN_MIN_CHANNELS:
            with tf.name_scope(CPU_KERNEL_SCOPE):
                outputs, mean, variance = _batch_norm_by_reductions(inputs, gamma, beta, self.epsilon)
        else:
            # Statistics in float32 whatever the compute dtype, as Keras; the
            # kernel reads (b)float16 input directly.
            outputs, mean, unbiased_variance, *_ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
            )
            # The kernel returns the Bessel-corrected variance; Keras averages the biased one.
            count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
            variance = unbiased_variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)
