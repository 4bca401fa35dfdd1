"""The training loop: tf.distribute custom loop with the reference recipe.

`train(config, workdir)` runs the whole job on whatever `make_strategy`
returns (default, mirrored over GPUs/CPUs, or multi-worker):

* each worker reads its shard of the data through a plain, checkpointable
  tf.data iterator (`make_train_iterator`) and hands every local replica
  its own per-replica batch; the `tf.function` step runs the model with
  `strategy.run`, divides every replica's cross-entropy SUM by the GLOBAL
  number of valid pixels and all-reduces (sums) the gradients, so N replicas
  x b images make exactly the update of 1 replica x N*b images (with
  synchronized BatchNorm; see fcn_tf/losses.py).
* `TorchSGD` (PyTorch-style L2 + momentum) on the per-iteration poly
  schedule; optional gradient accumulation and mixed precision.
* checkpoints every `checkpoint_every` steps, at the end and on SIGTERM
  (`tf.distribute.experimental.PreemptionCheckpointHandler`): model,
  optimizer and step from the chief in WORKDIR/checkpoints, and every
  worker's own input iterator in WORKDIR/checkpoints/input/worker-K under the
  same step; resumed automatically from the newest complete step.
* the loss stays on the device except at logging steps: a non-finite update
  is skipped in the graph and the run stops at the next host read, before
  any checkpoint.
* TensorBoard scalars/images and periodic evaluation on the chief, console
  progress with an ETA, and an exclusive lock on the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from fcn_tf import checkpoints, distribute, summaries
from fcn_tf.config import WORKDIR_CONFIG, ExperimentConfig, to_json, validate
from fcn_tf.losses import global_valid_pixel_count, segmentation_losses
from fcn_tf.models.sync_batch_norm import check_xla_sync_bn
from fcn_tf.optimizers import build_optimizer
from fcn_tf.schedules import poly_from_config

CONFIG_FILE = WORKDIR_CONFIG
LOCK_FILE = ".lock"
# Exit code after a preemption checkpoint: TensorFlow's own default for
# platforms other than Borg/GCP; cluster managers restart on it.
PREEMPTED_EXIT_CODE = 42


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


class WorkdirLockedError(RuntimeError):
    """Another training run holds the workdir."""


class Preempted(Exception):
    """SIGTERM received: a checkpoint was saved at a step boundary and training stopped."""

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(
            f"preempted (SIGTERM): checkpoint saved at step {step} ({checkpoint}); rerun to resume"
        )
        self.step = step
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- workdir


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Holds an exclusive `fcntl` lock on WORKDIR/.lock for the duration of the block.

    The lock dies with the process (even on SIGKILL), so a crashed run never
    leaves a stale lock behind.

    Raises:
      WorkdirLockedError: another process holds it; the message names the
        workdir and that process's pid.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirLockedError(
            f"workdir {workdir} is in use by another training run (pid {holder}); "
            f"wait for it to finish or choose another --workdir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_config(config: ExperimentConfig, workdir: str) -> str:
    """Writes the resolved config to WORKDIR/config.json (atomically) and returns the path."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(config) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- settings


def apply_training_settings(config, strategy) -> None:
    """Start-up settings of a training run, made before the model is built.

    TF32 follows `trainer.tf32` (TensorFlow enables it by default on Ampere
    and newer GPUs; the reference publishes its numbers without it). XLA
    (`trainer.jit_compile`) with synchronized BatchNorm over several
    replicas is refused here, with a one-line message, where TensorFlow
    cannot compile it (`fcn_tf.models.sync_batch_norm.check_xla_sync_bn`).

    Args:
      config: the validated `ExperimentConfig`.
      strategy: the strategy the run trains with.

    Raises:
      fcn_tf.models.sync_batch_norm.SyncBatchNormXlaError: XLA with synchronized
        BatchNorm on replicas that are not all GPUs.
    """
    tf.config.experimental.enable_tensor_float_32_execution(config.trainer.tf32)
    if config.trainer.jit_compile and config.model.sync_bn:
        check_xla_sync_bn(strategy.extended.worker_devices, strategy.num_replicas_in_sync)


# --------------------------------------------------------------------------- model


def load_pretrained(model: keras.Model, config: ExperimentConfig) -> str:
    """Loads `config.model.pretrained_backbone` into the model's backbone.

    Raises:
      FileNotFoundError: the file is missing; the message says where the
        original checkpoint is published and how to train without it.
    """
    path = os.path.expanduser(config.model.pretrained_backbone)
    if not os.path.isfile(path):
        source = config.model.pretrained_backbone_source or "(no source recorded)"
        raise FileNotFoundError(
            f"pretrained backbone not found: {path}\n"
            f"  It is the converted ImageNet checkpoint published at {source}\n"
            f"  (convert it with fcn_tf.models.convert), or train from random init with --from_scratch "
            f"or --override=model.pretrained_backbone="
        )
    from fcn_tf.models.convert import load_pretrained_backbone

    load_pretrained_backbone(model, path, config.model.pretrained_backbone_source)
    return path


