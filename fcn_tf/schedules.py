"""The reference's poly learning-rate schedule, updated every iteration.

`lr(step) = (base_lr - min_lr) * (1 - step / train_steps) ** power + min_lr`
(sssegmentation / mmsegmentation "poly" with `min_lr`), optionally preceded by
a linear warmup from `warmup_start_factor * lr(0)` to the poly curve.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fcn_tf.config import OptimizerConfig


class PolySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Poly decay with a floor and an optional linear warmup.

    Args:
      base_lr: learning rate at step 0 (after warmup).
      train_steps: total iterations; the rate reaches `min_lr` there.
      min_lr: floor added to the decayed part.
      power: exponent of the decay (0.9 in the reference).
      warmup_steps: iterations of linear warmup (0: none).
      warmup_start_factor: the warmup starts at this fraction of the poly
        rate and grows linearly to 1 over `warmup_steps`.
    """

    def __init__(
        self,
        base_lr: float,
        train_steps: int,
        min_lr: float = 0.0,
        power: float = 0.9,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.1,
    ):
        if train_steps <= 0:
            raise ValueError(f"train_steps must be > 0, got {train_steps}")
        if warmup_steps < 0 or warmup_steps > train_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must be in [0, train_steps={train_steps}]")
        self.base_lr = float(base_lr)
        self.train_steps = int(train_steps)
        self.min_lr = float(min_lr)
        self.power = float(power)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)

    def __call__(self, step):
        # Keras passes `optimizer.iterations` (int64); compute in float64 so the
        # rate at step 160k is exact, and clip past the end (a resumed run with
        # a longer horizon never sees a negative base).
        step = tf.cast(step, tf.float64)
        progress = tf.minimum(step / self.train_steps, 1.0)
        lr = (self.base_lr - self.min_lr) * tf.pow(1.0 - progress, self.power) + self.min_lr
        if self.warmup_steps > 0:
            alpha = tf.minimum(step / self.warmup_steps, 1.0)
            factor = self.warmup_start_factor + (1.0 - self.warmup_start_factor) * alpha
            lr = lr * factor
        return tf.cast(lr, tf.float32)

    def get_config(self):
        return dict(
            base_lr=self.base_lr,
            train_steps=self.train_steps,
            min_lr=self.min_lr,
            power=self.power,
            warmup_steps=self.warmup_steps,
            warmup_start_factor=self.warmup_start_factor,
        )


def poly_from_config(config: OptimizerConfig, train_steps: int) -> PolySchedule:
    """The schedule of an experiment.

    Args:
      config: the experiment's optimizer section.
      train_steps: `config.trainer.train_steps` (optimizer iterations).
    """
    return PolySchedule(
        base_lr=config.base_lr,
        train_steps=train_steps,
        min_lr=config.min_lr,
        power=config.power,
        warmup_steps=config.warmup_steps,
        warmup_start_factor=config.warmup_start_factor,
    )
