"""The training controller: `train()` runs the whole job around the train step of step.py.

`train(config, workdir)` runs on whatever `make_strategy` returns (default,
mirrored over GPUs/CPUs, or multi-worker):

* `TorchSGD` (PyTorch-style L2 + momentum) on the per-iteration poly
  schedule; optional gradient accumulation and mixed precision (step.py).
* checkpoints every `checkpoint_every` steps, at the end and on SIGTERM
  (`tf.distribute.experimental.PreemptionCheckpointHandler`): the chief's
  model checkpoint and every worker's own input position under the same
  step (resume.py); resumed automatically from the newest complete step.
* the loss stays on the device except at logging steps: a non-finite update
  is skipped in the graph and the run stops at the next host read, before
  any checkpoint.
* TensorBoard scalars/images and periodic evaluation on the chief, console
  progress with an ETA, and an exclusive lock on the workdir (workdir.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from fcn_tf import distribute, eval_lib, storage, summaries
from fcn_tf.config import ExperimentConfig, validate
from fcn_tf.data import build_dataset
from fcn_tf.devices import onednn_enabled
from fcn_tf.models import build_fcn
from fcn_tf.models.convert import load_pretrained_backbone
from fcn_tf.models.layers import resolve_kernels
from fcn_tf.optimizers import build_optimizer
from fcn_tf.schedules import poly_from_config
from fcn_tf.training import agreement, preemption, recipe, resume
from fcn_tf.training.init_checkpoint import initialize
from fcn_tf.training.preemption import Preempted
from fcn_tf.training.settings import apply_training_settings
from fcn_tf.training.step import TrainStep, make_train_iterator, make_train_step
from fcn_tf.training.workdir import workdir_lock, write_config


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


def load_pretrained(model: keras.Model, config: ExperimentConfig) -> str:
    """Loads `config.model.pretrained_backbone` into the model's backbone; returns its path.

    Args:
      model: the segmenter.
      config: the experiment (model.pretrained_backbone and its source).

    Raises:
      FileNotFoundError: the file is missing; the message says where the
        original checkpoint is published and how to train without it.
    """
    path = storage.normalize(config.model.pretrained_backbone)
    if not tf.io.gfile.exists(path):
        source = config.model.pretrained_backbone_source or "(no source recorded)"
        raise FileNotFoundError(
            f"pretrained backbone not found: {path}\n"
            f"  It is the converted ImageNet checkpoint published at {source}\n"
            f"  (convert it with fcn_tf.models.convert), or train from random init with --from_scratch "
            f"or --override=model.pretrained_backbone="
        )
    load_pretrained_backbone(model, path, config.model.pretrained_backbone_source)
    return path


# --------------------------------------------------------------------------- train


def train(
    config: ExperimentConfig,
    workdir: str,
    strategy: tf.distribute.Strategy | None = None,
    *,
    from_scratch: bool = False,
    init_checkpoint: str = "",
    model_fn: Callable[[ExperimentConfig], keras.Model] | None = None,
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset] | None = None,
    eval_dataset_fn: Callable[[], tf.data.Dataset] | None = None,
    evaluate: bool = True,
    input_observer: Callable[[int, object], None] | None = None,
    lock_workdir: bool = True,
) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

    Args:
      config: the experiment.
      workdir: output directory (config.json, checkpoints/, tensorboard/),
        shared by all workers of a multi-worker job.
      strategy: a tf.distribute strategy; `make_strategy("auto")` if None.
      from_scratch: ignore `config.model.pretrained_backbone`.
      init_checkpoint: fine-tuning: a new run starts from the weights of this
        workdir, checkpoint or `.weights.h5` whose names and shapes match
        (`fcn_tf.training.init_checkpoint`; the log lists what was loaded and
        what re-initialized); a resumed run restores its own checkpoint.
      model_fn: `config -> keras.Model` (default: `fcn_tf.models.build_fcn`).
      dataset_fn: `input_context -> per-replica training dataset` of
        (images, labels), or of (images, labels, extras) with any extra
        tensors the step passes through to `input_observer` (default:
        `fcn_tf.data.build_dataset(..., True, ctx)`).
      eval_dataset_fn: `() -> evaluation dataset` of dicts (default: the
        eval split through `build_dataset(..., False)`); used for periodic
        evaluation and image summaries.
      evaluate: run periodic/final evaluation (`fcn_tf.eval_lib`).
      input_observer: `(step, extras) -> None`, called on this worker after
        every step with the step number and the `extras` (as numpy) of the
        batch that step consumed, e.g. to record which examples each worker
        trained on. It reads them on the host every step: for tests and
        tooling, not for fast training.
      lock_workdir: lock the workdir (`workdir.workdir_lock`); False only on
        a filesystem that refuses locks, with one run per workdir.

    Returns:
      {"step", "loss" (last total loss), "checkpoint", "eval" (last eval
      results or None), "images_per_sec"}.

    Raises:
      NonFiniteLossError: the loss became NaN/inf (that update and later
        ones were not applied; no checkpoint written after the last good one).
      WorkdirLockedError: another run holds the workdir.
      Preempted: SIGTERM arrived; a checkpoint was saved first.
      FileNotFoundError: the pretrained backbone or the init checkpoint is missing.
      RuntimeError: the workdir cannot be resumed on this number of workers.
      Each with a one-line message, from its module: `ConfigError` (the batch
      does not split over the replicas, `recipe.for_replicas`),
      `WorkersDisagreeError` (`agreement`), `InitCheckpointError`,
      `NoReadableCheckpointError` (unreadable newest checkpoints are set aside
      first), `CheckpointMismatchError`, `CheckpointSaveError` (`checkpoints`).
    """
    config = validate(config)
    strategy = strategy or distribute.make_strategy("auto")
    apply_training_settings(config, strategy)  # TF32; XLA + SyncBN refused where unsupported
    # Kept as given: a URL (gs://, file://, ...) stays a URL (fcn_tf.storage).
    workdir = storage.normalize(workdir)
    # The recipe on these replicas (train steps from the epochs, the LR rule), logged.
    given, (config, derivation) = config, recipe.for_replicas(config, strategy.num_replicas_in_sync)
    logging.info("%s", derivation)
    tf.io.gfile.makedirs(workdir)
    model_fn = model_fn or (lambda c: build_fcn(c.model))
    dataset_fn = dataset_fn or (lambda input_context: build_dataset(config.data, True, input_context))
    hooks = _Hooks(model_fn, dataset_fn, eval_dataset_fn, evaluate, input_observer)
    start = _Start(given, from_scratch, init_checkpoint)
    # Only the chief locks: the other workers of a multi-worker job share the
    # workdir (they write only their own input positions there).
    chief = distribute.is_chief(strategy)
    with workdir_lock(workdir, lock_workdir) if chief else contextlib.nullcontext():
        return _train_locked(config, workdir, strategy, hooks, start)


