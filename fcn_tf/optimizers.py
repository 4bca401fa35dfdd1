"""SGD with momentum and weight decay exactly as PyTorch's `torch.optim.SGD`.

PyTorch (dampening 0, no Nesterov) does, for every parameter:

    g   = grad + weight_decay * w        # L2 added to the gradient
    buf = momentum * buf + g             # buf = g on the first step
    w   = w - lr * buf

Keras' SGD keeps `v = m * v - lr * g; w += v`, i.e. the learning rate is
folded into the velocity. The two agree while lr is constant but differ as
soon as it changes, which the poly schedule does every iteration; and Keras'
`weight_decay` is decoupled (AdamW style), not an L2 gradient term. Hence
this small optimizer.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fcn_tf.config import OptimizerConfig
from fcn_tf.schedules import poly_from_config


class TorchSGD(keras.optimizers.Optimizer):
    """PyTorch-equivalent SGD: L2 into the gradient, then momentum, then lr.

    Args:
      learning_rate: a float or a `LearningRateSchedule` of the iteration.
      momentum: momentum factor (0.9 in the reference).
      l2: weight decay added to the gradient (`l2 * w`) of every variable
        passed to `apply`, biases and BatchNorm parameters included, as the
        reference does.
      aggregate_gradients: sum gradients across replicas inside `apply`
        (Keras' default). The train loop passes False because it all-reduces
        the gradients itself, once, so it can also measure their norm.
      name: optimizer name.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum: float = 0.9,
        l2: float = 0.0,
        aggregate_gradients: bool = True,
        name: str = "torch_sgd",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if l2 < 0.0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.momentum = float(momentum)
        self.l2 = float(l2)
        self.aggregate_gradients = aggregate_gradients

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        if self.l2:
            # PyTorch's weight_decay: an L2 term in the gradient, before momentum.
            # l2 * w depends only on the weights: without the control
            # dependency the executor computes it when the step starts and
            # holds it through the whole forward and backward pass (a
            # weight-sized tensor per layer live at the training peak).
            with tf.control_dependencies([gradient]):
                decay = tf.cast(self.l2, dtype) * variable
            gradient = gradient + decay
        buf = self.momentums[self._get_variable_index(variable)]
        # One fused kernel: buf = momentum * buf + g; w -= lr * buf (PyTorch's
        # order; the buffer starts at zero, so the first step gives buf = g).
        # Written as separate ops, Grappler's arithmetic optimizer regroups
        # `momentum * buf + (g + l2 * w)` into a sum whose operand order can
        # differ between processes, and MultiWorkerMirroredStrategy workers
        # drifted apart by an ulp from identical all-reduced gradients.
        tf.raw_ops.ResourceApplyMomentum(
            var=_handle(variable),
            accum=_handle(buf),
            lr=tf.cast(learning_rate, dtype),
            grad=gradient,
            momentum=tf.cast(self.momentum, dtype),
            use_locking=False,
            use_nesterov=False,
        )

    def _all_reduce_sum_gradients(self, grads_and_vars):
        if self.aggregate_gradients:
            return super()._all_reduce_sum_gradients(grads_and_vars)
        return list(grads_and_vars)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, l2=self.l2, aggregate_gradients=self.aggregate_gradients)
        return config


def _handle(variable):
    """The resource handle of a Keras or TensorFlow (possibly distributed) variable.

    Inside `strategy.extended.update` a distributed variable gives the handle of
    the component on the device being updated.
    """
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def build_optimizer(
    config: OptimizerConfig, train_steps: int, precision: str = "float32", aggregate_gradients: bool = True
) -> keras.optimizers.Optimizer:
    """The experiment's optimizer: `TorchSGD` on the poly schedule.

    Create it inside `strategy.scope()` and `build()` it on the model's
    trainable variables before the first traced step: otherwise the optimizer
    creates its slot variables inside the traced function, and the first step
    under MirroredStrategy fails with "You must feed a value for placeholder
    tensor 'cond/else/.../Placeholder'".

    Args:
      config: the optimizer section of the experiment.
      train_steps: iterations of the whole run (the poly horizon).
      precision: the trainer precision; "mixed_float16" wraps the optimizer
        in a dynamic `LossScaleOptimizer` (bfloat16 needs no loss scaling).
      aggregate_gradients: see `TorchSGD`.
    """
    optimizer = TorchSGD(
        learning_rate=poly_from_config(config, train_steps),
        momentum=config.momentum,
        l2=config.weight_decay,
        aggregate_gradients=aggregate_gradients,
    )
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
