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
* `tf.train.CheckpointManager` over model, optimizer, step and the input
  iterator: saved every `checkpoint_every` steps and at the end, resumed
  automatically, saved on SIGTERM through
  `tf.distribute.experimental.PreemptionCheckpointHandler`.
* TensorBoard scalars/images and periodic evaluation on the chief, console
  progress with an ETA, a stop on a non-finite loss, and an exclusive lock
  on the workdir.
"""

from __future__ import annotations

import contextlib
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

from fcn_tf import checkpoints, distribute, runtime, summaries
from fcn_tf.config import WORKDIR_CONFIG, ExperimentConfig, to_json, validate
from fcn_tf.losses import global_valid_pixel_count, segmentation_losses
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


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    config: ExperimentConfig,
) -> Callable:
    """Builds the distributed train step `step(iterator) -> metrics`.

    The returned `tf.function` takes one step's batches from the iterator of
    `make_train_iterator`, runs the replica step on every replica and returns the global
    metrics: "total", "main", "aux" (global per-pixel means) and "grad_norm"
    (norm of the summed, unscaled gradient, L2 term excluded).

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
            losses, micro_grads = forward_backward(x, y, global_count)
            grads = micro_grads if grads is None else [g + m for g, m in zip(grads, micro_grads)]
            totals = {k: totals[k] + losses[k] for k in totals}
        # SUM (not mean) across replicas: every replica's loss was divided by
        # the global count, so the sum is the gradient of the global mean.
        # Done here once instead of in the optimizer, to also get the norm.
        grads = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        grad_norm = tf.linalg.global_norm(grads)
        if loss_scaled:
            grad_norm = grad_norm / tf.cast(optimizer.dynamic_scale, grad_norm.dtype)
        optimizer.apply(grads, variables)
        return totals, grad_norm

    local_replicas, first_replica = _local_replicas(strategy)

    def step(iterator):
        images, labels = next(iterator)
        if local_replicas > 1:
            # (local_replicas, b, ...) -> replica r gets slice r, placed on its device.
            def pick(batch):
                return strategy.experimental_distribute_values_from_function(
                    lambda ctx: batch[ctx.replica_id_in_sync_group - first_replica]
                )

            images, labels = pick(images), pick(labels)
        totals, grad_norm = strategy.run(replica_step, args=(images, labels))
        # Each replica holds its share of the global mean: summing gives it.
        metrics = {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in totals.items()}
        # The norm is identical on every replica (computed from all-reduced grads).
        metrics["grad_norm"] = strategy.reduce(tf.distribute.ReduceOp.MEAN, grad_norm, axis=None)
        return metrics

    return tf.function(step)


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
        config.data.ignore_label,
    )


