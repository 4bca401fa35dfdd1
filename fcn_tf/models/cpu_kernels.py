"""The "cpu_fast" kernels: hand-written convolution gradients and BatchNorm by reductions.

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

The forward op is TensorFlow's own; only the gradient differs, by float32
rounding (summation order).

With oneDNN on a CPU, two choices depend on the channel count, measured
(constants below): narrow 1x1 filter gradients use oneDNN's own kernel, and
wide BatchNorms compute their statistics by reductions. Whether oneDNN runs
is the caller's argument (`fcn_tf.models.layers` asks the process once):
nothing here reads process state.
"""

from __future__ import annotations

import tensorflow as tf

# Kernel choices made only where oneDNN runs (TF_ENABLE_ONEDNN_OPTS=1 is the
# training default on CPU, see fcn_tf.devices.prefer_onednn), from
# measurements on the project's CPU at the R50-D8 shapes (BENCHMARKS.md).
# Both sides of each choice compute the same values; only the speed differs.
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


def _input_grad(dy, kernel, dilation: int):
    # The flipped kernel depends only on the weights: without the control
    # dependency it is computed when the step starts and held until the
    # backward pass reaches this layer (~90 MB at the R50-D8 training peak).
    with tf.control_dependencies([dy]):
        flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])
    return tf.nn.convolution(dy, flipped, padding="SAME", dilations=dilation)


def filter_grad(x, dy, kernel_size: int, dilation: int, onednn: bool):
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

    Args:
      x: NHWC input of the convolution.
      dy: NHWC gradient of its output.
      kernel_size: k of the (k, k, in, out) kernel, odd.
      dilation: dilation rate (both spatial axes).
      onednn: whether oneDNN's kernels run (narrow 1x1 gradients take its own kernel).
    """
    c_in, c_out = x.shape[-1], dy.shape[-1]
    # Written as an explicit transpose; Grappler may fold it into the matmul
    # (transpose_a), which measured the same on these shapes (BENCHMARKS.md).
    x_t = tf.transpose(tf.reshape(x, [-1, c_in]))
    if kernel_size == 1:
        if onednn_filter_grad(kernel_size, c_in, c_out, onednn):
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


def onednn_filter_grad(kernel_size: int, c_in: int, c_out: int, onednn: bool) -> bool:
    """Whether `filter_grad` runs oneDNN's Conv2DBackpropFilter (else matmuls).

    oneDNN's matmul runs narrow 1x1 products slowly (61-89 GFLOP/s); its own
    1x1 filter-gradient kernel gets 113-136.

    Args:
      kernel_size: k of the (k, k, in, out) kernel.
      c_in: input channels.
      c_out: output channels.
      onednn: whether oneDNN's kernels run.
    """
    return kernel_size == 1 and onednn and min(c_in, c_out) < _ONEDNN_MATMUL_MIN_CHANNELS


def conv2d_same(x, kernel, dilation: int = 1, onednn: bool = False):
    """Stride-1 "same" NHWC convolution with the gradients described above.

    Args:
      x: NHWC input.
      kernel: (k, k, in, out) with an odd k.
      dilation: dilation rate (both spatial axes).
      onednn: whether oneDNN's kernels run (`filter_grad`'s choice).
    """
    kernel_size = kernel.shape[0]

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.convolution(x, kernel, padding="SAME", dilations=dilation)

        def grad(dy):
            with tf.name_scope(CPU_KERNEL_SCOPE):
                return _input_grad(dy, kernel, dilation), filter_grad(x, dy, kernel_size, dilation, onednn)

        return y, grad

    return conv(x, kernel)


def reduces_batch_norm(channels: int, onednn: bool) -> bool:
    """Whether a "cpu_fast" BatchNorm over `channels` trains by `batch_norm_by_reductions`.

    oneDNN's fused forward is slow on wide maps (-0.2 s per R50-D8 step
    from 1024 channels); elsewhere the fused kernel is as fast or faster.

    Args:
      channels: the BatchNorm's channel count.
      onednn: whether oneDNN's kernels run.
    """
    return onednn and channels >= _ONEDNN_REDUCED_BN_MIN_CHANNELS


def batch_norm_by_reductions(x, gamma, beta, epsilon: float):
    """Training-mode BatchNorm of NHWC `x`; returns (outputs, mean, biased variance).

    The layer unbiases the variance for its moving average (`layers.BatchNorm`).

    The statistics are two reductions over all but the channel axis (the
    mean, then the mean squared deviation from it), the output one
    multiply-add per element, and the gradient TensorFlow's fused kernel
    (`FusedBatchNormGradV3`, given the batch mean and biased variance, as the
    fused forward kernel hands them on). Mean and variance are constants to
    the tape here: the fused gradient already includes their dependence on x.

    Args:
      x: NHWC tensor (float32, float16 or bfloat16).
      gamma: float32 (C,) scale.
      beta: float32 (C,) offset.
      epsilon: added to the variance.
    """
    with tf.name_scope(CPU_KERNEL_SCOPE):
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
