"""fcn_tf.models.layers: the convolution with hand-written gradients and the fused BatchNorm."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.models import layers
from fcn_tf.models.layers import BatchNorm, Conv2D, conv2d_same
from harness.graphs import ancestors, traced_graph

# (batch, height, width, in, out, kernel, dilation): odd and even sizes, 1x1,
# dilations up to larger than the feature map.
CASES = [
    (2, 9, 7, 5, 6, 3, 1),
    (1, 12, 10, 4, 3, 3, 2),
    (2, 16, 16, 8, 4, 3, 4),
    (2, 5, 6, 3, 7, 1, 1),
    (1, 3, 3, 2, 2, 3, 4),
    (2, 8, 8, 6, 6, 5, 2),
]


def _relative(a, b):
    return float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(b)))


@pytest.fixture(params=["plain", "onednn", "rowwise"])
def kernel_choices(request, monkeypatch):
    """Runs a test with each of the layers' size-dependent kernel choices.

    Two are taken from whether oneDNN runs (`layers._onednn`); both sides
    compute the same values with any TensorFlow build, so both are checked
    here on whatever kernels this process has. "onednn" also drops the
    BatchNorm threshold to the tests' 8 channels; "rowwise" gathers every
    filter gradient one kernel row at a time.
    """
    onednn = request.param == "onednn"
    monkeypatch.setattr(layers, "_onednn", lambda: onednn)
    if onednn:
        monkeypatch.setattr(layers, "_ONEDNN_REDUCED_BN_MIN_CHANNELS", 8)
    if request.param == "rowwise":
        monkeypatch.setattr(layers, "_FILTER_GRAD_ROWWISE_MIN_WIDTH", 1)
    return request.param


def _op_types(fn, *args):
    return {op.type for op in traced_graph(fn, *args).get_operations()}


@pytest.mark.parametrize("n,h,w,c_in,c_out,k,d", CASES)
def test_conv2d_same_matches_tensorflow_forward_and_gradients(n, h, w, c_in, c_out, k, d, kernel_choices):
    rng = np.random.default_rng(k * 10 + d)
    x = tf.constant(rng.normal(size=(n, h, w, c_in)).astype(np.float32))
    kernel = tf.constant(rng.normal(size=(k, k, c_in, c_out)).astype(np.float32))
    dy = tf.constant(rng.normal(size=(n, h, w, c_out)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel])
        expected = tf.nn.convolution(x, kernel, padding="SAME", dilations=d)
        got = conv2d_same(x, kernel, d)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    want_dx, want_dw = tape.gradient(expected, [x, kernel], output_gradients=dy)
    got_dx, got_dw = tape.gradient(got, [x, kernel], output_gradients=dy)
    assert got_dx.shape == want_dx.shape and got_dw.shape == want_dw.shape
    assert _relative(got_dx, want_dx) < 1e-5
    assert _relative(got_dw, want_dw) < 1e-5


def test_conv2d_same_inside_tf_function_with_unknown_spatial_size():
    kernel = tf.random.stateless_normal([3, 3, 4, 2], seed=[1, 2])

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4])])
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            loss = tf.reduce_sum(conv2d_same(x, kernel, 2) ** 2)
        return tape.gradient(loss, [x, kernel])

    x = tf.random.stateless_normal([2, 11, 6, 4], seed=[3, 4])
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        loss = tf.reduce_sum(tf.nn.convolution(x, kernel, padding="SAME", dilations=2) ** 2)
    want_dx, want_dw = tape.gradient(loss, [x, kernel])
    got_dx, got_dw = grads(x)
    assert _relative(got_dx, want_dx) < 1e-5
    assert _relative(got_dw, want_dw) < 1e-5


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
    # Moving statistics updated as Keras does (momentum 0.9, biased variance).
    flat = x.numpy().reshape(-1, 8)
    np.testing.assert_allclose(fused.moving_mean.numpy(), keras_bn.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), keras_bn.moving_variance.numpy(), rtol=1e-5)
    start_var = _batch_norm_pair()[0].moving_variance.numpy()
    np.testing.assert_allclose(fused.moving_variance.numpy(), 0.9 * start_var + 0.1 * flat.var(0), rtol=1e-5)
    # Inference uses the moving statistics in both.
    np.testing.assert_allclose(
        fused(x, training=False).numpy(), keras_bn(x, training=False).numpy(), atol=1e-5
    )


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
    def filter_grad_ops(c_in, c_out):
        x = tf.zeros([1, 4, 4, c_in])
        dy = tf.zeros([1, 4, 4, c_out])
        return _op_types(lambda x, dy: layers._filter_grad(x, dy, 1, 1), x, dy)

    def batch_norm_ops(channels):
        layer = BatchNorm()
        layer.build((None, None, None, channels))

        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, x)

        return _op_types(step, tf.zeros([1, 2, 2, channels]))

    wide = layers._ONEDNN_REDUCED_BN_MIN_CHANNELS
    for onednn in (False, True):
        monkeypatch.setattr(layers, "_onednn", lambda onednn=onednn: onednn)
        # 1x1 filter gradients: oneDNN's conv kernel only for narrow products under oneDNN.
        narrow = filter_grad_ops(1024, 256)
        assert ("Conv2DBackpropFilter" in narrow) is onednn
        assert ("MatMul" in narrow) is not onednn
        assert "Conv2DBackpropFilter" not in filter_grad_ops(512, 512)
        # BatchNorm: reductions + fused gradient only from `wide` channels under oneDNN.
        assert "FusedBatchNormV3" in batch_norm_ops(wide // 2)
        wide_ops = batch_norm_ops(wide)
        assert ("FusedBatchNormV3" in wide_ops) is not onednn
        assert "FusedBatchNormGradV3" in wide_ops


def test_flipped_kernel_of_the_input_gradient_waits_for_the_output_gradient():
    # It needs only the weights: made earlier, it would be computed when the
    # step starts and held until the backward pass reaches the layer.
    kernel = tf.zeros([3, 3, 2, 4])

    def input_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv2d_same(x, kernel, 2)
        return tape.gradient(y, x, output_gradients=tf.multiply(tf.ones_like(y), 3.0, name="dy"))

    graph = traced_graph(input_grad, tf.zeros([1, 5, 5, 2]))
    flips = [op for op in graph.get_operations() if op.type == "ReverseV2"]
    assert len(flips) == 1
    assert graph.get_operation_by_name("dy") in ancestors(flips[0])


def test_wide_filter_gradients_are_gathered_one_kernel_row_at_a_time():
    def gathers(c_out, k=3):
        x, dy = tf.zeros([1, 4, 4, 2]), tf.zeros([1, 4, 4, c_out])
        graph = traced_graph(lambda x, dy: layers._filter_grad(x, dy, k, 1), x, dy)
        return [op for op in graph.get_operations() if op.type == "GatherV2"]

    width = layers._FILTER_GRAD_ROWWISE_MIN_WIDTH
    assert len(gathers(width // 9 - 1)) == 1
    rowwise = gathers(width // 9)
    assert len(rowwise) == 3
    # Each row's copy waits for the previous row's product, so only one is alive.
    waits = [{op.type for op in ancestors(gather)} for gather in rowwise]
    assert ["MatMul" in types for types in waits] == [False, True, True]


@pytest.mark.skipif(os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1", reason="this process already runs oneDNN")
def test_layers_with_onednn_kernels():
    # The training default on CPU (fcn_tf.devices.prefer_onednn): the same
    # tests in a process whose kernels, and so whose kernel choices, are oneDNN's.
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1")
    code = "from fcn_tf.devices import onednn_enabled; assert onednn_enabled()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


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
    # statistics, computed in float32, are of the already-rounded input. The float32 path is
    # held to float32 rounding by the tests above.
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), want.numpy(), atol=0.05)
    np.testing.assert_allclose(layer.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-2, atol=1e-2)