def _palette(config):
    from fcn_tf.eval_lib import class_names_of, palette_of

    return palette_of(config), class_names_of(config)


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
) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

    Args:
      config: the experiment.
      workdir: output directory (config.json, checkpoints/, tensorboard/).
      strategy: a tf.distribute strategy; `make_strategy("auto")` if None.
      from_scratch: ignore `config.model.pretrained_backbone`.
      model_fn: `config -> keras.Model` (default: `fcn_tf.models.build_fcn`).
      dataset_fn: `input_context -> per-replica training dataset` of
        (images, labels) (default: `fcn_tf.data.build_dataset(..., True, ctx)`).
      eval_dataset_fn: `() -> evaluation dataset` of dicts (default: the
        eval split through `build_dataset(..., False)`); used for periodic
        evaluation and image summaries.
      evaluate: run periodic/final evaluation (needs `fcn_tf.eval_lib`).

    Returns:
      {"step", "loss" (last total loss), "checkpoint", "eval" (last eval
      results or None), "images_per_sec"}.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (no checkpoint written
        after the last good one).
      WorkdirLockedError: another run holds the workdir.
      Preempted: SIGTERM arrived; a checkpoint was saved first.
      FileNotFoundError: the pretrained backbone is missing.
    """
    config = validate(config)
    strategy = strategy or distribute.make_strategy("auto")
    runtime.apply_training_settings(config, strategy)  # TF32; XLA + SyncBN refused where unsupported
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
    # workdir and write their checkpoints to private temporary directories.
    lock = workdir_lock(workdir) if chief else contextlib.nullcontext()
    with lock:
        return _train_locked(
            config,
            workdir,
            strategy,
            chief,
            from_scratch=from_scratch,
            model_fn=model_fn or _default_model_fn,
            dataset_fn=dataset_fn or _default_dataset_fn(config),
            eval_dataset_fn=eval_dataset_fn,
            evaluate=evaluate,
        )


def _train_locked(
    config, workdir, strategy, chief, *, from_scratch, model_fn, dataset_fn, eval_dataset_fn, evaluate
):
    t = config.trainer
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
    tmp_dir = None
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with strategy.scope():
            model = model_fn(config)
            optimizer = build_optimizer(
                config.optimizer, t.train_steps, t.precision, aggregate_gradients=False
            )
            # Create the slot variables now, not inside the traced step (PITFALLS.md).
            optimizer.build(model.trainable_variables)
            step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        iterator = make_train_iterator(strategy, dataset_fn)
        # Keras keeps dropout's random state in SeedGenerator variables that
        # tf.train.Checkpoint does not reach through the model: saved explicitly,
        # or a resumed run would draw other dropout masks than an uninterrupted one.
        rng_states = {f"s{i}": v.value for i, v in enumerate(_seed_states(model))}
        checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=step, iterator=iterator, rng=rng_states
        )
        chief_dir = checkpoints.checkpoint_dir(workdir)
        if chief:
            save_dir = chief_dir
        else:
            # MWMS: every worker must take part in saving; only the chief's copy is kept.
            tmp_dir = tempfile.mkdtemp(prefix=f"fcn_tf_worker{distribute.task_id(strategy)}_")
            save_dir = tmp_dir
            logging.info("Non-chief worker: checkpoints go to %s (removed at the end)", tmp_dir)
        manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=t.keep_checkpoints)

        latest = tf.train.latest_checkpoint(chief_dir)
        if latest:
            try:
                # Every object of this run must be found; extra entries (the preemption
                # handler's run counter, save_counter) are read later or not needed.
                checkpoint.restore(latest).assert_existing_objects_matched().expect_partial()
            except (tf.errors.OpError, AssertionError) as e:
                raise RuntimeError(
                    f"cannot resume from {latest}: {e}\n  The workdir was written by a different model or "
                    f"input pipeline (compare {os.path.join(workdir, CONFIG_FILE)} with this run's config), "
                    "or use a new --workdir."
                ) from e
            logging.info("Resumed from %s (step %d)", latest, int(step.numpy()))
        elif config.model.pretrained_backbone and not from_scratch:
            path = load_pretrained(model, config)
            logging.info("Loaded pretrained backbone %s", path)

        handler = _preemption_handler(strategy, manager)
        train_step = make_train_step(model, optimizer, strategy, config)
        return _loop(
            config,
            workdir,
            strategy,
            chief,
            model,
            optimizer,
            step,
            iterator,
            manager,
            handler,
            train_step,
            eval_dataset_fn,
            evaluate,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, previous_sigterm)
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _seed_states(model: keras.Model) -> list:
    """The model's random-state variables (dropout SeedGenerators), in layer order.

    Layer order, not names: Keras numbers SeedGenerators per process, so the
    names differ between processes that built other models first.
    """
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class _PreemptionExit(Exception):
    pass


def _raise_preemption_exit():
    raise _PreemptionExit()


def _preemption_handler(strategy, manager):
    """TensorFlow's PreemptionCheckpointHandler: on SIGTERM, save at the next step boundary, then stop."""
    try:
        with strategy.scope():
            return tf.distribute.experimental.PreemptionCheckpointHandler(
                getattr(strategy, "cluster_resolver", None),
                manager,
                termination_config=tf.distribute.experimental.TerminationConfig(
                    exit_fn=_raise_preemption_exit
                ),
            )
    except ValueError as e:  # signal handlers can only be installed from the main thread
        logging.warning("No preemption handling (%s)", e)
        return None


