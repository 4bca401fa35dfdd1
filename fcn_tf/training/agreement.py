"""Workers that agree before the first step: one all-gather of what each worker runs, the chief's resume step.

The workers of a multi-worker job each build their own graph from their own
config, files and machine; the strategy does not compare them. A worker on
another TensorFlow, without GPUs, started with another `--override`, or
missing the pretrained file would otherwise train a different update (each
applying the all-reduced gradient its own way) or exit alone while the others
wait for it forever.

So before the first step every worker contributes one row to an all-gather
over the workers (a collective on each worker's CPU, independent of how many
replicas each has): a hash of each fact (`start_facts`: versions, replicas
and device kind, kernel choice, every key of the resolved config, the
pretrained weights' checksum) and the step it would resume from. Only the
chief chooses that step, verifying the checkpoint in full
(`fcn_tf.training.resume.resume_point`); every worker restores the chief's
step, so a newer checkpoint that one worker sees (NFS attribute caching, a
checkpoint set aside by the chief) cannot split the run. After the restore
a second all-gather compares a checksum of the restored weights.

Any difference stops every worker with the same one line naming the worker
and what differs (`WorkersDisagreeError`); a worker that failed before the
all-gather (the chief could not choose a step, a restore failed) is named
too, instead of the others waiting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata

import numpy as np
import tensorflow as tf

from fcn_tf import distribute, storage
from fcn_tf.config import ExperimentConfig, to_dict

# Collective keys of our own, far from tf.distribute's (which count up from 1).
_GROUP_KEY = 7_340_021
_INSTANCE_KEYS = {"start": 7_340_101, "weights": 7_340_102}
# How long a worker waits for the others at an all-gather (a worker that
# died before it is then named by the timeout instead of a hang).
TIMEOUT_SECONDS = 900.0

# Columns of the start all-gather: the facts' hashes, zeros, the step last.
ROW_WIDTH = 512

# Values of the step column.
FRESH = -1  # no checkpoint: start from step 0
FAILED = -2  # this worker failed before the all-gather (its log says why)


class WorkersDisagreeError(RuntimeError):
    """The workers of a job do not run the same thing (or one failed before the others); raised on every worker."""


@dataclasses.dataclass(frozen=True)
class Fact:
    """One thing every worker must agree on: its name in messages and this worker's value."""

    name: str
    value: str


def _leaves(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def file_checksum(path: str) -> str:
    """sha256 of a file (`tf.io.gfile`), "missing: PATH" when there is none, "" for no path."""
    if not path:
        return ""
    path = storage.normalize(path)
    if not tf.io.gfile.exists(path):
        return f"missing: {path}"
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def start_facts(config: ExperimentConfig, replicas: int, device_kind: str, kernels: str, pretrained: str):
    """What every worker must agree on before the first step.

    Args:
      config: the resolved config that runs (`fcn_tf.training.recipe.for_replicas`).
      replicas: this worker's replicas.
      device_kind: "GPU", "TPU" or "CPU": what they are.
      kernels: the kernel choice the model runs (`fcn_tf.models.layers`), with oneDNN's state.
      pretrained: `file_checksum` of the pretrained weights this worker would load ("" for none).
    """
    facts = [
        Fact("fcn_tf version", importlib.metadata.version("fcn_tf")),
        Fact("TensorFlow version", tf.__version__),
        Fact("replicas per worker", str(replicas)),
        Fact("device kind", device_kind),
        Fact("kernels", kernels),
        Fact("pretrained weights", pretrained),
    ]
    return facts + [Fact(key, repr(value)) for key, value in _leaves(to_dict(config))]


def _hash(value: str) -> int:
    return int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "little", signed=True)


def _all_gather(strategy, row: np.ndarray, which: str) -> np.ndarray:
    """(workers, len(row)) int64: every worker's row, in worker order (a collective on each worker's CPU)."""
    workers = distribute.num_workers(strategy)
    device = strategy.extended.worker_devices[0].rsplit("/device:", 1)[0] + "/device:CPU:0"
    # Each row carries its worker index: the gather orders its members by device name.
    row = np.concatenate([[distribute.worker_index(strategy)], row]).astype(np.int64)
    with tf.device(device):
        gathered = tf.raw_ops.CollectiveGatherV2(
            input=tf.constant(row[np.newaxis], tf.int64),
            group_size=tf.constant(workers),
            group_key=tf.constant(_GROUP_KEY),
            instance_key=tf.constant(_INSTANCE_KEYS[which]),
            ordering_token=[],
            communication_hint="ring",
            timeout_seconds=TIMEOUT_SECONDS,
        )
    rows = gathered.numpy()
    return rows[np.argsort(rows[:, 0], kind="stable"), 1:]