def _default_model_fn(config: ExperimentConfig) -> keras.Model:
    from fcn_tf.models import build_fcn

    return build_fcn(config.model)


def _default_dataset_fn(config: ExperimentConfig) -> Callable:
    from fcn_tf.data import build_dataset

    return lambda input_context: build_dataset(config.data, True, input_context)


def _default_image_dataset(config: ExperimentConfig) -> tf.data.Dataset:
    from fcn_tf.data import build_dataset

    return build_dataset(config.data, False)


# --------------------------------------------------------------------------- step


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
    """

    def __init__(self, function: Callable, bad_step: tf.Variable, bad_values: tf.Variable):
        self.function = function
        self.bad_step = bad_step
        self.bad_values = bad_values

    def __call__(self, iterator, step_number=-1):
        return self.function(iterator, tf.constant(step_number, tf.int64))


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
    accum = config.trainer.grad_accum_steps
    ignore_label = config.data.ignore_label
    aux_weight = config.trainer.aux_weight
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    variables = model.trainable_variables
    # Plain (per-worker) variables: every worker computes the same values from
    # all-reduced tensors, so they agree without communication.
    bad_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="nonfinite_step")
    bad_values = tf.Variable(tf.zeros([4]), trainable=False, name="nonfinite_values")

    def forward_backward(x, y, global_count):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            losses = segmentation_losses(outputs, y, global_count, ignore_label, aux_weight)
            # float16: scale the loss so small gradients survive; the
            # LossScaleOptimizer unscales before applying.
            loss = optimizer.scale_loss(losses["total"]) if loss_scaled else losses["total"]
        return losses, tape.gradient(loss, variables)

    if config.trainer.jit_compile:
        # XLA compiles the model's forward and backward only: the iterator,
        # the cross-replica sums and the optimizer's merge calls stay outside.
        # (Not with BatchNorm synchronized across replicas: its all-reduce is inside.)
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def apply_if(distribution, apply, grads):
        # The cond must be built in cross-replica context: a branch that
        # calls merge_call (optimizer.apply does) is not supported inside a
        # replica-context cond. `apply` is identical on every replica
        # (computed from all-reduced values): take the first.
        take = distribution.experimental_local_results(apply)[0]
        tf.cond(
            take,
            lambda: distribution.extended.call_for_each_replica(optimizer.apply, args=(grads, variables)),
            lambda: None,
        )

    def replica_step(images, labels):
        replica_ctx = tf.distribute.get_replica_context()
        # Denominator of the loss: valid pixels of the whole GLOBAL batch
        # (all replicas, all micro-batches), so each micro-batch's gradient is
        # already its share of the global mean and they just add up.
        global_count = global_valid_pixel_count(labels, ignore_label)
        image_chunks = tf.split(images, accum) if accum > 1 else [images]
        label_chunks = tf.split(labels, accum) if accum > 1 else [labels]
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
            losses, micro_grads = forward_backward(x, y, global_count)
            grads = micro_grads if grads is None else [g + m for g, m in zip(grads, micro_grads)]
            totals = {k: totals[k] + losses[k] for k in totals}
        # SUM (not mean) across replicas: every replica's loss was divided by
        # the global count, so the sum is the gradient of the global mean.
        # Done here once instead of in the optimizer, to also get the norm.
        grads = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        # Each replica holds its share of the global mean: summing gives it,
        # here (one batched all-reduce) so that every replica can decide below.
        totals = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, totals)
        grad_norm = tf.linalg.global_norm(grads)
        if loss_scaled:
            grad_norm = grad_norm / tf.cast(optimizer.dynamic_scale, grad_norm.dtype)
        finite = tf.math.is_finite(totals["total"])
        if not loss_scaled:
            # With loss scaling, overflowing gradients are the
            # LossScaleOptimizer's business (it skips them and lowers the scale).
            finite = finite & tf.math.is_finite(grad_norm)
        # Once an update was skipped, none is applied: the weights stay those
        # of the last good step until the loop stops at its next host read.
        replica_ctx.merge_call(apply_if, args=(finite & tf.equal(bad_step, 0), grads))
        return totals, grad_norm, finite

    local_replicas, first_replica = _local_replicas(strategy)

    def step(iterator, step_number):
        images, labels, *extras = next(iterator)
        if local_replicas > 1:
            # (local_replicas, b, ...) -> replica r gets slice r, placed on its device.
            def pick(batch):
                return strategy.experimental_distribute_values_from_function(
                    lambda ctx: batch[ctx.replica_id_in_sync_group - first_replica]
                )

            images, labels = pick(images), pick(labels)
        totals, grad_norm, finite = strategy.run(replica_step, args=(images, labels))

        def first(value):  # identical on every replica (all-reduced): no reduction needed
            return strategy.experimental_local_results(value)[0]

        metrics = {k: first(v) for k, v in totals.items()}
        metrics["grad_norm"] = first(grad_norm)
        record = (bad_step == 0) & tf.logical_not(first(finite))
        bad_step.assign(tf.where(record, step_number, bad_step))
        values = tf.stack([metrics["total"], metrics["main"], metrics["aux"], metrics["grad_norm"]])
        bad_values.assign(tf.where(record, tf.cast(values, tf.float32), bad_values))
        if extras:
            metrics["inputs"] = extras[0]
        return metrics

    return TrainStep(tf.function(step), bad_step, bad_values)


# --------------------------------------------------------------------------- eval & images


def _run_evaluation(model, config, strategy, eval_dataset_fn):
    from fcn_tf import eval_lib

    # eval_dataset_fn None: eval_lib builds the eval split itself, sharded per worker.
    return eval_lib.evaluate(
        model,
        eval_dataset_fn,
        config,
        strategy=strategy,
        max_examples=config.trainer.eval_max_examples,
        log_every=0,
    )


def _image_batch(dataset: tf.data.Dataset, count: int):
    """The first `count` evaluation examples, kept for image summaries (labels resized to the input)."""
    images, labels = [], []
    for example in dataset.take(count):
        image = example["image"]
        label = tf.image.resize(example["label"][..., None], tf.shape(image)[1:3], method="nearest")[..., 0]
        images.append(image)
        labels.append(label)
    return images, labels


def _write_images(writer, step, model, batch, config, palette):
    images, labels = batch
    predictions = [tf.argmax(model(x, training=False)["logits"], axis=-1) for x in images]
    summaries.write_segmentation_images(
        writer,
        step,
        tf.concat(images, 0) if len({tuple(x.shape) for x in images}) == 1 else images[0],
        tf.concat(labels, 0) if len({tuple(y.shape) for y in labels}) == 1 else labels[0],
        tf.concat(predictions, 0) if len({tuple(p.shape) for p in predictions}) == 1 else predictions[0],
        palette,
        config.data.mean,
        config.data.std,
    )


def _palette(config):
    from fcn_tf.data import classes

    n = config.model.num_classes
    return classes.palette_for(config.data.dataset, n), classes.class_names_for(config.data.dataset, n)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# --------------------------------------------------------------------------- train


def train(
    config: ExperimentConfig,
    workdir: str,
    strategy: tf.distribute.Strategy | None = None,
    *,
    from_scratch: bool = False,
    model_fn: Callable[[ExperimentConfig], keras.Model] | None = None,
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset] | None = None,
    eval_dataset_fn: Callable[[], tf.data.Dataset] | None = None,
    evaluate: bool = True,
    input_observer: Callable[[int, object], None] | None = None,
) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

    Args:
      config: the experiment.
      workdir: output directory (config.json, checkpoints/, tensorboard/),
        shared by all workers of a multi-worker job.
      strategy: a tf.distribute strategy; `make_strategy("auto")` if None.
      from_scratch: ignore `config.model.pretrained_backbone`.
      model_fn: `config -> keras.Model` (default: `fcn_tf.models.build_fcn`).
      dataset_fn: `input_context -> per-replica training dataset` of
        (images, labels), or of (images, labels, extras) with any extra
        tensors the step passes through to `input_observer` (default:
        `fcn_tf.data.build_dataset(..., True, ctx)`).
      eval_dataset_fn: `() -> evaluation dataset` of dicts (default: the
        eval split through `build_dataset(..., False)`); used for periodic
        evaluation and image summaries.
      evaluate: run periodic/final evaluation (needs `fcn_tf.eval_lib`).
      input_observer: `(step, extras) -> None`, called on this worker after
        every step with the step number and the `extras` (as numpy) of the
        batch that step consumed, e.g. to record which examples each worker
        trained on. It reads them on the host every step: for tests and
        tooling, not for fast training.

    Returns:
      {"step", "loss" (last total loss), "checkpoint", "eval" (last eval
      results or None), "images_per_sec"}.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (that update and later
        ones were not applied; no checkpoint written after the last good one).
      WorkdirLockedError: another run holds the workdir.
      Preempted: SIGTERM arrived; a checkpoint was saved first.
      FileNotFoundError: the pretrained backbone is missing.
      fcn_tf.checkpoints.NoReadableCheckpointError: the workdir has
        checkpoints but none is readable (an unreadable newest one is set
        aside and the newest readable one used instead).
      fcn_tf.checkpoints.CheckpointMismatchError: the checkpoint does not
        hold this run's model, optimizer or input pipeline.
      fcn_tf.checkpoints.CheckpointSaveError: a save failed (its partial
        files were removed).
      RuntimeError: the workdir cannot be resumed on this number of workers
        (input positions saved by another count, or by none).
    """
    config = validate(config)
    strategy = strategy or distribute.make_strategy("auto")
    apply_training_settings(config, strategy)  # TF32; XLA + SyncBN refused where unsupported
    chief = distribute.is_chief(strategy)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    replicas = strategy.num_replicas_in_sync
    t = config.trainer
    per_step_split = replicas * t.grad_accum_steps
    if config.data.global_batch_size % per_step_split:
        raise ValueError(
            f"data.global_batch_size={config.data.global_batch_size} is not divisible by "
            f"{replicas} replicas x trainer.grad_accum_steps={t.grad_accum_steps}"
        )
    os.makedirs(workdir, exist_ok=True)
    # Only the chief locks: the other workers of a multi-worker job share the
    # workdir (they write only their own input positions there).
    lock = workdir_lock(workdir) if chief else contextlib.nullcontext()
    hooks = _Hooks(
        model_fn=model_fn or _default_model_fn,
        dataset_fn=dataset_fn or _default_dataset_fn(config),
        eval_dataset_fn=eval_dataset_fn,
        evaluate=evaluate,
        input_observer=input_observer,
    )
    with lock:
        return _train_locked(config, workdir, strategy, hooks, from_scratch)


