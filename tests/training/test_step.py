"""The distributed train step: 2 replicas == 1 replica on the same global batch.

The 2-replica comparisons run in a fresh subprocess (this file run as a
script with --child) because the CPU must be split into 2 logical devices
before TensorFlow initializes, which the pytest process may already have
done. In-process tests cover gradient accumulation and mixed precision.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from harness.child import child_results, print_result

GLOBAL_BATCH = 4


def _config(**trainer):
    from fcn_tf.config import ExperimentConfig, ModelConfig, OptimizerConfig, TrainerConfig

    return ExperimentConfig(
        name="tiny",
        model=ModelConfig(num_classes=3),
        optimizer=OptimizerConfig(base_lr=0.1, min_lr=1e-4, momentum=0.9, weight_decay=5e-4),
        trainer=TrainerConfig(train_steps=10, aux_weight=0.4, **trainer),
    )


def _ordered_dataset_fn(seed=0):
    """Same examples in the same order: replica r of N gets the r-th slice of each global batch."""
    import tensorflow as tf

    from harness import tiny

    images, labels = tiny.batch(seed, 16)

    def make(ctx=None):
        per_replica = ctx.get_per_replica_batch_size(GLOBAL_BATCH) if ctx else GLOBAL_BATCH
        return (
            tf.data.Dataset.from_tensor_slices((images, labels))
            .repeat()
            .batch(per_replica, drop_remainder=True)
        )

    return make


def run_steps(strategy, initial_weights, config, steps=2, bn=True):
    """Runs `steps` train steps; returns metrics and all model weights after each step."""
    import keras

    from fcn_tf.optimizers import build_optimizer
    from fcn_tf.training import make_train_iterator, make_train_step
    from harness import tiny

    keras.utils.set_random_seed(0)
    with strategy.scope():
        # As build_fcn: synchronized BatchNorm only with more than one replica,
        # so 1 replica runs the fused kernel and 2 replicas Keras' synchronized one.
        model = tiny.tiny_segmenter(sync_bn=strategy.num_replicas_in_sync > 1, bn=bn)
        if initial_weights is not None:
            model.set_weights(initial_weights)
        optimizer = build_optimizer(
            config.optimizer, config.trainer.train_steps, config.trainer.precision, aggregate_gradients=False
        )
        optimizer.build(model.trainable_variables)
    iterator = make_train_iterator(strategy, _ordered_dataset_fn())
    step = make_train_step(model, optimizer, strategy, config)
    history = []
    for _ in range(steps):
        metrics = step(iterator)
        history.append(
            {
                "metrics": {k: float(v) for k, v in metrics.items()},
                "weights": {w.path: np.array(w.numpy()) for w in model.weights},
            }
        )
    return model, history


def _compare(a, b):
    """Largest absolute differences of metrics and weights between two histories."""
    diffs = {}
    for i, (x, y) in enumerate(zip(a, b)):
        for k in x["metrics"]:
            diffs[f"step{i}/{k}"] = abs(x["metrics"][k] - y["metrics"][k])
        for k in x["weights"]:
            diffs[f"step{i}/{k}"] = float(np.max(np.abs(x["weights"][k] - y["weights"][k])))
    return diffs


def _mirrored_resume_diffs(strategy, initial, config):
    """3 steps straight vs 1 step, checkpoint (model, optimizer, iterator), fresh objects, 2 more steps."""
    import tempfile

    import tensorflow as tf

    from fcn_tf.optimizers import build_optimizer
    from fcn_tf.training import make_train_iterator, make_train_step
    from harness import tiny

    def fresh():
        with strategy.scope():
            model = tiny.tiny_segmenter(sync_bn=True)
            model.set_weights(initial)
            optimizer = build_optimizer(config.optimizer, 10, aggregate_gradients=False)
            optimizer.build(model.trainable_variables)
        # A shuffled stream: the restored iterator must continue at the same position.
        iterator = make_train_iterator(strategy, tiny.dataset_fn(GLOBAL_BATCH))
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, iterator=iterator)
        return model, iterator, checkpoint, make_train_step(model, optimizer, strategy, config)

    model, iterator, _, step = fresh()
    for _ in range(3):
        step(iterator)
    straight = {w.path: w.numpy() for w in model.weights}
    model, iterator, checkpoint, step = fresh()
    step(iterator)
    prefix = checkpoint.save(os.path.join(tempfile.mkdtemp(), "ckpt"))
    model, iterator, checkpoint, step = fresh()
    checkpoint.restore(prefix).assert_consumed()
    for _ in range(2):
        step(iterator)
    return {k: float(np.max(np.abs(straight[k] - w.numpy()))) for k, w in zip(straight, model.weights)}


def _child():
    """Runs in a fresh process: 1 replica vs 2 replicas (mirrored over 2 logical CPUs)."""
    from fcn_tf.devices import configure_logical_cpus

    configure_logical_cpus(2)
    import tensorflow as tf

    from harness import tiny

    initial = tiny.tiny_segmenter().get_weights()
    one = tf.distribute.get_strategy()
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert two.num_replicas_in_sync == 2
    config = _config()
    _, single = run_steps(one, initial, config)
    _, double = run_steps(two, initial, config)
    # Gradients, recovered from the first update: w1 = w0 - lr * (g + wd * w0).
    grads = {}
    lr, wd = config.optimizer.base_lr, config.optimizer.weight_decay
    for name, w0 in zip([k for k in single[0]["weights"]], initial):
        if "moving" in name:
            continue
        g1 = (w0 - single[0]["weights"][name]) / lr - wd * w0
        g2 = (w0 - double[0]["weights"][name]) / lr - wd * w0
        grads[name] = float(np.max(np.abs(g1 - g2)))
    moved = {k: float(np.max(np.abs(v - w))) for (k, v), w in zip(single[0]["weights"].items(), initial)}
    # Gradient accumulation on 2 replicas (BN-free model: BN would see micro-batch statistics).
    nobn_initial = tiny.tiny_segmenter(bn=False).get_weights()
    _, full = run_steps(two, nobn_initial, config, bn=False)
    _, accum = run_steps(two, nobn_initial, _config(grad_accum_steps=2), bn=False)
    resume = _mirrored_resume_diffs(two, initial, config)
    print_result(
        {
            "step_diffs": _compare(single, double),
            "grad_diffs": grads,
            "moved": moved,
            "accum_diffs": _compare(full, accum),
            "loss": single[0]["metrics"]["total"],
            "resume_diffs": resume,
        }
    )


@pytest.fixture(scope="module")
def two_replica_results():
    return child_results(__file__, timeout=300)


def test_two_replicas_equal_one_replica_loss_weights_and_bn_stats(two_replica_results):
    diffs = two_replica_results["step_diffs"]
    # Metrics (total/main/aux loss, grad norm) and every weight, moving BN statistics
    # included, after one and two steps (the second exercises momentum).
    assert any("moving_mean" in k for k in diffs) and any("moving_variance" in k for k in diffs)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, (worst, diffs[worst])
    # The comparison is not vacuous: the step moved every weight and BN statistic.
    assert min(two_replica_results["moved"].values()) > 1e-4


def test_two_replicas_equal_one_replica_gradients(two_replica_results):
    grads = two_replica_results["grad_diffs"]
    worst = max(grads, key=grads.get)
    assert grads[worst] < 1e-5, (worst, grads[worst])


def test_two_replica_resume_continues_exactly(two_replica_results):
    diffs = two_replica_results["resume_diffs"]
    assert len(diffs) > 5
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0.0, (worst, diffs[worst])


def test_gradient_accumulation_equals_full_batch(two_replica_results):
    diffs = two_replica_results["accum_diffs"]
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, (worst, diffs[worst])


def test_gradient_accumulation_single_replica():
    import tensorflow as tf

    from harness import tiny

    initial = tiny.tiny_segmenter(bn=False).get_weights()
    strategy = tf.distribute.get_strategy()
    _, full = run_steps(strategy, initial, _config(), bn=False)
    _, accum = run_steps(strategy, initial, _config(grad_accum_steps=4), bn=False)
    diffs = _compare(full, accum)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-6, (worst, diffs[worst])


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step_keeps_float32_loss_and_variables(precision):
    import keras
    import tensorflow as tf

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model, history = run_steps(tf.distribute.get_strategy(), None, _config(precision=precision))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert all(w.dtype == "float32" for w in model.weights)
    for entry in history:
        assert np.isfinite(entry["metrics"]["total"]) and entry["metrics"]["total"] > 0
    # The weights moved (float16: the loss-scaled update was applied, not skipped).
    assert any(
        np.max(np.abs(history[0]["weights"][k] - history[1]["weights"][k])) > 0 for k in history[0]["weights"]
    )


def test_jit_compiled_forward_backward_matches_plain_step():
    import tensorflow as tf

    from harness import tiny

    initial = tiny.tiny_segmenter(sync_bn=False).get_weights()
    strategy = tf.distribute.get_strategy()
    _, plain = run_steps(strategy, initial, _config())
    _, jitted = run_steps(strategy, initial, _config(jit_compile=True))
    diffs = _compare(plain, jitted)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])


if __name__ == "__main__" and "--child" in sys.argv:
    _child()
