"""fcn_tf.models.layers: the convolution with hand-written gradients and the fused BatchNorm."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.models import cpu_kernels, layers
from fcn_tf.models.layers import BatchNorm, Conv2D
from harness.graphs import traced_graph

# Graphs whose ops follow the kernel choice: .ci/run also runs them with oneDNN on and off.
pytestmark = pytest.mark.kernels


def _relative(a, b):
    return float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(b)))


def _op_types(fn, *args):
    return {op.type for op in traced_graph(fn, *args).get_operations()}


@pytest.mark.parametrize(
    "kwargs,fast",
    [
        (dict(kernel_size=3, padding="same"), True),
        (dict(kernel_size=1), True),
        (dict(kernel_size=3, padding="same", dilation_rate=4), True),
        (dict(kernel_size=3, strides=2), False),
        (dict(kernel_size=3, padding="valid"), False),
        (dict(kernel_size=(1, 3), padding="same"), False),
        (dict(kernel_size=2, padding="same"), False),
    ],
)
def test_layer_uses_the_fast_gradient_only_where_it_is_exact(kwargs, fast):
    layer = Conv2D(4, **kwargs)
    assert layer._fast_backward() is fast
    reference = keras.layers.Conv2D(4, **kwargs)
    x = tf.random.stateless_normal([2, 10, 10, 3], seed=[5, 6])
    reference.build(x.shape)
    layer.build(x.shape)
    layer.set_weights(reference.get_weights())
    # Same variables (names and shapes) as Keras' layer: checkpoints and the
    # converter see no difference.
    assert [v.path.split("/")[-1] for v in layer.weights] == [
        v.path.split("/")[-1] for v in reference.weights
    ]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        got, want = layer(x), reference(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6)
    for g, w in zip(
        tape.gradient(got, [x, *layer.trainable_weights]),
        tape.gradient(want, [x, *reference.trainable_weights]),
    ):
        assert _relative(g, w) < 1e-5


def test_layer_config_round_trips():
    layer = Conv2D(8, 3, padding="same", dilation_rate=2, use_bias=False, name="c")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is Conv2D
    assert restored.get_config() == layer.get_config()


def _batch_norm_pair():
    fused, keras_bn = (
        BatchNorm(momentum=0.9, epsilon=1e-5),
        keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
    )
    rng = np.random.default_rng(7)
    for layer in (fused, keras_bn):
        layer.build((None, None, None, 8))
    gamma, beta = rng.normal(1, 0.1, 8).astype(np.float32), rng.normal(0, 1, 8).astype(np.float32)
    mean, var = rng.normal(0, 1, 8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    for layer in (fused, keras_bn):
        layer.set_weights([gamma, beta, mean, var])
    return fused, keras_bn


def test_batch_norm_training_step_equals_keras(kernel_choices):
    fused, keras_bn = _batch_norm_pair()
    rng = np.random.default_rng(8)
    x = tf.constant(rng.normal(2, 3, (4, 5, 6, 8)).astype(np.float32))
    weights = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    grads = []
    for layer in (fused, keras_bn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * weights)
        grads.append((y, tape.gradient(loss, [x, *layer.trainable_weights])))
    (y_fused, g_fused), (y_keras, g_keras) = grads
    assert _relative(y_fused, y_keras) < 1e-6
    for a, b in zip(g_fused, g_keras):
        assert _relative(a, b) < 1e-5
    # The moving mean as Keras; the moving variance as PyTorch (unbiased, see below).
    np.testing.assert_allclose(fused.moving_mean.numpy(), keras_bn.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
    # Inference uses the moving statistics in both (given the same ones).
    keras_bn.moving_variance.assign(fused.moving_variance)
    np.testing.assert_allclose(
        fused(x, training=False).numpy(), keras_bn(x, training=False).numpy(), atol=1e-5
    )


def pytorch_running_statistics(mean, var, batches, momentum=0.1):
    """PyTorch's BatchNorm2d / SyncBatchNorm update of (running_mean, running_var), float64, NHWC batches.

    running_var averages the unbiased batch variance (n - 1, n values per
    channel over the whole batch); `momentum` is PyTorch's (Keras' 0.9).
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    for x in batches:
        flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        mean = (1 - momentum) * mean + momentum * flat.mean(0)
        var = (1 - momentum) * var + momentum * flat.var(0, ddof=1)
    return mean, var


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"synchronized": True}, {"synchronized": True, "packed_sync": False}],
    ids=["fused", "packed_sync", "keras_sync"],
)
def test_moving_variance_is_pytorchs_after_a_few_steps(kwargs, kernel_choices):
    # Fused or by reductions (kernel_choices "onednn"), the packed synchronized
    # path and Keras' own on one replica; 2 replicas: tests/models/test_sync_batch_norm.py.
    layer, _ = _batch_norm_pair()
    if kwargs:
        layer = BatchNorm(momentum=0.9, epsilon=1e-5, **kwargs)
        layer.build((None, None, None, 8))
        layer.set_weights(_batch_norm_pair()[0].get_weights())
    start = [w.copy() for w in layer.get_weights()[2:]]
    rng = np.random.default_rng(9)
    # 2 x 3 x 4 = 24 values per channel: n / (n - 1) is 4% off the biased variance.
    batches = [rng.normal(2, 3, (2, 3, 4, 8)).astype(np.float32) for _ in range(3)]
    for x in batches:
        layer(tf.constant(x), training=True)
    want_mean, want_var = pytorch_running_statistics(*start, batches)
    np.testing.assert_allclose(layer.moving_mean.numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), want_var, rtol=1e-5)