@dataclasses.dataclass(frozen=True)
class _Hooks:
    """The caller's pieces of `train`."""

    model_fn: Callable
    dataset_fn: Callable
    eval_dataset_fn: Callable | None
    evaluate: bool
    input_observer: Callable | None


@dataclasses.dataclass
class _Checkpoints:
    """Where one step's state goes: the model on the chief, each worker's own input position.

    `model` manages model, optimizer, step and dropout RNG; the chief's is
    WORKDIR/checkpoints/ckpt-STEP, the other workers write theirs (which
    MultiWorkerMirroredStrategy needs them to) to a temporary folder. `inputs`
    manages this worker's input iterator (its shard's position and, inside
    the tf.data state, any shuffle or augmentation randomness) in
    WORKDIR/checkpoints/input/worker-K/ckpt-STEP, with the number of workers.
    """

    model: checkpoints.CheckpointManager
    inputs: checkpoints.CheckpointManager
    model_checkpoint: tf.train.Checkpoint
    model_objects: dict
    input_checkpoint: tf.train.Checkpoint
    step: tf.Variable
    workdir: str
    num_workers: int
    resume_from: str | None  # the verified model checkpoint to resume from, None: a fresh run
    legacy: bool  # the iterator sits in the model checkpoint (written before per-worker positions)