@dataclasses.dataclass(frozen=True)
class _Start:
    """How a new run starts (a resumed run restores its own checkpoint instead)."""

    given: ExperimentConfig  # as the caller gave it (config.json): a resumed run derives the same numbers
    from_scratch: bool
    init_checkpoint: str


def _pretrained(config: ExperimentConfig, start: _Start) -> str:
    # The backbone weights a new run loads: none from scratch or when fine-tuning from another model.
    return "" if start.from_scratch or start.init_checkpoint else config.model.pretrained_backbone


def _initial_weights(strategy, ckpts, model, optimizer, config: ExperimentConfig, start: _Start) -> None:
    """Restores the run's own checkpoint, else initializes from `start`; every worker then compares weights."""
    try:
        resumed = resume.restore(ckpts)
        if resumed is not None:
            logging.info("Resumed from %s (step %d)", resumed, int(ckpts.step.numpy()))
        elif start.init_checkpoint:
            for line in initialize(model, start.init_checkpoint, config.model).lines():
                logging.info("%s", line)
        elif _pretrained(config, start):
            logging.info("Loaded pretrained backbone %s", load_pretrained(model, config))
    except Exception:
        agreement.agree_on_weights(strategy, (), failed=True)  # the other workers are told, not left waiting
        raise
    agreement.agree_on_weights(strategy, [*model.weights, *optimizer.variables])


@dataclasses.dataclass(frozen=True)
class _Hooks:
    """The caller's pieces of `train`."""

    model_fn: Callable
    dataset_fn: Callable
    eval_dataset_fn: Callable | None
    evaluate: bool
    input_observer: Callable | None


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
    checkpoints: resume.StepCheckpoints
    hooks: _Hooks
    writer: object = None
    eval_writer: object = None
    handler: object = None
    watcher: object = None
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