def _loop(
    config,
    workdir,
    strategy,
    chief,
    model,
    optimizer,
    step,
    iterator,
    manager,
    handler,
    train_step,
    eval_dataset_fn,
    evaluate,
):
    t = config.trainer
    global_batch = config.data.global_batch_size
    # The rate applied at step k (the optimizer evaluates the same schedule at its iteration k).
    lr_schedule = poly_from_config(config.optimizer, t.train_steps)
    writer = eval_writer = None
    if chief:
        writer = tf.summary.create_file_writer(summaries.summary_dir(workdir, "train"))
        eval_writer = tf.summary.create_file_writer(summaries.summary_dir(workdir, "eval"))
    palette, class_names = _palette(config)
    image_batch = None

    def run_eval(at_step):
        results = _run_evaluation(model, config, strategy, eval_dataset_fn)
        scalars = summaries.eval_scalars(results, class_names)
        logging.info(
            "eval step %d: %s",
            at_step,
            " ".join(f"{k[5:]}={v:.4f}" for k, v in scalars.items() if "/IoU/" not in k),
        )
        if chief:
            summaries.write_scalars(eval_writer, at_step, scalars)
        return results

    def save(at_step):
        path = manager.save(checkpoint_number=at_step)
        logging.info("Saved checkpoint %s", path)
        return path

    current = int(step.numpy())
    start_step = current
    last_loss = float("nan")
    last_eval = None
    last_path = manager.latest_checkpoint
    window_start, window_steps = time.perf_counter(), 0
    run_start = time.perf_counter()
    images_per_sec = 0.0
    logging.info(
        "Training %s for %d steps (from step %d) on %d replica(s), global batch %d, workdir %s",
        config.name,
        t.train_steps,
        current,
        strategy.num_replicas_in_sync,
        global_batch,
        workdir,
    )
    try:
        while current < t.train_steps:
            if handler is not None:
                # Saves (and raises _PreemptionExit) if SIGTERM arrived during the previous step.
                handler.save_checkpoint_if_preempted(checkpoint_number=current)
            lr = float(lr_schedule(current))
            metrics = train_step(iterator)
            step.assign_add(1)
            current += 1
            window_steps += 1
            last_loss = float(metrics["total"])
            if not math.isfinite(last_loss):
                raise NonFiniteLossError(
                    f"non-finite loss {last_loss} at step {current} (main {float(metrics['main'])}, "
                    f"aux {float(metrics['aux'])}, lr {lr:.3g}); stopping without saving. "
                    f"Last good checkpoint: {manager.latest_checkpoint or 'none'} in {workdir}. "
                    "Lower optimizer.base_lr or add warmup (optimizer.warmup_steps) and rerun."
                )
            if current % t.log_every == 0 or current == t.train_steps or current == start_step + 1:
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / max(window_steps, 1)
                images_per_sec = global_batch * window_steps / max(elapsed, 1e-9)
                eta = step_time * (t.train_steps - current)
                logging.info(
                    "step %d/%d loss %.4f (main %.4f aux %.4f) lr %.3g grad_norm %.3g %.2f img/s "
                    "%.3f s/step ETA %s",
                    current,
                    t.train_steps,
                    last_loss,
                    float(metrics["main"]),
                    float(metrics["aux"]),
                    lr,
                    float(metrics["grad_norm"]),
                    images_per_sec,
                    step_time,
                    _format_eta(eta),
                )
                if chief:
                    summaries.write_scalars(
                        writer,
                        current,
                        {
                            "loss/total": last_loss,
                            "loss/main": float(metrics["main"]),
                            "loss/aux": float(metrics["aux"]),
                            "learning_rate": lr,
                            "grad_norm": float(metrics["grad_norm"]),
                            "perf/images_per_sec": images_per_sec,
                            "perf/step_time_sec": step_time,
                            "perf/peak_memory_mb": summaries.peak_memory_mb(),
                        },
                    )
                window_start, window_steps = time.perf_counter(), 0
            pause_start = time.perf_counter()
            if (
                chief
                and t.image_summary_every
                and (current % t.image_summary_every == 0 or current == t.train_steps)
            ):
                if image_batch is None:
                    source = eval_dataset_fn() if eval_dataset_fn else _default_image_dataset(config)
                    image_batch = _image_batch(source, 3)
                _write_images(writer, current, model, image_batch, config, palette)
            if current % t.checkpoint_every == 0 or current == t.train_steps:
                last_path = save(current)
            if evaluate and ((t.eval_every and current % t.eval_every == 0) or current == t.train_steps):
                last_eval = run_eval(current)
            # Saving, evaluation and images are not counted as step time.
            window_start += time.perf_counter() - pause_start
    except _PreemptionExit:
        raise Preempted(current, manager.latest_checkpoint) from None
    finally:
        for w in (writer, eval_writer):
            if w is not None:
                w.flush()
    total = time.perf_counter() - run_start
    logging.info("Finished %s at step %d in %s", config.name, current, _format_eta(total))
    return {
        "step": current,
        "loss": last_loss,
        "checkpoint": manager.latest_checkpoint if chief else last_path,
        "eval": last_eval,
        "images_per_sec": images_per_sec,
    }