@dataclasses.dataclass
class _Job:
    """What the loop runs: fixed for the whole run."""

    config: ExperimentConfig
    workdir: str
    strategy: tf.distribute.Strategy
    chief: bool
    model: keras.Model
    train_step: TrainStep
    iterator: tf.data.Iterator
    checkpoints: _Checkpoints
    hooks: _Hooks
    writer: object = None
    eval_writer: object = None
    handler: object = None
    image_batch: object = None


@dataclasses.dataclass
class _RunState:
    """What the loop updates. `step` is the one step counter (steps done)."""

    step: int
    start_step: int
    metrics: dict | None = None  # the last step's, on the device: read only at logging steps
    loss: float = float("nan")
    eval: dict | None = None
    checkpoint: str | None = None
    images_per_sec: float = 0.0
    window_start: float = dataclasses.field(default_factory=time.perf_counter)
    window_steps: int = 0


def _train_locked(config, workdir, strategy, hooks, from_scratch):
    t = config.trainer
    chief = distribute.is_chief(strategy)
    if t.deterministic:
        # Same ops, same order, same results: required for exact resume.
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(t.seed)
    if chief:
        write_config(config, workdir)

    previous_policy = keras.mixed_precision.global_policy()
    if t.precision != "float32":
        # Activations in (b)float16, variables in float32; the loss casts
        # logits to float32 (fcn_tf/losses.py).
        keras.mixed_precision.set_global_policy(t.precision)
    scratch = tempfile.mkdtemp(prefix=f"fcn_tf_worker{distribute.worker_index(strategy)}_")
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with strategy.scope():
            model = hooks.model_fn(config)
            optimizer = build_optimizer(
                config.optimizer, t.train_steps, t.precision, aggregate_gradients=False
            )
            # Create the slot variables now, not inside the traced step (see build_optimizer).
            optimizer.build(model.trainable_variables)
        iterator = make_train_iterator(strategy, hooks.dataset_fn)
        ckpts = _make_checkpoints(strategy, (model, optimizer, iterator), workdir, scratch, t)
        resumed = _restore(ckpts)
        if resumed is not None:
            logging.info("Resumed from %s (step %d)", resumed, int(ckpts.step.numpy()))
        elif config.model.pretrained_backbone and not from_scratch:
            path = load_pretrained(model, config)
            logging.info("Loaded pretrained backbone %s", path)
        job = _Job(
            config=config,
            workdir=workdir,
            strategy=strategy,
            chief=chief,
            model=model,
            train_step=make_train_step(model, optimizer, strategy, config),
            iterator=iterator,
            checkpoints=ckpts,
            hooks=hooks,
        )
        state = _RunState(step=int(ckpts.step.numpy()), start_step=int(ckpts.step.numpy()))
        state.checkpoint = ckpts.model.latest_checkpoint
        job.handler = _preemption_handler(strategy, scratch, lambda **_: _save(job, state))
        return _loop(job, state)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, previous_sigterm)
        shutil.rmtree(scratch, ignore_errors=True)