def test_batch_norm_falls_back_to_keras_where_it_cannot_fuse():
    x = tf.zeros([2, 4, 4, 8])
    fused = BatchNorm()
    fused.build(x.shape)
    assert fused._can_fuse(x, True, None)
    assert not fused._can_fuse(x, False, None)
    assert not fused._can_fuse(tf.zeros([2, 8]), True, None)
    assert not BatchNorm(synchronized=True)._can_fuse(x, True, None)
    frozen = BatchNorm()
    frozen.build(x.shape)
    frozen.trainable = False
    assert not frozen._can_fuse(x, True, None)


def test_kernel_choices_follow_onednn_and_channel_counts(monkeypatch):
    def conv_ops(c_in, c_out):
        layer = Conv2D(c_out, 1, kernels="cpu_fast")
        layer.build((None, None, None, c_in))

        def step(x):
            with tf.GradientTape() as tape:
                y = layer(x)
            return tape.gradient(y, layer.kernel)

        return _op_types(step, tf.zeros([1, 4, 4, c_in]))

    def batch_norm_ops(channels):
        layer = BatchNorm()
        layer.build((None, None, None, channels))

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, x)

        return _op_types(step, tf.zeros([1, 2, 2, channels]))

    wide = cpu_kernels._ONEDNN_REDUCED_BN_MIN_CHANNELS
    for onednn in (False, True):
        # Asked when the layer is built.
        monkeypatch.setattr(layers, "_onednn_enabled", lambda onednn=onednn: onednn)
        # 1x1 filter gradients (`cpu_kernels.filter_grad`): oneDNN's conv kernel for narrow products.
        narrow = conv_ops(1024, 256)
        assert ("Conv2DBackpropFilter" in narrow) is onednn
        assert ("MatMul" in narrow) is not onednn
        # BatchNorm: reductions + fused gradient only from `wide` channels under oneDNN.
        assert "FusedBatchNormV3" in batch_norm_ops(wide // 2)
        wide_ops = batch_norm_ops(wide)
        assert ("FusedBatchNormV3" in wide_ops) is not onednn
        assert "FusedBatchNormGradV3" in wide_ops


def test_layers_with_onednn_kernels(rerun_with_onednn):
    rerun_with_onednn(__file__)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fused_batch_norm_reads_the_compute_dtype_under_mixed_precision(dtype, kernel_choices):
    # The kernel takes (b)float16 input with float32 statistics: no float32
    # copy of the input is made, nor kept for the backward.
    layer = BatchNorm(momentum=0.9, epsilon=1e-5, dtype=f"mixed_{dtype}")
    layer.build((None, None, None, 8))
    x = tf.cast(tf.random.stateless_normal([2, 5, 6, 8], seed=[1, 2]) * 3 + 2, dtype)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, x, output_gradients=tf.ones_like(y) * tf.cast(2.0, y.dtype))

    graph = traced_graph(step, x)
    fused = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]
    assert fused and all(op.get_attr("T") == tf.as_dtype(dtype) for op in fused)
    assert all(op.get_attr("U") == tf.float32 for op in fused)
    casts_of_input = [
        op for op in graph.get_operations() if op.type == "Cast" and op.inputs[0].op.type == "Placeholder"
    ]
    onednn_wide = kernel_choices == "onednn"  # the reductions path casts for its (transient) moments
    assert bool(casts_of_input) is onednn_wide
    y, dx = step(x)
    assert y.dtype == tf.as_dtype(dtype) and dx.dtype == tf.as_dtype(dtype)
    reference = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    want = reference(tf.cast(x, tf.float32), training=True)
    # The bound is (b)float16 rounding, not the algorithm: bfloat16 keeps 8 mantissa bits
    # (relative 2^-8 = 3.9e-3), so unit-scale outputs up to ~4 round by up to ~0.016, and the
    # statistics, computed in float32, are of the already-rounded input (so the moving mean and
    # variance carry the same 1e-2 relative bound). The float32 path, its moving variance
    # included, is held to float32 rounding (rtol 1e-5) by the tests above.
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), want.numpy(), atol=0.05)
    np.testing.assert_allclose(layer.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-2, atol=1e-2)
    _, want_var = pytorch_running_statistics(0.0, 1.0, [tf.cast(x, tf.float32).numpy()])
    np.testing.assert_allclose(layer.moving_variance.numpy(), want_var, rtol=1e-2)