def _train_locked(config, workdir, strategy, hooks, start):
    t = config.trainer
    chief = distribute.is_chief(strategy)
    if t.deterministic:
        # Same ops, same order, same results: required for exact resume.
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(t.seed)
    if chief:
        # As given (train steps 0, LR unscaled): a resumed run derives the same numbers again.
        write_config(start.given, workdir)

    previous_policy = keras.mixed_precision.global_policy()
    if t.precision != "float32":
        # Activations in (b)float16, variables in float32; the loss casts
        # logits to float32 (fcn_tf/losses.py).
        keras.mixed_precision.set_global_policy(t.precision)
    scratch = tempfile.mkdtemp(prefix=f"fcn_tf_worker{distribute.worker_index(strategy)}_")
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        pretrained = _pretrained(config, start)
        # Before the model's collectives: every worker agrees on what it runs and
        # takes the step the chief chose.
        resume_from = resume.agreed_resume_point(
            strategy, workdir, _start_facts(config, strategy, pretrained)
        )
        with strategy.scope():
            model = hooks.model_fn(config)
            optimizer = build_optimizer(
                config.optimizer, t.train_steps, t.precision, aggregate_gradients=False
            )
            # Create the slot variables now, not inside the traced step (see build_optimizer).
            optimizer.build(model.trainable_variables)
        iterator = make_train_iterator(strategy, hooks.dataset_fn)
        ckpts = resume.make_checkpoints(
            strategy, (model, optimizer, iterator), workdir, scratch, t.keep_checkpoints, resume_from
        )
        _initial_weights(strategy, ckpts, model, optimizer, config, start)
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
        job.watcher = preemption.SigtermWatcher()  # SIGTERM on every platform (preemption.py)
        job.handler = preemption.make_handler(
            strategy, scratch, lambda **_: _save_once(job, state), job.watcher
        )
        return _loop(job, state)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, previous_sigterm)
        shutil.rmtree(scratch, ignore_errors=True)


def _start_facts(config, strategy, pretrained: str) -> list:
    """This worker's `agreement.start_facts`: its replicas, their device kind, the kernels, the pretrained file.

    None on one worker: there is no one to disagree with.
    """
    if distribute.num_workers(strategy) == 1:
        return []
    devices = strategy.extended.worker_devices
    kind = tf.DeviceSpec.from_string(devices[0]).device_type or "CPU"
    kernels = resolve_kernels(config.model.kernels)
    if kernels == "cpu_fast":
        kernels += f", oneDNN {'on' if onednn_enabled() else 'off'}"
    checksum = agreement.file_checksum(pretrained)
    return agreement.start_facts(config, len(devices), kind, kernels, checksum)


# --------------------------------------------------------------------------- checkpoint and preemption


def _save(job: _Job, state: _RunState) -> str:
    """Saves step `state.step` (`resume.save`); returns the model prefix."""
    # Never a checkpoint of weights after a skipped, non-finite update.
    _raise_if_non_finite(job, state)
    path = resume.save(job.checkpoints, state.step, job.chief)
    if job.chief:
        logging.info("Saved checkpoint %s", path)
    state.checkpoint = path
    return path


def _save_once(job: _Job, state: _RunState) -> None:
    """The preemption save: step `state.step` unless its periodic checkpoint is already written."""
    if state.checkpoint is None or not state.checkpoint.endswith(f"-{state.step}"):
        _save(job, state)


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
    except preemption.PreemptionExit:
        raise Preempted(state.step, state.checkpoint, t.preemption_exit_code) from None
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


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


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


# --------------------------------------------------------------------------- periodic actions


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
        try:
            state.eval = _eval_action(job, state.step)
        except eval_lib.EvaluationInterrupted:
            # Every worker stopped at the same batch (eval_lib agrees on it): all save this step.
            _save_once(job, state)
            raise preemption.PreemptionExit() from None


def _images_action(job: _Job, step: int) -> None:
    if job.image_batch is None:
        eval_dataset_fn = job.hooks.eval_dataset_fn
        source = eval_dataset_fn() if eval_dataset_fn else build_dataset(job.config.data, False)
        job.image_batch = summaries.image_batch(source, 3)
    summaries.write_predictions(job.writer, step, job.model, job.image_batch, job.config)


def _eval_action(job: _Job, step: int) -> dict:
    # eval_dataset_fn None: eval_lib builds the eval split itself, sharded per worker.
    results = eval_lib.evaluate(
        job.model,
        job.hooks.eval_dataset_fn,
        job.config,
        strategy=job.strategy,
        max_examples=job.config.trainer.eval_max_examples,
        log_every=0,
        stop_fn=job.watcher.received if job.watcher is not None else None,
    )
    scalars = summaries.eval_scalars(results, summaries.class_names(job.config))
    logging.info(
        "eval step %d: %s",
        step,
        " ".join(f"{k[5:]}={v:.4f}" for k, v in scalars.items() if "/IoU/" not in k),
    )
    if job.chief:
        summaries.write_scalars(job.eval_writer, step, scalars)
    return results