def _seed_states(model: keras.Model) -> list:
    """The model's random-state variables (dropout SeedGenerators), in layer order.

    Layer order, not names: Keras numbers SeedGenerators per process, so the
    names differ between processes that built other models first.
    """
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


# --------------------------------------------------------------------------- checkpoints

INPUT_SUBDIR = "input"


def input_dir(workdir: str, worker: int) -> str:
    """Where worker `worker` keeps its input positions: WORKDIR/checkpoints/input/worker-K."""
    return os.path.join(checkpoints.checkpoint_dir(workdir), INPUT_SUBDIR, f"worker-{worker}")


def _make_checkpoints(strategy, objects, workdir, scratch, trainer) -> _Checkpoints:
    model, optimizer, iterator = objects
    with strategy.scope():
        step = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="step",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
    # Keras keeps dropout's random state in SeedGenerator variables that
    # tf.train.Checkpoint does not reach through the model: saved explicitly,
    # or a resumed run would draw other dropout masks than an uninterrupted one.
    rng_states = {f"s{i}": v.value for i, v in enumerate(_seed_states(model))}
    model_objects = {"model": model, "optimizer": optimizer, "step": step, "rng": rng_states}
    model_checkpoint = tf.train.Checkpoint(**model_objects)
    workers = distribute.num_workers(strategy)
    # The worker count is saved with every input position: resuming on
    # another count would give the shards other examples (refused, see _restore).
    input_checkpoint = tf.train.Checkpoint(
        iterator=iterator, num_workers=tf.Variable(workers, dtype=tf.int64, trainable=False)
    )
    chief = distribute.is_chief(strategy)
    own_inputs = input_dir(workdir, distribute.worker_index(strategy))
    # Killed saves leave ckpt-STEP_temp/ folders; each worker clears its own
    # folders (the workdir lock excludes a concurrent run).
    if chief:
        checkpoints.remove_partial_saves(checkpoints.checkpoint_dir(workdir))
    checkpoints.remove_partial_saves(own_inputs)
    # Before the managers: they read the state file, which resume repairs.
    legacy = _legacy_layout(workdir)
    resume_from = _resume_point(workdir, workers, chief, legacy)
    # MultiWorkerMirroredStrategy needs every worker to take part in saving
    # the model; only the chief's copy is kept.
    model_dir = checkpoints.checkpoint_dir(workdir) if chief else os.path.join(scratch, "model")
    keep = trainer.keep_checkpoints if chief else 1
    model = checkpoints.CheckpointManager(model_checkpoint, model_dir, max_to_keep=keep)
    chief_model_dir = checkpoints.checkpoint_dir(workdir)

    def resume_point():
        # The input positions are saved after their step's model checkpoint:
        # when they fail, the rerun resumes from the chief's step before it.
        current = int(model.latest_checkpoint.rsplit("-", 1)[1]) if model.latest_checkpoint else 0
        earlier = [step for step in _checkpoint_steps(chief_model_dir) if step < current]
        return os.path.join(chief_model_dir, f"ckpt-{earlier[0]}") if earlier else None

    return _Checkpoints(
        model=model,
        inputs=checkpoints.CheckpointManager(
            input_checkpoint, own_inputs, max_to_keep=trainer.keep_checkpoints, resume_point=resume_point
        ),
        model_checkpoint=model_checkpoint,
        model_objects=model_objects,
        input_checkpoint=input_checkpoint,
        step=step,
        workdir=workdir,
        num_workers=workers,
        resume_from=resume_from,
        legacy=legacy,
    )


