"""What a step saves and where a run resumes: the chief's model checkpoint and each worker's input position.

A step's state is saved in two parts under the same step number:

* the model checkpoint (model, optimizer, step, dropout RNG state) in
  WORKDIR/checkpoints/ckpt-STEP, kept by the chief (the other workers of a
  multi-worker job write theirs, which MultiWorkerMirroredStrategy needs
  them to, to a temporary folder);
* every worker's own input iterator (its shard's position and, inside the
  tf.data state, any shuffle or augmentation randomness) with the number of
  workers, in WORKDIR/checkpoints/input/worker-K/ckpt-STEP.

A step is a resume point only once both parts are saved by every worker
(`resume_point`). Workdirs written before the per-worker input positions
(the "legacy" layout: the iterator inside the model checkpoint) still
resume, on one worker. Checkpoint names are read and written by
fcn_tf.checkpoints only.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from fcn_tf import checkpoints, distribute
from fcn_tf.config import WORKDIR_CONFIG
from fcn_tf.training import agreement, recovery

INPUT_SUBDIR = "input"


def input_dir(workdir: str, worker: int) -> str:
    """Where worker `worker` keeps its input positions: WORKDIR/checkpoints/input/worker-K.

    Args:
      workdir: the training workdir.
      worker: the worker's index (`fcn_tf.distribute.worker_index`).
    """
    return os.path.join(checkpoints.checkpoint_dir(workdir), INPUT_SUBDIR, f"worker-{worker}")


@dataclasses.dataclass
class StepCheckpoints:
    """Where one step's state goes: the model on the chief, each worker's own input position.

    `model` manages model, optimizer, step and dropout RNG; `inputs` manages
    this worker's input iterator and the number of workers (module docstring).
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


def _seed_states(model: keras.Model) -> list:
    """The model's random-state variables (dropout SeedGenerators), in layer order.

    Layer order, not names: Keras numbers SeedGenerators per process, so the
    names differ between processes that built other models first.
    """
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def agreed_resume_point(strategy, workdir: str, facts=()) -> str | None:
    """The resume point every worker restores, chosen by the chief; clears what killed saves left behind.

    Call it before the model is built: the start agreement
    (`fcn_tf.training.agreement.agree_at_start`) compares `facts` before any
    collective of the model (variable broadcasts) can hang on workers that
    differ. Only the chief lists and verifies the checkpoints (`resume_point`,
    which also repairs the state file, before any CheckpointManager reads it).

    Args:
      strategy: the training strategy.
      workdir: the training workdir (absolute).
      facts: this worker's `agreement.start_facts`.

    Raises:
      as `resume_point` (on the chief); agreement.WorkersDisagreeError.
    """
    chief = distribute.is_chief(strategy)
    # Killed saves leave ckpt-STEP_temp/ folders; each worker clears its own
    # folders (the workdir lock excludes a concurrent run).
    if chief:
        checkpoints.remove_partial_saves(checkpoints.checkpoint_dir(workdir))
    checkpoints.remove_partial_saves(input_dir(workdir, distribute.worker_index(strategy)))
    step = None
    if chief:
        try:
            prefix = resume_point(workdir, distribute.num_workers(strategy), chief, legacy_layout(workdir))
        except Exception:
            # The others must not wait for the chief at the all-gather: tell them, then fail here.
            agreement.agree_at_start(strategy, list(facts), None, failed=True)
            raise
        step = None if prefix is None else checkpoints.step_of(prefix)
    step = agreement.agree_at_start(strategy, list(facts), step)
    return None if step is None else checkpoints.prefix_of(checkpoints.checkpoint_dir(workdir), step)


