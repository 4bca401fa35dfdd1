"""The distributed train step and the per-worker iterator that feeds it.

Each worker reads its shard through a plain, checkpointable tf.data iterator
(`make_train_iterator`) and hands every local replica its own per-replica
batch. The `tf.function` step (`make_train_step`) runs `_ReplicaStep` on
every replica with `strategy.run`: it divides every replica's cross-entropy
SUM by the GLOBAL number of valid pixels and all-reduces (sums) the
gradients, so N replicas x b images make exactly the update of 1 replica x
N*b images (with synchronized BatchNorm; see fcn_tf/losses.py). An update
whose loss or gradient is not finite is skipped in the graph and recorded on
the device (`TrainStep.bad_step`); the loop reads that record at its next
host read.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from fcn_tf import distribute
from fcn_tf.config import ExperimentConfig
from fcn_tf.losses import global_valid_pixel_count, segmentation_losses


def _local_replicas(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """(replicas on this worker, global id of its first replica)."""
    try:
        local = len(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one replica, no devices list
        local = 1
    return local, distribute.worker_index(strategy) * local


def make_train_iterator(strategy: tf.distribute.Strategy, dataset_fn: Callable) -> tf.data.Iterator:
    """This worker's training iterator, feeding the step made by `make_train_step`.

    `strategy.distribute_datasets_from_function` would do the same, but its
    DistributedIterator cannot be saved in a tf.train.Checkpoint, and exact
    resume needs the input position. So each worker builds its shard with an
    InputContext (per-replica batch, sharded by worker) like tf.distribute
    does, groups one batch per local replica, and iterates it with a plain,
    checkpointable tf.data iterator; the step hands each replica its slice.

    Args:
      strategy: the training strategy.
      dataset_fn: `input_context -> dataset` of per-replica (images, labels)
        batches, e.g. `build_dataset(config.data, True, ctx)`.
    """
    local, _ = _local_replicas(strategy)
    context = tf.distribute.InputContext(
        num_input_pipelines=strategy.num_replicas_in_sync // local,
        input_pipeline_id=distribute.worker_index(strategy),
        num_replicas_in_sync=strategy.num_replicas_in_sync,
    )
    dataset = dataset_fn(context)
    if local > 1:
        dataset = dataset.batch(local, drop_remainder=True)
    return iter(dataset.prefetch(tf.data.AUTOTUNE))


class TrainStep:
    """The distributed train step and its device-side record of a non-finite update.

    Call it as `step(iterator, step_number)`; it returns the global metrics
    as device tensors (nothing is read on the host). An update whose loss or
    gradient is not finite is not applied (weights, momentum and the
    optimizer's iteration stay as they were), and neither is any later one;
    `bad_step` then holds the first such step number (-1 when the caller gave
    none) and `bad_values` its (total, main, aux, grad_norm). `bad_step` is
    0 while every update was applied.

    Args:
      function: the `tf.function` `(iterator, step_number) -> metrics`.
      bad_step: the int64 variable it records the first non-finite step in.
      bad_values: the float32 (4,) variable it records that step's values in.
    """

    def __init__(self, function: Callable, bad_step: tf.Variable, bad_values: tf.Variable):
        self.function = function
        self.bad_step = bad_step
        self.bad_values = bad_values

    def __call__(self, iterator, step_number=-1):
        return self.function(iterator, tf.constant(step_number, tf.int64))


class _ReplicaStep:
    """What every replica runs: forward and backward over the micro-batches, all-reduce, guarded update."""

    def __init__(self, model, optimizer, config: ExperimentConfig, bad_step: tf.Variable):
        self.model = model
        self.optimizer = optimizer
        self.variables = model.trainable_variables
        self.accum = config.trainer.grad_accum_steps
        self.ignore_label = config.data.ignore_label
        self.aux_weight = config.trainer.aux_weight
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.bad_step = bad_step
        self.micro_step = self.forward_backward
        if config.trainer.jit_compile:
            # XLA compiles the model's forward and backward only: the iterator,
            # the cross-replica sums and the optimizer's merge calls stay outside.
            # (Not with BatchNorm synchronized across replicas: its all-reduce is inside.)
            self.micro_step = tf.function(self.forward_backward, jit_compile=True)

    def forward_backward(self, x, y, global_count):
        with tf.GradientTape() as tape:
            outputs = self.model(x, training=True)
            # total = main + aux_weight x aux (0.4 in the reference), both divided by
            # the GLOBAL valid-pixel count, so the aux head's gradient is weighted
            # the same on every replica and micro-batch.
            losses = segmentation_losses(outputs, y, global_count, self.ignore_label, self.aux_weight)
            # float16: scale the loss so small gradients survive; the
            # LossScaleOptimizer unscales before applying.
            loss = self.optimizer.scale_loss(losses["total"]) if self.loss_scaled else losses["total"]
        return losses, tape.gradient(loss, self.variables)

    def accumulate(self, images, labels, global_count):
        """(summed losses, summed gradients) of this replica's micro-batches, in order."""
        image_chunks = tf.split(images, self.accum) if self.accum > 1 else [images]
        label_chunks = tf.split(labels, self.accum) if self.accum > 1 else [labels]
        grads = None
        totals = {"main": 0.0, "aux": 0.0, "total": 0.0}
        # A Python loop (unrolled): SyncBN all-reduces inside the model, and
        # collectives inside a tf.while_loop are not supported by every strategy.
        # BatchNorm sees micro-batch statistics, as with a smaller batch.
        for x, y in zip(image_chunks, label_chunks):
            if grads is not None:
                # Micro-batch k+1's forward waits until micro-batch k's
                # gradients are summed: otherwise the executor may run the next
                # forward while the previous backward still holds its
                # activations, and accumulation saves no memory. The running
                # sums are then kept as written, ((g1 + g2) + g3) + ...; without
                # this, Grappler merged them into one AddN over all K micro-batch
                # gradients (all alive at once), rounded differently for K > 2.
                with tf.control_dependencies(grads):
                    x = tf.identity(x)
            losses, micro_grads = self.micro_step(x, y, global_count)
            grads = micro_grads if grads is None else [g + m for g, m in zip(grads, micro_grads)]
            totals = {k: totals[k] + losses[k] for k in totals}
        return totals, grads

    def __call__(self, images, labels):
        replica_ctx = tf.distribute.get_replica_context()
        # Denominator of the loss: valid pixels of the whole GLOBAL batch
        # (all replicas, all micro-batches), so each micro-batch's gradient is
        # already its share of the global mean and they just add up.
        global_count = global_valid_pixel_count(labels, self.ignore_label)
        totals, grads = self.accumulate(images, labels, global_count)
        # SUM (not mean) across replicas: every replica's loss was divided by
        # the global count, so the sum is the gradient of the global mean.
        # Done here once instead of in the optimizer, to also get the norm.
        grads = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        # Each replica holds its share of the global mean: summing gives it,
        # here (one batched all-reduce) so that every replica can decide below.
        totals = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, totals)
        grad_norm = tf.linalg.global_norm(grads)
        if self.loss_scaled:
            grad_norm = grad_norm / tf.cast(self.optimizer.dynamic_scale, grad_norm.dtype)
        finite = tf.math.is_finite(totals["total"])
        if not self.loss_scaled:
            # With loss scaling, overflowing gradients are the
            # LossScaleOptimizer's business (it skips them and lowers the scale).
            finite = finite & tf.math.is_finite(grad_norm)
        # Once an update was skipped, none is applied: the weights stay those
        # of the last good step until the loop stops at its next host read.
        replica_ctx.merge_call(self.apply_if, args=(finite & tf.equal(self.bad_step, 0), grads))
        return totals, grad_norm, finite

    def apply_if(self, distribution, apply, grads):
        # The cond must be built in cross-replica context: a branch that
        # calls merge_call (optimizer.apply does) is not supported inside a
        # replica-context cond. `apply` is identical on every replica
        # (computed from all-reduced values): take the first.
        take = distribution.experimental_local_results(apply)[0]
        tf.cond(
            take,
            lambda: distribution.extended.call_for_each_replica(
                self.optimizer.apply, args=(grads, self.variables)
            ),
            lambda: None,
        )