def _checkpoint_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints `ckpt-STEP` in `directory`, newest first.

    The `.index` file is written last (after the data files are merged), so
    a save killed half-way leaves none.
    """
    steps = []
    for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
        number = os.path.basename(path)[len("ckpt-") : -len(".index")]
        if number.isdigit():
            steps.append(int(number))
    return sorted(steps, reverse=True)


def _saved_workers(prefix: str) -> int:
    return int(tf.train.load_checkpoint(prefix).get_tensor("num_workers/.ATTRIBUTES/VARIABLE_VALUE"))


def _inputs_complete(workdir: str, step: int, num_workers: int) -> bool:
    """Whether every worker saved its input position at `step`.

    Raises:
      RuntimeError: they were saved by another number of workers than
        `num_workers` (one-line message).
    """
    first = os.path.join(input_dir(workdir, 0), f"ckpt-{step}")
    if not tf.io.gfile.exists(first + ".index"):
        return False
    saved = _saved_workers(first)
    if not all(step in _checkpoint_steps(input_dir(workdir, k)) for k in range(1, saved)):
        return False
    if saved != num_workers:
        raise RuntimeError(
            f"cannot resume {workdir} on {num_workers} worker(s): its input positions at step "
            f"{step} were saved by {saved} worker(s), and another count would give each worker "
            f"other examples; rerun with {saved} worker(s) or use a new --workdir"
        )
    return True


def _resume_point(workdir: str, num_workers: int, chief: bool, legacy: bool) -> str | None:
    """The model checkpoint a run on `num_workers` workers resumes from; None for a fresh workdir.

    The newest step whose model checkpoint is readable (`checkpoints.verify`:
    an unreadable one is set aside with a warning) and, but for a workdir of
    the older single-process layout, which has the input position of every
    worker that saved it (a run killed between those saves leaves a newer,
    incomplete step behind, which is passed over). Every worker computes the
    same answer from the shared workdir; only the chief moves files.

    Raises:
      fcn_tf.checkpoints.NoReadableCheckpointError: no checkpoint is readable.
      RuntimeError: input positions saved by another number of workers, the
        older layout on several workers, or no step complete.
    """
    model_dir = checkpoints.checkpoint_dir(workdir)
    if legacy and num_workers != 1:
        raise RuntimeError(
            f"cannot resume {workdir} on {num_workers} workers: its checkpoints hold one input "
            "position for all workers (written by an older version); resume it with 1 worker or use a "
            "new --workdir"
        )
    usable = None if legacy else (lambda step: _inputs_complete(workdir, step, num_workers))
    prefix = checkpoints.newest_readable(model_dir, set_aside=chief, usable=usable)
    if prefix is None and _checkpoint_steps(model_dir):
        raise RuntimeError(
            f"cannot resume {workdir}: no checkpoint step in {model_dir} has the input position of "
            f"every worker ({os.path.dirname(input_dir(workdir, 0))}/worker-K); use a new --workdir"
        )
    return prefix


def resume_step(workdir: str, num_workers: int) -> int | None:
    """The step a run on `num_workers` workers would resume from (reads only); None for a fresh workdir.

    Args:
      workdir: the training workdir.
      num_workers: workers of the run.

    Raises:
      as `_resume_point`.
    """
    prefix = _resume_point(workdir, num_workers, chief=False, legacy=_legacy_layout(workdir))
    return None if prefix is None else int(prefix.rsplit("-", 1)[1])


def _legacy_layout(workdir: str) -> bool:
    """A workdir written before each worker saved its own input position (iterator in the model checkpoint)."""
    inputs = os.path.join(checkpoints.checkpoint_dir(workdir), INPUT_SUBDIR)
    return not tf.io.gfile.exists(inputs) and bool(_checkpoint_steps(checkpoints.checkpoint_dir(workdir)))


def _restore(ckpts: _Checkpoints) -> str | None:
    """Restores the model and this worker's input position of the resume point; returns the model prefix."""
    prefix = ckpts.resume_from
    if prefix is None:
        return None
    config_file = os.path.join(ckpts.workdir, CONFIG_FILE)
    if ckpts.legacy:
        # The older layout kept the iterator in the model checkpoint.
        legacy = tf.train.Checkpoint(**ckpts.model_objects, iterator=ckpts.input_checkpoint.iterator)
        checkpoints.restore_for_resume(legacy, prefix, config_file)
        return prefix
    checkpoints.restore_for_resume(ckpts.model_checkpoint, prefix, config_file)
    inputs = os.path.join(ckpts.inputs.directory, os.path.basename(prefix))
    checkpoints.restore_for_resume(ckpts.input_checkpoint, inputs, config_file)
    return prefix


