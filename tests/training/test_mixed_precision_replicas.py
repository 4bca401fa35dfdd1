"""Mixed precision on 2 replicas: 3 steps run; a float16 step whose gradient overflows is skipped on every replica.

Runs as a child process (`--child`): two logical CPU devices must be set
before TensorFlow initializes. The step is `fcn_tf.training.step`'s: the
LossScaleOptimizer applies inside the cross-replica `cond` that skips a
non-finite update.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from harness.child import child_results, print_result

STEPS = 3
OVERFLOW_STEP = 2


def _dataset_fn(ctx):
    import tensorflow as tf

    from harness import tiny

    images, labels = tiny.batch(seed=0, size=4 * STEPS, hw=8)
    # Step 2's images are large: finite float16 logits, but a gradient x the loss scale
    # (32768) beyond float16's 65504.
    images[4 * (OVERFLOW_STEP - 1) : 4 * OVERFLOW_STEP] *= 1000.0
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds.batch(ctx.get_per_replica_batch_size(4), drop_remainder=True)


def _run(precision: str) -> dict:
    import keras
    import tensorflow as tf

    from fcn_tf.config import ExperimentConfig, ModelConfig, TrainerConfig, override
    from fcn_tf.optimizers import build_optimizer
    from fcn_tf.training import make_train_iterator, make_train_step
    from harness import tiny

    keras.mixed_precision.set_global_policy(precision)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    config = ExperimentConfig(
        name="tiny",
        model=ModelConfig(num_classes=tiny.NUM_CLASSES),
        trainer=TrainerConfig(precision=precision),
    )
    config = override(config, "data.global_batch_size=4", f"trainer.train_steps={STEPS}")
    with strategy.scope():
        # No BatchNorm: it would normalize step 2's large inputs (and their gradient) away.
        model = tiny.tiny_segmenter(bn=False)
        optimizer = build_optimizer(config.optimizer, STEPS, precision, aggregate_gradients=False)
        optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, strategy, config)
    iterator = make_train_iterator(strategy, _dataset_fn)

    def replicas():
        """Every trainable variable's value on each replica."""
        return [
            [r.numpy() for r in strategy.experimental_local_results(v.value)]
            for v in model.trainable_variables
        ]

    def scale():
        return float(optimizer.dynamic_scale.numpy()) if hasattr(optimizer, "dynamic_scale") else None

    history = [(replicas(), scale())]
    losses = []
    for k in range(1, STEPS + 1):
        losses.append(float(step(iterator, k)["total"]))
        history.append((replicas(), scale()))
    result = {"losses": losses, "scales": [s for _, s in history], "bad_step": int(step.bad_step.numpy())}
    # changed[k-1]: step k changed the weights; agree[k]: the replicas hold the same weights after step k.
    result["changed"] = [
        any(not np.array_equal(a[0], b[0]) for a, b in zip(history[k - 1][0], history[k][0]))
        for k in range(1, STEPS + 1)
    ]
    result["agree"] = [all(np.array_equal(v[0], v[1]) for v in weights) for weights, _ in history]
    keras.mixed_precision.set_global_policy("float32")
    return result


def _child():
    from fcn_tf.devices import configure_logical_cpus

    configure_logical_cpus(2)
    print_result({p: _run(p) for p in ("mixed_float16", "mixed_bfloat16")})


@pytest.mark.slow
def test_mixed_precision_on_two_replicas_skips_an_overflowing_step_on_every_replica():
    results = child_results(os.path.abspath(__file__))
    f16 = results["mixed_float16"]
    assert all(np.isfinite(f16["losses"])), f16
    assert f16["bad_step"] == 0, "the loss stayed finite: the step's own non-finite stop is not involved"
    assert f16["changed"][OVERFLOW_STEP - 1] is False, f16  # skipped on every replica (agree below)
    assert f16["scales"][OVERFLOW_STEP] == f16["scales"][OVERFLOW_STEP - 1] / 2, f16["scales"]
    assert f16["changed"][OVERFLOW_STEP] is True, f16  # the next step applies again
    assert all(f16["agree"]), f16
    bf16 = results["mixed_bfloat16"]
    assert all(np.isfinite(bf16["losses"])) and all(bf16["changed"]) and all(bf16["agree"]), bf16


if __name__ == "__main__" and "--child" in sys.argv:
    _child()