def compare(facts: list[Fact], rows: np.ndarray, me: int) -> str | None:
    """The one line naming the first worker and fact that differ from the chief (worker 0), or None.

    Args:
      facts: this worker's facts (names and values; rows hold their hashes
        followed by the step column).
      rows: (workers, ROW_WIDTH) from the all-gather: the facts' hashes first.
      me: this worker's index (its own value is shown when it is the one named).
    """
    for worker in range(1, len(rows)):
        for column, fact in enumerate(facts):
            if rows[worker, column] != rows[0, column]:
                mine = f" (worker {me}: {fact.name} {fact.value or 'none'})"
                return f"worker {worker} differs from worker 0 in {fact.name}{mine}; start every worker alike"
    return None


def agree_at_start(strategy, facts: list[Fact], chief_step: int | None, failed: bool = False) -> int | None:
    """All-gathers the facts and the chief's resume step; returns that step (None: a fresh run).

    On one worker (no cluster) there is no one to disagree with: returns `chief_step`.

    Args:
      strategy: the training strategy.
      facts: `start_facts` of this worker.
      chief_step: the step the chief chose (`resume.resume_point`), None for a
        fresh run; ignored on the other workers.
      failed: this worker failed before the all-gather (the chief could not
        choose a step): the others then stop, naming it; this one returns
        None and raises its own error.

    Raises:
      WorkersDisagreeError: a fact differs, or the chief failed (one line,
        the same on every worker).
    """
    if distribute.num_workers(strategy) == 1:
        return chief_step
    step = FAILED if failed else (FRESH if chief_step is None else chief_step)
    # A fixed width: another fcn_tf version may have other config keys, and the
    # gather needs every row the same size (the version column then differs first).
    hashes = [_hash(f.value) for f in facts]
    if len(hashes) >= ROW_WIDTH:
        raise ValueError(f"{len(hashes)} facts do not fit the agreement's {ROW_WIDTH} columns")
    row = np.array(hashes + [0] * (ROW_WIDTH - 1 - len(hashes)) + [step], np.int64)
    rows = _all_gather(strategy, row, "start")
    if failed:
        return None  # the caller raises its own error
    if rows[0, -1] == FAILED:
        raise WorkersDisagreeError("worker 0 (the chief) could not choose the resume step (its log says why)")
    problem = compare(facts, rows, distribute.worker_index(strategy))
    if problem:
        raise WorkersDisagreeError(f"workers disagree before the first step: {problem}")
    return None if rows[0, -1] == FRESH else int(rows[0, -1])


def weights_checksum(variables) -> str:
    """sha256 over the values of `variables`, in order."""
    digest = hashlib.sha256()
    for v in variables:
        digest.update(np.ascontiguousarray(v.numpy()).tobytes())
    return digest.hexdigest()


def agree_on_weights(strategy, variables, failed: bool = False) -> None:
    """All-gathers a checksum of the restored weights; every worker must hold the same.

    Args:
      strategy: the training strategy.
      variables: the model's and optimizer's variables, in the same order on every worker.
      failed: this worker's restore failed: the others stop naming it; this
        one returns and raises its own error.

    Raises:
      WorkersDisagreeError: a worker restored other weights, or another failed to restore.
    """
    if distribute.num_workers(strategy) == 1:
        return
    checksum = "" if failed else weights_checksum(variables)
    row = np.array([FAILED if failed else _hash(checksum)], np.int64)
    rows = _all_gather(strategy, row, "weights")
    if failed:
        return  # the caller raises its own error
    for worker, (value,) in enumerate(rows):
        if value == FAILED:
            raise WorkersDisagreeError(
                f"worker {worker} could not restore the resume step (its log says why)"
            )
    for worker in range(1, len(rows)):
        if rows[worker, 0] != rows[0, 0]:
            raise WorkersDisagreeError(
                f"workers disagree after the restore: worker {worker} differs from worker 0 in the restored "
                f"weights (worker {distribute.worker_index(strategy)}: checksum {checksum[:16]})"
            )