def make_checkpoints(
    strategy, objects, workdir: str, scratch: str, keep: int, resume_from: str | None
) -> StepCheckpoints:
    """The run's checkpoints, to resume from `resume_from`.

    Args:
      strategy: the training strategy.
      objects: (model, optimizer, iterator) of the run.
      workdir: the training workdir (absolute).
      scratch: this worker's temporary folder (the non-chief model checkpoints).
      keep: `trainer.keep_checkpoints`.
      resume_from: `agreed_resume_point(...)`, made before the model was built.
    """
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
    # another count would give the shards other examples (refused, see resume_point).
    input_checkpoint = tf.train.Checkpoint(
        iterator=iterator, num_workers=tf.Variable(workers, dtype=tf.int64, trainable=False)
    )
    chief = distribute.is_chief(strategy)
    own_inputs = input_dir(workdir, distribute.worker_index(strategy))
    legacy = legacy_layout(workdir)
    model_manager = _model_manager(model_checkpoint, workdir, scratch, chief, keep)
    return StepCheckpoints(
        model=model_manager,
        inputs=checkpoints.CheckpointManager(
            input_checkpoint,
            own_inputs,
            max_to_keep=keep,
            resume_point=lambda: _step_before(workdir, model_manager.latest_checkpoint),
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


def _model_manager(model_checkpoint, workdir: str, scratch: str, chief: bool, keep: int):
    # MultiWorkerMirroredStrategy needs every worker to take part in saving
    # the model; only the chief's copy is kept.
    model_dir = checkpoints.checkpoint_dir(workdir) if chief else os.path.join(scratch, "model")
    return checkpoints.CheckpointManager(model_checkpoint, model_dir, max_to_keep=keep if chief else 1)


def _step_before(workdir: str, latest: str | None) -> str | None:
    """The chief's model checkpoint before `latest` (this manager's newest), or None.

    The input positions are saved after their step's model checkpoint: when
    they fail, the rerun resumes from the chief's step before it.
    """
    model_dir = checkpoints.checkpoint_dir(workdir)
    current = checkpoints.step_of(latest) if latest else 0
    earlier = [step for step in checkpoints.checkpoint_steps(model_dir) if step < current]
    return checkpoints.prefix_of(model_dir, earlier[0]) if earlier else None


def _saved_workers(prefix: str) -> int:
    return int(checkpoints.read_checkpoint(prefix).get_tensor("num_workers/.ATTRIBUTES/VARIABLE_VALUE"))


def _inputs_complete(workdir: str, step: int, num_workers: int) -> bool:
    """Whether every worker saved its input position at `step`.

    Raises:
      RuntimeError: they were saved by another number of workers than
        `num_workers` (one-line message).
    """
    first = checkpoints.prefix_of(input_dir(workdir, 0), step)
    if not tf.io.gfile.exists(first + ".index"):
        return False
    saved = _saved_workers(first)
    if not all(step in checkpoints.checkpoint_steps(input_dir(workdir, k)) for k in range(1, saved)):
        return False
    if saved != num_workers:
        raise RuntimeError(
            f"cannot resume {workdir} on {num_workers} worker(s): its input positions at step "
            f"{step} were saved by {saved} worker(s), and another count would give each worker "
            f"other examples; rerun with {saved} worker(s) or use a new --workdir"
        )
    return True


def resume_point(workdir: str, num_workers: int, chief: bool, legacy: bool) -> str | None:
    """The model checkpoint a run on `num_workers` workers resumes from; None for a fresh workdir.

    The newest step whose model checkpoint is readable (`recovery.newest_readable`:
    an unreadable one is set aside with a warning) and, but for a workdir of
    the legacy layout, which has the input position of every worker that
    saved it (a run killed between those saves leaves a newer, incomplete
    step behind, which is passed over). In training only the chief computes
    it (verifying that checkpoint in full) and every worker restores the
    chief's step (`fcn_tf.training.agreement`); only the chief moves files.

    Args:
      workdir: the training workdir.
      num_workers: workers of the run.
      chief: whether this process may repair the workdir (set aside
        unreadable checkpoints, rewrite the state file).
      legacy: `legacy_layout(workdir)`.

    Raises:
      fcn_tf.training.recovery.NoReadableCheckpointError: no checkpoint is readable.
      RuntimeError: input positions saved by another number of workers, the
        legacy layout on several workers, or no step complete.
    """
    model_dir = checkpoints.checkpoint_dir(workdir)
    if legacy and num_workers != 1:
        raise RuntimeError(
            f"cannot resume {workdir} on {num_workers} workers: its checkpoints hold one input "
            "position for all workers (written by an older version); resume it with 1 worker or use a "
            "new --workdir"
        )
    usable = None if legacy else (lambda step: _inputs_complete(workdir, step, num_workers))
    prefix = recovery.newest_readable(model_dir, set_aside=chief, usable=usable)
    if prefix is None and checkpoints.checkpoint_steps(model_dir):
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
      as `resume_point`.
    """
    prefix = resume_point(workdir, num_workers, chief=False, legacy=legacy_layout(workdir))
    return None if prefix is None else checkpoints.step_of(prefix)


def legacy_layout(workdir: str) -> bool:
    """A workdir written before each worker saved its own input position (iterator in the model checkpoint).

    Args:
      workdir: the training workdir.
    """
    model_dir = checkpoints.checkpoint_dir(workdir)
    inputs = os.path.join(model_dir, INPUT_SUBDIR)
    return not tf.io.gfile.exists(inputs) and bool(checkpoints.checkpoint_steps(model_dir))


def restore(ckpts: StepCheckpoints) -> str | None:
    """Restores the model and this worker's input position of the resume point; returns the model prefix.

    Args:
      ckpts: the run's checkpoints (`make_checkpoints`).

    Raises:
      fcn_tf.checkpoints.CheckpointMismatchError: the checkpoint does not
        hold this run's model, optimizer or input pipeline.
    """
    prefix = ckpts.resume_from
    if prefix is None:
        return None
    config_file = os.path.join(ckpts.workdir, WORKDIR_CONFIG)
    if ckpts.legacy:
        # The legacy layout kept the iterator in the model checkpoint.
        legacy = tf.train.Checkpoint(**ckpts.model_objects, iterator=ckpts.input_checkpoint.iterator)
        checkpoints.restore_for_resume(legacy, prefix, config_file)
        return prefix
    checkpoints.restore_for_resume(ckpts.model_checkpoint, prefix, config_file)
    inputs = os.path.join(ckpts.inputs.directory, os.path.basename(prefix))
    checkpoints.restore_for_resume(ckpts.input_checkpoint, inputs, config_file)
    return prefix


def save(ckpts: StepCheckpoints, step: int, chief: bool) -> str:
    """Saves step `step`: the model, then this worker's input position; returns the model prefix.

    Args:
      ckpts: the run's checkpoints.
      step: the step just done.
      chief: whether this worker keeps the model checkpoints.

    Raises:
      fcn_tf.checkpoints.CheckpointSaveError: a part failed (its partial
        files, and on the chief that step's model checkpoint, were removed).
    """
    ckpts.step.assign(step)
    # A step is a resume point only once the model and every worker's input
    # position are saved (`resume_point` passes over an incomplete one), so
    # a save interrupted between the two loses nothing. The model goes first:
    # it is the large write, where a full disk shows, and its failure then
    # leaves no input position of a step that has no model.
    path = ckpts.model.save(checkpoint_number=step)
    try:
        ckpts.inputs.save(checkpoint_number=step)
    except checkpoints.CheckpointSaveError:
        if chief:
            recovery.discard(path)  # the step failed as a whole: its model alone cannot be resumed
        raise
    return path