def _first(strategy: tf.distribute.Strategy, value):
    """A value identical on every replica (all-reduced): the first replica's, no reduction needed."""
    return strategy.experimental_local_results(value)[0]


def _replica_slices(strategy: tf.distribute.Strategy, batch, first_replica: int):
    """(local_replicas, b, ...) -> replica r gets slice r, placed on its device."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: batch[ctx.replica_id_in_sync_group - first_replica]
    )


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    config: ExperimentConfig,
) -> TrainStep:
    """Builds the distributed train step `step(iterator, step_number) -> metrics`.

    The returned step (a `TrainStep` around a `tf.function`) takes one
    step's batches from the iterator of `make_train_iterator`, runs the
    replica step on every replica and returns the global metrics: "total",
    "main", "aux" (global per-pixel means) and "grad_norm" (norm of the
    summed, unscaled gradient, L2 term excluded); when the dataset's elements
    are (images, labels, extras), also "inputs": this worker's `extras`.

    Args:
      model: a Keras model returning {"logits", ["aux_logits"]}, built in
        `strategy.scope()`.
      optimizer: built (`optimizer.build(model.trainable_variables)`) in
        the scope, with gradient aggregation off (the step sums gradients
        itself), possibly a `LossScaleOptimizer`.
      strategy: the strategy that made the iterator.
      config: the experiment (trainer.aux_weight, trainer.grad_accum_steps,
        trainer.jit_compile, data.ignore_label).
    """
    # Plain (per-worker) variables: every worker computes the same values from
    # all-reduced tensors, so they agree without communication.
    bad_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="nonfinite_step")
    bad_values = tf.Variable(tf.zeros([4]), trainable=False, name="nonfinite_values")
    replica_step = _ReplicaStep(model, optimizer, config, bad_step)
    local_replicas, first_replica = _local_replicas(strategy)

    def step(iterator, step_number):
        images, labels, *extras = next(iterator)
        if local_replicas > 1:
            images = _replica_slices(strategy, images, first_replica)
            labels = _replica_slices(strategy, labels, first_replica)
        totals, grad_norm, finite = strategy.run(replica_step, args=(images, labels))
        metrics = {k: _first(strategy, v) for k, v in totals.items()}
        metrics["grad_norm"] = _first(strategy, grad_norm)
        record = (bad_step == 0) & tf.logical_not(_first(strategy, finite))
        bad_step.assign(tf.where(record, step_number, bad_step))
        values = tf.stack([metrics["total"], metrics["main"], metrics["aux"], metrics["grad_norm"]])
        bad_values.assign(tf.where(record, tf.cast(values, tf.float32), bad_values))
        if extras:
            metrics["inputs"] = extras[0]
        return metrics

    return TrainStep(tf.function(step), bad_step, bad_values)