def _save(job: _Job, state: _RunState) -> str:
    """Saves step `state.step`: this worker's input position, then the model; returns the model prefix."""
    # Never a checkpoint of weights after a skipped, non-finite update.
    _raise_if_non_finite(job, state)
    ckpts = job.checkpoints
    ckpts.step.assign(state.step)
    # A step is a resume point only once the model and every worker's input
    # position are saved (`_resume_point` passes over an incomplete one), so
    # a save interrupted between the two loses nothing. The model goes first:
    # it is the large write, where a full disk shows, and its failure then
    # leaves no input position of a step that has no model.
    path = ckpts.model.save(checkpoint_number=state.step)
    try:
        ckpts.inputs.save(checkpoint_number=state.step)
    except checkpoints.CheckpointSaveError:
        if job.chief:
            checkpoints.discard(path)  # the step failed as a whole: its model alone cannot be resumed
        raise
    if job.chief:
        logging.info("Saved checkpoint %s", path)
    state.checkpoint = path
    return path


class _PreemptionExit(Exception):
    pass


def _raise_preemption_exit():
    raise _PreemptionExit()


def _preemption_handler(strategy, scratch, save_fn):
    """TensorFlow's PreemptionCheckpointHandler: on SIGTERM, save at the next step boundary, then stop.

    The handler decides when (the same step on every worker); `save_fn`
    saves. Its own manager is an empty one: the handler restores that
    manager's latest checkpoint when it is made, and the run has already
    restored its own resume step (which need not be the newest checkpoint).
    """
    empty = tf.train.CheckpointManager(tf.train.Checkpoint(), os.path.join(scratch, "preemption"), 1)
    try:
        with strategy.scope():
            return tf.distribute.experimental.PreemptionCheckpointHandler(
                getattr(strategy, "cluster_resolver", None),
                empty,
                termination_config=tf.distribute.experimental.TerminationConfig(
                    exit_fn=_raise_preemption_exit, save_fn=save_fn
                ),
            )
    except ValueError as e:  # signal handlers can only be installed from the main thread
        logging.warning("No preemption handling (%s)", e)
        return None


# --------------------------------------------------------------------------- loop


def _loop(job: _Job, state: _RunState) -> dict:
    t = job.config.trainer
    if job.chief:
        job.writer = tf.summary.create_file_writer(summaries.summary_dir(job.workdir, "train"))
        job.eval_writer = tf.summary.create_file_writer(summaries.summary_dir(job.workdir, "eval"))
    run_start = time.perf_counter()
    logging.info(
        "Training %s for %d steps (from step %d) on %d replica(s), global batch %d, workdir %s",
        job.config.name,
        t.train_steps,
        state.step,
        job.strategy.num_replicas_in_sync,
        job.config.data.global_batch_size,
        job.workdir,
    )
    try:
        while state.step < t.train_steps:
            if job.handler is not None:
                # Saves (and raises _PreemptionExit) if SIGTERM arrived during the previous step.
                job.handler.save_checkpoint_if_preempted(checkpoint_number=state.step)
            # No host read here: the loss stays on the device until a logging
            # step, so the host keeps queueing steps on an accelerator.
            state.metrics = job.train_step(job.iterator, state.step + 1)
            state.step += 1
            state.window_steps += 1
            if job.hooks.input_observer is not None:
                job.hooks.input_observer(state.step, _to_numpy(state.metrics.get("inputs")))
            if state.step % t.log_every == 0 or state.step in (t.train_steps, state.start_step + 1):
                _log_step(job, state)
            pause_start = time.perf_counter()
            _periodic_actions(job, state)
            # Saving, evaluation and images are not counted as step time.
            state.window_start += time.perf_counter() - pause_start
    except _PreemptionExit:
        raise Preempted(state.step, state.checkpoint) from None
    finally:
        for w in (job.writer, job.eval_writer):
            if w is not None:
                w.flush()
    _raise_if_non_finite(job, state)
    logging.info(
        "Finished %s at step %d in %s",
        job.config.name,
        state.step,
        _format_eta(time.perf_counter() - run_start),
    )
    return {
        "step": state.step,
        "loss": state.loss,
        "checkpoint": state.checkpoint,
        "eval": state.eval,
        "images_per_sec": state.images_per_sec,
    }


