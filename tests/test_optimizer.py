"""TorchSGD == PyTorch's SGD(momentum, weight_decay) computed by hand, with a changing lr."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.config import OptimizerConfig
from fcn_tf.optimizers import TorchSGD, build_optimizer
from harness.graphs import ancestors, traced_graph


class _Lrs(keras.optimizers.schedules.LearningRateSchedule):
    """0.1 at iteration 0, 0.05 at iteration 1: a changing rate exposes Keras' momentum form."""

    def __call__(self, step):
        return tf.where(tf.equal(step, 0), 0.1, 0.05)


def test_two_steps_match_hand_computed_pytorch_update():
    w0 = np.array([1.0, -2.0, 0.5], np.float32)
    g1 = np.array([0.3, 0.1, -0.2], np.float32)
    g2 = np.array([-0.1, 0.4, 0.2], np.float32)
    m, wd, lr1, lr2 = 0.9, 5e-4, 0.1, 0.05
    # PyTorch: d = g + wd * w; buf = m * buf + d (buf = d at first); w -= lr * buf.
    d1 = g1 + wd * w0
    buf1 = d1
    w1 = w0 - lr1 * buf1
    d2 = g2 + wd * w1
    buf2 = m * buf1 + d2
    w2 = w1 - lr2 * buf2

    var = tf.Variable(w0)
    opt = TorchSGD(learning_rate=_Lrs(), momentum=m, l2=wd)
    opt.build([var])
    opt.apply([tf.constant(g1)], [var])
    np.testing.assert_allclose(var.numpy(), w1, rtol=1e-6)
    opt.apply([tf.constant(g2)], [var])
    np.testing.assert_allclose(var.numpy(), w2, rtol=1e-6)

    # Keras' own SGD (v = m*v - lr*g) gives a different second step when lr changes.
    keras_var = tf.Variable(w0)
    keras_opt = keras.optimizers.SGD(learning_rate=_Lrs(), momentum=m)
    keras_opt.build([keras_var])
    keras_opt.apply([tf.constant(d1)], [keras_var])
    keras_opt.apply([tf.constant(g2 + wd * keras_var.numpy())], [keras_var])
    assert not np.allclose(keras_var.numpy(), w2, rtol=1e-6)


def test_weight_decay_applies_to_every_variable():
    """Zero gradient still shrinks weights, biases and BN parameters alike (the reference's choice)."""
    variables = [tf.Variable([2.0]), tf.Variable([3.0])]
    opt = TorchSGD(learning_rate=0.1, momentum=0.9, l2=0.01)
    opt.build(variables)
    opt.apply([tf.zeros([1]), tf.zeros([1])], variables)
    np.testing.assert_allclose(
        [v.numpy()[0] for v in variables], [2.0 - 0.1 * 0.02, 3.0 - 0.1 * 0.03], rtol=1e-6
    )


def test_build_optimizer_uses_poly_and_loss_scaling():
    config = OptimizerConfig(base_lr=0.01, min_lr=1e-4, momentum=0.9, weight_decay=5e-4)
    opt = build_optimizer(config, 100)
    assert isinstance(opt, TorchSGD) and opt.l2 == pytest.approx(5e-4)
    var = tf.Variable([1.0])
    opt.build([var])
    assert float(opt.learning_rate) == pytest.approx(0.01)
    scaled = build_optimizer(config, 100, precision="mixed_float16")
    assert isinstance(scaled, keras.optimizers.LossScaleOptimizer)
    assert isinstance(scaled.inner_optimizer, TorchSGD)


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        TorchSGD(momentum=1.5)
    with pytest.raises(ValueError, match="l2"):
        TorchSGD(l2=-1.0)


def test_weight_decay_term_waits_for_the_gradient():
    # l2 * w needs only the weights; made before the gradient exists, the
    # executor would compute it when the step starts and hold it through the
    # forward and backward pass (124 MB at the R50-D8 training peak).
    var = tf.Variable(tf.ones([4]))
    opt = TorchSGD(learning_rate=0.1, momentum=0.9, l2=5e-4)
    opt.build([var])

    def step(g):
        opt.apply([tf.multiply(g, 2.0, name="gradient")], [var])

    graph = traced_graph(step, tf.TensorSpec([4]))
    decay = [
        op
        for op in graph.get_operations()
        if op.type == "Mul" and any(i.op.type == "ReadVariableOp" for i in op.inputs)
    ]
    assert len(decay) == 1
    assert graph.get_operation_by_name("gradient") in ancestors(decay[0])
