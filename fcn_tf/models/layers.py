"""Conv2D and BatchNorm: Keras' layers, with the training step on faster kernels.

Each layer takes `kernels`: "cpu_fast" trains on the CPU-tuned kernels of
`fcn_tf.models.cpu_kernels` (hand-written convolution gradients, wide
BatchNorms by reductions under oneDNN), "tensorflow" on TensorFlow's own
(cuDNN's backprop kernels on a GPU, which XLA can also use) and "auto"
picks "cpu_fast" only when no GPU or TPU is visible (`resolve_kernels`; the
model builders resolve it once and hand the result to every layer). Where
the "cpu_fast" kernels run, whether oneDNN runs is asked once per process
and fixed in each layer when it is built.

BatchNorm trains on fused kernels; synchronized across replicas it
exchanges one packed tensor per pass (`fcn_tf.models.sync_batch_norm`),
or runs Keras' own synchronized implementation when built with
`packed_sync=False` (for side-by-side comparisons; the model builders take
the same argument).

The variables are Keras' own in every path (names, weights and checkpoints
unchanged). The moving variance follows PyTorch's BatchNorm2d and
SyncBatchNorm, not Keras: it averages the unbiased batch variance
(`unbiased_variance`).
"""

from __future__ import annotations

import dataclasses
import functools

import keras
import tensorflow as tf

from fcn_tf import devices
from fcn_tf.config import KERNELS
from fcn_tf.models import cpu_kernels
from fcn_tf.models.sync_batch_norm import sync_batch_norm


@functools.cache
def _onednn_enabled() -> bool:
    # Fixed for the process: TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import.
    return devices.onednn_enabled()


def _onednn_kernels(kernels: str) -> bool:
    # Whether a layer on `kernels` takes the oneDNN variants of the "cpu_fast" kernels.
    return kernels == "cpu_fast" and _onednn_enabled()


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


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """What every Conv2D and BatchNorm of one model shares, decided once by its builder.

    Attributes:
      bn_momentum: BatchNorm momentum in Keras terms (PyTorch's 0.1 is 0.9).
      bn_epsilon: BatchNorm epsilon.
      sync_bn: synchronize BatchNorm statistics across replicas.
      kernels: "auto", "tensorflow" or "cpu_fast"; resolved (`resolve_kernels`)
        when the settings are made, so every layer gets the same kernels.
      packed_sync: False: synchronized BatchNorms run Keras' own implementation
        instead of `fcn_tf.models.sync_batch_norm` (for side-by-side
        comparisons; same variables).
    """

    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    sync_bn: bool = False
    kernels: str = "auto"
    packed_sync: bool = True

    def __post_init__(self):
        object.__setattr__(self, "kernels", resolve_kernels(self.kernels))

    def conv(self, filters: int, kernel_size: int, name: str, **kwargs) -> Conv2D:
        """A Conv2D on these kernels; without bias and He-normal initialized unless `kwargs` say otherwise."""
        kwargs = {"use_bias": False, "kernel_initializer": "he_normal", **kwargs}
        return Conv2D(filters, kernel_size, kernels=self.kernels, name=name, **kwargs)

    def bn(self, name: str) -> BatchNorm:
        """A BatchNorm with these statistics settings and kernels."""
        statistics = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon, synchronized=self.sync_bn)
        return BatchNorm(**statistics, kernels=self.kernels, packed_sync=self.packed_sync, name=name)