def _to_numpy(value):
    return tf.nest.map_structure(lambda v: v.numpy(), value) if value is not None else None


def _raise_if_non_finite(job: _Job, state: _RunState) -> None:
    """Reads the step's non-finite record (a host read); raises NonFiniteLossError if an update was skipped."""
    step = int(job.train_step.bad_step.numpy())
    if step == 0:
        return
    total, main, aux, grad_norm = (float(v) for v in job.train_step.bad_values.numpy())
    lr = float(poly_from_config(job.config.optimizer, job.config.trainer.train_steps)(step - 1))
    what = f"loss {total}" if not math.isfinite(total) else f"gradient (norm {grad_norm}, loss {total})"
    raise NonFiniteLossError(
        f"non-finite {what} at step {step} (main {main}, aux {aux}, lr {lr:.3g}); stopping without saving. "
        f"Last good checkpoint: {job.checkpoints.model.latest_checkpoint or 'none'} in {job.workdir}. "
        "Lower optimizer.base_lr or add warmup (optimizer.warmup_steps) and rerun."
    )


def _log_step(job: _Job, state: _RunState) -> None:
    """Console line and scalar summaries: the one place the step's metrics are read on the host."""
    _raise_if_non_finite(job, state)
    t = job.config.trainer
    # The rate applied at step k (the optimizer evaluates the same schedule at its iteration k).
    lr = float(poly_from_config(job.config.optimizer, t.train_steps)(state.step - 1))
    values = {k: float(v) for k, v in state.metrics.items() if k != "inputs"}
    state.loss = values["total"]
    elapsed = time.perf_counter() - state.window_start
    step_time = elapsed / max(state.window_steps, 1)
    state.images_per_sec = job.config.data.global_batch_size * state.window_steps / max(elapsed, 1e-9)
    logging.info(
        "step %d/%d loss %.4f (main %.4f aux %.4f) lr %.3g grad_norm %.3g %.2f img/s %.3f s/step ETA %s",
        state.step,
        t.train_steps,
        values["total"],
        values["main"],
        values["aux"],
        lr,
        values["grad_norm"],
        state.images_per_sec,
        step_time,
        _format_eta(step_time * (t.train_steps - state.step)),
    )
    if job.chief:
        summaries.write_scalars(
            job.writer,
            state.step,
            {
                "loss/total": values["total"],
                "loss/main": values["main"],
                "loss/aux": values["aux"],
                "learning_rate": lr,
                "grad_norm": values["grad_norm"],
                "perf/images_per_sec": state.images_per_sec,
                "perf/step_time_sec": step_time,
                "perf/peak_memory_mb": summaries.peak_memory_mb(),
            },
        )
    state.window_start, state.window_steps = time.perf_counter(), 0


def _periodic_actions(job: _Job, state: _RunState) -> None:
    """Image summaries, checkpoint and evaluation due at this step (each checks the non-finite record first)."""
    t = job.config.trainer
    last = state.step == t.train_steps
    if job.chief and t.image_summary_every and (state.step % t.image_summary_every == 0 or last):
        _raise_if_non_finite(job, state)
        _images_action(job, state.step)
    if state.step % t.checkpoint_every == 0 or last:
        _save(job, state)
    if job.hooks.evaluate and ((t.eval_every and state.step % t.eval_every == 0) or last):
        _raise_if_non_finite(job, state)
        state.eval = _eval_action(job, state.step)


def _images_action(job: _Job, step: int) -> None:
    if job.image_batch is None:
        source = (
            job.hooks.eval_dataset_fn() if job.hooks.eval_dataset_fn else _default_image_dataset(job.config)
        )
        job.image_batch = _image_batch(source, 3)
    _write_images(job.writer, step, job.model, job.image_batch, job.config, _palette(job.config)[0])


def _eval_action(job: _Job, step: int) -> dict:
    results = _run_evaluation(job.model, job.config, job.strategy, job.hooks.eval_dataset_fn)
    scalars = summaries.eval_scalars(results, _palette(job.config)[1])
    logging.info(
        "eval step %d: %s",
        step,
        " ".join(f"{k[5:]}={v:.4f}" for k, v in scalars.items() if "/IoU/" not in k),
    )
    if job.chief:
        summaries.write_scalars(job.eval_writer, step, scalars)
    return results
