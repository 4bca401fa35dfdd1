"""fcn_tf.models.cpu_kernels: the hand-written convolution gradients and their size-dependent choices."""

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.models import cpu_kernels
from fcn_tf.models.cpu_kernels import conv2d_same
from harness.graphs import ancestors, traced_graph

# Graphs whose ops follow the kernel choice: .ci/run also runs them with oneDNN on and off.
pytestmark = pytest.mark.kernels

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
        got = conv2d_same(x, kernel, d, onednn=kernel_choices == "onednn")
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


def test_filter_gradient_choices_follow_onednn_and_channel_counts():
    def filter_grad_ops(c_in, c_out, onednn):
        x = tf.zeros([1, 4, 4, c_in])
        dy = tf.zeros([1, 4, 4, c_out])
        return _op_types(lambda x, dy: cpu_kernels.filter_grad(x, dy, 1, 1, onednn), x, dy)

    for onednn in (False, True):
        # 1x1 filter gradients: oneDNN's conv kernel only for narrow products under oneDNN.
        narrow = filter_grad_ops(1024, 256, onednn)
        assert ("Conv2DBackpropFilter" in narrow) is onednn
        assert ("MatMul" in narrow) is not onednn
        assert "Conv2DBackpropFilter" not in filter_grad_ops(512, 512, onednn)


def test_batch_norm_by_reductions_only_from_the_threshold_under_onednn():
    wide = cpu_kernels._ONEDNN_REDUCED_BN_MIN_CHANNELS
    assert cpu_kernels.reduces_batch_norm(wide, onednn=True)
    assert not cpu_kernels.reduces_batch_norm(wide - 1, onednn=True)
    assert not cpu_kernels.reduces_batch_norm(wide, onednn=False)


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
        graph = traced_graph(lambda x, dy: cpu_kernels.filter_grad(x, dy, k, 1, onednn=False), x, dy)
        return [op for op in graph.get_operations() if op.type == "GatherV2"]

    width = cpu_kernels._FILTER_GRAD_ROWWISE_MIN_WIDTH
    assert len(gathers(width // 9 - 1)) == 1
    rowwise = gathers(width // 9)
    assert len(rowwise) == 3
    # Each row's copy waits for the previous row's product, so only one is alive.
    waits = [{op.type for op in ancestors(gather)} for gather in rowwise]
    assert ["MatMul" in types for types in waits] == [False, True, True]


def test_cpu_kernels_with_onednn_kernels(rerun_with_onednn):
    rerun_with_onednn(__file__)
