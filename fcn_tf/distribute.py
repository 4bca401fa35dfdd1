"""Choosing the tf.distribute strategy for the machine the job runs on.

`make_strategy("auto")` follows the hardware: MultiWorkerMirroredStrategy
when `TF_CONFIG` describes a cluster of several workers, MirroredStrategy
over the local GPUs (or over several logical CPUs), else the default
strategy. The same training command therefore runs on 1 CPU, 1 GPU, 8 GPUs
or several machines.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "multiworker", "default")


def configure_logical_cpus(count: int) -> None:
    """Splits the first CPU into `count` logical devices ("/cpu:0" ... ).

    Must run before TensorFlow initializes its devices (before the first op
    or device query); used by tests and benchmarks to get several replicas on
    one CPU.

    Raises:
      RuntimeError: TensorFlow is already initialized with another layout.
    """
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as e:
        raise RuntimeError(
            f"cannot split the CPU into {count} logical devices: TensorFlow is already initialized. "
            "Call configure_logical_cpus() before any TensorFlow op."
        ) from e


def cluster_workers(tf_config: str | None = None) -> int:
    """Number of worker (and chief) tasks in `TF_CONFIG`; 0 when there is none.

    Raises:
      ValueError: TF_CONFIG is not valid JSON (the message quotes it).
    """
    text = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not text.strip():
        return 0
    try:
        cluster = json.loads(text).get("cluster", {})
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {text!r} ({e})") from e
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def make_strategy(kind: str = "auto") -> tf.distribute.Strategy:
    """Returns the strategy for this machine or the one `kind` forces.

    Args:
      kind: "auto" (cluster -> multi-worker; GPUs or several logical CPUs ->
        mirrored; else default), "mirrored" (all local GPUs, else all local
        CPUs), "multiworker" (needs TF_CONFIG) or "default" (no distribution).

    Raises:
      ValueError: unknown `kind`, or "multiworker" without a TF_CONFIG cluster.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy {kind!r}; choose one of {', '.join(STRATEGIES)}")
    if kind == "multiworker" or (kind == "auto" and cluster_workers() > 1):
        if kind == "multiworker" and cluster_workers() == 0:
            raise ValueError("--strategy=multiworker needs TF_CONFIG describing the cluster")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "default":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    if kind == "mirrored" or len(cpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the task that writes summaries, config and the real checkpoints.

    The chief is task "chief", or worker 0 when the cluster has no chief;
    without a cluster the only process is the chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def task_id(strategy: tf.distribute.Strategy) -> int:
    """This task's index within its task type (0 without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None else 0


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's position among all workers, chief first (tf.distribute's input pipeline id)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return 0
    return task_id(strategy) + (1 if has_chief else 0)