@keras.saving.register_keras_serializable(package="fcn_tf")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` using `cpu_kernels.conv2d_same` where it applies.

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
        self._onednn = _onednn_kernels(self.kernels)

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
        return cpu_kernels.conv2d_same(
            tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel), self.dilation_rate[0], self._onednn
        )


@keras.saving.register_keras_serializable(package="fcn_tf")
class BatchNorm(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step runs as fused kernels.

    Keras 3 computes BatchNorm in training as separate ops (`moments`, then
    `batch_normalization`), several passes over every feature map;
    `tf.nn.fused_batch_norm` does the forward and the backward in one kernel
    each. Measured on the R50-D8 train step at 512x512: about 3% faster and
    100-180 MB less peak memory (BENCHMARKS.md). With the "cpu_fast" kernels
    under oneDNN, from 1024 channels, the forward is two reductions and one
    multiply-add instead (`cpu_kernels.batch_norm_by_reductions`; the
    backward stays fused): oneDNN's fused forward is slow on such wide maps
    (-0.2 s per R50-D8 step). Under mixed precision the fused kernel takes the
    (b)float16 input itself, with float32 statistics, scale and offset.

    Synchronized (`synchronized=True`), the training step is `sync_batch_norm`:
    one packed all-reduce per pass instead of Keras' several (unless
    `packed_sync=False`).

    The moving statistics are updated as PyTorch's BatchNorm2d and
    SyncBatchNorm do, the contract of the reference models: the moving mean
    averages the batch mean, the moving variance the *unbiased* batch
    variance (divided by n - 1, n the values per channel over the whole,
    possibly synchronized, batch), on every path and kernel choice. Keras
    averages the biased one, 1 / (n - 1) relative lower: ~1e-3 on the
    deepest maps of the demo's batch, ~1.5e-5 at 512x512 x 16 images, but
    systematic (evaluation inherits it). The training step itself
    normalizes by the biased variance, as both frameworks do. Inference,
    masks, renorm and inputs other than 4-D channels-last run Keras' own
    implementation (renorm keeps Keras' statistics: PyTorch has none); the
    variables are the same in every path (checkpoints are interchangeable).

    Args:
      *args: as `keras.layers.BatchNormalization`.
      kernels: "auto", "tensorflow" or "cpu_fast" (`resolve_kernels`); the
        resolved value is kept in the config.
      packed_sync: False: synchronized, the layer runs Keras' own
        synchronized implementation (for side-by-side comparisons; same
        variables and statistics).
      **kwargs: as `keras.layers.BatchNormalization`.
    """

    def __init__(self, *args, kernels: str = "auto", packed_sync: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = resolve_kernels(kernels)
        self.packed_sync = packed_sync
        self._onednn = _onednn_kernels(self.kernels)

    def get_config(self):
        return {**super().get_config(), "kernels": self.kernels, "packed_sync": self.packed_sync}

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
            outputs, mean, variance, count = sync_batch_norm(inputs, gamma, beta, self.epsilon)
            variance = unbiased_variance(variance, count)
        elif not self._can_fuse(inputs, training, mask):
            return self._keras_call(inputs, training, mask)
        elif cpu_kernels.reduces_batch_norm(inputs.shape[-1], self._onednn):
            outputs, mean, variance = cpu_kernels.batch_norm_by_reductions(inputs, gamma, beta, self.epsilon)
            variance = unbiased_variance(variance, tf.size(inputs) // tf.shape(inputs)[-1])
        else:
            # Statistics in float32 whatever the compute dtype, as Keras; the
            # kernel reads (b)float16 input directly and returns the unbiased
            # (Bessel-corrected) batch variance, the one PyTorch averages.
            outputs, mean, variance, *_ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
            )
        self._update_moving_statistics(mean, variance)
        return tf.cast(outputs, self.compute_dtype)

    def _update_moving_statistics(self, mean, variance):
        # `variance` is the unbiased batch variance (the class docstring).
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))

    def _keras_call(self, inputs, training, mask):
        """Keras' implementation; training, its moving variance averages the unbiased batch variance.

        As `keras.layers.BatchNormalization.call` (statistics and
        normalization in float32, synchronized by Keras' all-reduces when
        `synchronized`), with the count of values per channel over the
        batch, summed over the replicas when synchronized (one more
        all-reduce, of a scalar), to unbias the variance.
        """
        if not (training and self.trainable) or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        mean, variance = self._moments(x, mask)
        if mask is None:
            count = tf.size(x) // tf.shape(x)[self.axis]
        else:
            count = tf.reduce_sum(tf.cast(mask, tf.int32))
        replica_ctx = tf.distribute.get_replica_context()
        # Keras synchronizes the statistics only without a mask.
        if (
            self.synchronized
            and mask is None
            and replica_ctx is not None
            and replica_ctx.num_replicas_in_sync > 1
        ):
            count = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
        self._update_moving_statistics(mean, unbiased_variance(variance, count))
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else None
        beta = tf.cast(self.beta, tf.float32) if self.center else None
        outputs = keras.ops.batch_normalization(
            x, mean, variance, axis=self.axis, offset=beta, scale=gamma, epsilon=self.epsilon
        )
        return tf.cast(outputs, self.compute_dtype)


def unbiased_variance(variance, count):
    """The unbiased (n - 1) variance from the biased `variance` of `count` values per channel.

    What PyTorch's BatchNorm2d and SyncBatchNorm average into `running_var`
    (n = 1 gives 0, the biased variance of one value, where PyTorch refuses).

    Args:
      variance: float32 (C,) biased batch variance.
      count: values per channel over the whole (possibly synchronized) batch.
    """
    count = tf.cast(count, tf.float32)
    return variance * (count / tf.maximum(count - 1.0, 1.0))
