"""The training loop's contracts: no host read of the loss on non-logging steps, a non-finite
update skipped in the graph, ordered gradient accumulation, and the resume rules of the
per-worker input positions (worker count, workdirs of the older single-checkpoint layout)."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf import training
from fcn_tf.config import ExperimentConfig, ModelConfig, OptimizerConfig, TrainerConfig, override
from fcn_tf.optimizers import build_optimizer
from harness import tiny
from harness.graphs import ancestors, weight_gradient_op_types


def _config(**trainer):
    values = dict(train_steps=8, log_every=1, checkpoint_every=2, image_summary_every=0)
    values.update(trainer)
    config = ExperimentConfig(
        name="tiny",
        model=ModelConfig(num_classes=3),
        optimizer=OptimizerConfig(base_lr=0.01),
        trainer=TrainerConfig(**values),
    )
    return override(config, "data.global_batch_size=4")


def _train(workdir, config, dataset_fn=None, holder=None):
    holder = {} if holder is None else holder
    return training.train(
        config,
        str(workdir),
        tf.distribute.get_strategy(),
        model_fn=lambda c: holder.setdefault("model", tiny.tiny_segmenter()),
        dataset_fn=dataset_fn or tiny.dataset_fn(),
        evaluate=False,
    )


def _weights(model):
    return {w.path: w.numpy() for w in model.weights}


# --------------------------------------------------------------------------- host reads


class _CountingTensor:
    """A metric tensor that records every conversion to a host value (float, numpy, format...)."""

    def __init__(self, tensor, reads, step):
        self.tensor, self.reads, self.step = tensor, reads, step

    def _host(self):
        self.reads.append(self.step)
        return self.tensor.numpy()

    def numpy(self):
        return self._host()

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._host(), dtype=dtype)

    def __float__(self):
        return float(self._host())

    def __int__(self):
        return int(self._host())

    def __bool__(self):
        return bool(self._host())

    def __format__(self, spec):
        return format(self._host(), spec)

    def __repr__(self):
        return repr(self._host())


# Used in TensorFlow ops the value stays on the device: not a host read.
tf.register_tensor_conversion_function(
    _CountingTensor,
    lambda value, dtype=None, name=None, as_ref=False: tf.convert_to_tensor(value.tensor, dtype),
)


def test_non_logging_steps_read_nothing_on_host(tmp_path, monkeypatch):
    reads, steps_run = [], []
    real = training.make_train_step

    def counting_make_train_step(*args):
        inner = real(*args)

        class Counting(training.TrainStep):
            def __call__(self, iterator, step_number=-1):
                steps_run.append(step_number)
                metrics = inner(iterator, step_number)
                return {k: _CountingTensor(v, reads, step_number) for k, v in metrics.items()}

        return Counting(inner.function, inner.bad_step, inner.bad_values)

    # Where the loop looks it up.
    monkeypatch.setattr(training.loop, "make_train_step", counting_make_train_step)
    result = _train(tmp_path, _config(train_steps=9, log_every=4, checkpoint_every=3))
    assert steps_run == list(range(1, 10))
    # Logged: the first step, every 4th and the last; checkpoints (3, 6, 9) read only the
    # device-side non-finite record, never the loss.
    assert sorted(set(reads)) == [1, 4, 8, 9], reads
    assert result["step"] == 9 and np.isfinite(result["loss"])


# --------------------------------------------------------------------------- non-finite


def _poisoned_dataset_fn(bad_steps, batch=4, steps=16):
    """Finite (images, labels) batches except at the 1-based `bad_steps`, whose images are NaN."""
    images, labels = tiny.batch(0, steps * batch)
    for step in bad_steps:
        images[(step - 1) * batch : step * batch] = np.nan

    def make(ctx=None):
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch, drop_remainder=True)

    return make


def _trained_weights(model):
    # BatchNorm's moving statistics are updated by the forward pass itself (a skipped
    # step's NaN statistics are never saved: the loop stops before any checkpoint).
    return {k: v for k, v in _weights(model).items() if "moving" not in k}


def test_non_finite_update_is_skipped_in_the_graph():
    config = _config()
    # With BatchNorm the NaN images make every logit NaN (a ReLU may turn a lone NaN into 0).
    model = tiny.tiny_segmenter(sync_bn=False)
    optimizer = build_optimizer(config.optimizer, 10, aggregate_gradients=False)
    optimizer.build(model.trainable_variables)
    strategy = tf.distribute.get_strategy()
    iterator = training.make_train_iterator(strategy, _poisoned_dataset_fn(bad_steps=[2]))
    step = training.make_train_step(model, optimizer, strategy, config)
    step(iterator, 1)
    good = _trained_weights(model), [v.numpy() for v in optimizer.variables]
    assert int(step.bad_step.numpy()) == 0
    metrics = step(iterator, 2)
    assert not np.isfinite(float(metrics["total"]))
    # Nothing moved: weights, momentum, the optimizer's iteration.
    for name, value in _trained_weights(model).items():
        np.testing.assert_array_equal(value, good[0][name], err_msg=name)
    for before, after in zip(good[1], optimizer.variables):
        np.testing.assert_array_equal(after.numpy(), before, err_msg=after.path)
    assert int(step.bad_step.numpy()) == 2 and np.isnan(step.bad_values.numpy()[0])
    # A later finite step is not applied either, and the first bad step stays recorded.
    step(iterator, 3)
    for name, value in _trained_weights(model).items():
        np.testing.assert_array_equal(value, good[0][name], err_msg=name)
    assert int(step.bad_step.numpy()) == 2


def test_non_finite_loss_between_logging_steps_stops_at_the_next_host_read(tmp_path):
    holder = {}
    # A constant rate (power 0), so that a shorter run is the same run cut short.
    config = override(_config(train_steps=8, log_every=4, checkpoint_every=4), "optimizer.power=0.0")
    with pytest.raises(training.NonFiniteLossError) as info:
        _train(tmp_path / "run", config, _poisoned_dataset_fn(bad_steps=[6]), holder)
    message = str(info.value)
    # Detected at step 8 (the next logging and checkpoint step), reported for step 6.
    assert "non-finite loss nan at step 6" in message and "ckpt-4" in message
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "input" / "worker-0"))[-1] == "ckpt-4.index"
    assert not (tmp_path / "run" / "checkpoints" / "ckpt-8.index").exists()
    # The in-memory model holds the weights of step 5: the straight 5-step run's.
    reference = {}
    five = override(config, "trainer.train_steps=5")
    _train(tmp_path / "five", five, _poisoned_dataset_fn([]), reference)
    expected = _trained_weights(reference["model"])
    for name, value in _trained_weights(holder["model"]).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


# --------------------------------------------------------------------------- accumulation


@pytest.mark.kernels
@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batch_forward_waits_for_previous_gradients(accum):
    config = _config(grad_accum_steps=accum)
    model = tiny.tiny_segmenter(sync_bn=False)
    optimizer = build_optimizer(config.optimizer, 10, aggregate_gradients=False)
    optimizer.build(model.trainable_variables)
    strategy = tf.distribute.get_strategy()
    iterator = training.make_train_iterator(strategy, tiny.dataset_fn())
    step = training.make_train_step(model, optimizer, strategy, config)
    graph = step.function.get_concrete_function(iterator, tf.constant(1, tf.int64)).graph
    (split,) = [
        op for op in graph.get_operations() if op.type == "Split" and op.outputs[0].dtype == tf.float32
    ]

    def first_conv(output):  # the micro-batch's first forward op, past Identity ops
        op = output.consumers()[0]
        while op.type == "Identity":
            op = op.outputs[0].consumers()[0]
        assert op.type == "Conv2D", op
        return op

    convs = [first_conv(out) for out in split.outputs]
    # What computes the weight gradients follows the kernels the model chose
    # (oneDNN or not, channel counts): derived from the model, not one machine.
    want = weight_gradient_op_types(model)
    assert sum(want.values()) >= 3, want
    grad_ops = [op for op in graph.get_operations() if op.type in want]
    for k in range(accum - 1):
        # Micro-batch k's gradient ops: those that depend on its forward but not on k+1's.
        own = [op for op in grad_ops if convs[k] in ancestors(op) and convs[k + 1] not in ancestors(op)]
        assert Counter(op.type for op in own) == want, own
        waits_for = ancestors(convs[k + 1])
        assert all(op in waits_for for op in own), [op.name for op in own if op not in waits_for]


# --------------------------------------------------------------------------- resume rules


def test_resume_on_another_worker_count_is_refused(tmp_path):
    _train(tmp_path, _config(train_steps=2))
    assert training.resume_step(str(tmp_path), 1) == 2
    with pytest.raises(RuntimeError) as info:
        training.resume_step(str(tmp_path), 2)
    message = str(info.value)
    assert "\n" not in message
    assert "on 2 worker(s)" in message and "saved by 1 worker(s)" in message and str(tmp_path) in message


def test_incomplete_newest_step_is_skipped(tmp_path):
    _train(tmp_path, _config(train_steps=4))
    # A save killed between the input position and the model: step 4's input position is gone.
    for name in os.listdir(tmp_path / "checkpoints" / "input" / "worker-0"):
        if name.startswith("ckpt-4"):
            os.remove(tmp_path / "checkpoints" / "input" / "worker-0" / name)
    assert training.resume_step(str(tmp_path), 1) == 2


def test_workdir_of_the_older_layout_resumes_exactly(tmp_path):
    """Checkpoints of older versions kept the iterator in the model checkpoint (no checkpoints/input)."""
    # A constant rate (power 0), so that the 2-step run is the 4-step run cut short.
    config = override(_config(train_steps=4), "optimizer.power=0.0")
    straight = {}
    _train(tmp_path / "straight", config, holder=straight)
    old = tmp_path / "old"
    _train(old, override(config, "trainer.train_steps=2"))
    # Rewrite step 2 in the older layout: model, optimizer, step, rng and iterator in one checkpoint.
    model = tiny.tiny_segmenter()
    optimizer = build_optimizer(config.optimizer, 4, aggregate_gradients=False)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    iterator = training.make_train_iterator(tf.distribute.get_strategy(), tiny.dataset_fn())
    objects = dict(model=model, optimizer=optimizer, step=step, rng={})
    tf.train.Checkpoint(**objects).restore(
        str(old / "checkpoints" / "ckpt-2")
    ).assert_existing_objects_matched()
    inputs = str(old / "checkpoints" / "input" / "worker-0" / "ckpt-2")
    tf.train.Checkpoint(iterator=iterator).restore(inputs).expect_partial()
    shutil.rmtree(old / "checkpoints")
    tf.train.CheckpointManager(
        tf.train.Checkpoint(**objects, iterator=iterator), str(old / "checkpoints"), 3
    ).save(checkpoint_number=2)

    resumed = {}
    result = _train(old, config, holder=resumed)
    assert result["step"] == 4
    assert (old / "checkpoints" / "input" / "worker-0" / "ckpt-4.index").exists()
    expected = _weights(straight["model"])
    for name, value in _weights(resumed["model"]).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_older_layout_on_several_workers_is_refused(tmp_path):
    objects = dict(model=tiny.tiny_segmenter(), step=tf.Variable(2, dtype=tf.int64))
    tf.train.CheckpointManager(tf.train.Checkpoint(**objects), str(tmp_path / "checkpoints"), 1).save(2)
    with pytest.raises(RuntimeError, match="on 2 workers: its checkpoints hold one input position"):
        training.resume_step(str(tmp_path), 2)
