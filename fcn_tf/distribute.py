"""Choosing the tf.distribute strategy for the machine the job runs on.

`make_strategy("auto")` follows the hardware: MultiWorkerMirroredStrategy
when the cluster (TensorFlow's `TFConfigClusterResolver` reading `TF_CONFIG`,
or its `SlurmClusterResolver` reading the Slurm job step) has several
workers, MirroredStrategy over the local GPUs (or over several logical
CPUs), else the default strategy. The same training command therefore runs
on 1 CPU, 1 GPU, 8 GPUs or several machines.
"""

from __future__ import annotations

import json
import os
import shutil

import tensorflow as tf

from fcn_tf.devices import check_accelerators, set_inter_op_threads

STRATEGIES = ("auto", "mirrored", "multiworker", "default")
CLUSTERS = ("tf_config", "slurm")
# trainer.collective -> TensorFlow's all-reduce implementation ("auto" is resolved first).
_COLLECTIVES = {
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
}
COLLECTIVE_CHOICES = ("auto", *_COLLECTIVES)
# SlurmClusterResolver's own default first port.
SLURM_PORT_BASE = 8888


def cluster_workers(tf_config: str | None = None) -> int:
    """Number of worker (and chief) tasks in `TF_CONFIG`; 0 when there is none.

    Args:
      tf_config: the TF_CONFIG text (default: the environment variable).

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


def cluster_resolver(cluster: str = "tf_config", slurm_port_base: int = SLURM_PORT_BASE):
    """TensorFlow's resolver for the cluster this process belongs to.

    Args:
      cluster: "tf_config" (`TFConfigClusterResolver`: the `TF_CONFIG`
        variable, e.g. set by Kubernetes operators) or "slurm"
        (`SlurmClusterResolver`: SLURM_PROCID, SLURM_STEP_NUM_TASKS,
        SLURM_STEP_NODELIST and SLURM_STEP_TASKS_PER_NODE of the `srun` step).
      slurm_port_base: first port of the tasks on a node (task i of a node
        listens on slurm_port_base + i).

    Raises:
      ValueError: unknown `cluster`, invalid TF_CONFIG, or a Slurm
        environment the resolver cannot read (one-line message).
    """
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; choose one of {', '.join(CLUSTERS)}")
    if cluster == "tf_config":
        cluster_workers()  # a one-line error for invalid JSON, not the resolver's traceback
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    # Resolved once per process: the resolver narrows CUDA_VISIBLE_DEVICES to this
    # task's GPUs, and a second resolver would split those again.
    key = (slurm_port_base, os.environ.get("SLURM_PROCID"), os.environ.get("SLURM_STEP_NUM_TASKS"))
    if key not in _SLURM_RESOLVERS:
        _SLURM_RESOLVERS[key] = _slurm_resolver(slurm_port_base)
    return _SLURM_RESOLVERS[key]


_SLURM_RESOLVERS: dict = {}


def _slurm_resolver(slurm_port_base: int):
    try:
        if _gpus_on_node():
            # The resolver splits the node's GPUs between its tasks (CUDA_VISIBLE_DEVICES).
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=slurm_port_base)
        else:
            # Without GPUs the resolver still places at most gpus_per_node /
            # gpus_per_task tasks on a node: give it one (unused) slot per task of
            # the step and leave CUDA_VISIBLE_DEVICES alone.
            tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
                port_base=slurm_port_base, gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False
            )
        resolver.cluster_spec()  # resolves task type and id (the resolver sets them only here)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--cluster=slurm: {e}") from None
    return resolver


def _gpus_on_node() -> int:
    """GPUs of this node as SlurmClusterResolver counts them, 0 when there is no NVIDIA driver.

    TensorFlow must not be asked (that initializes it before the resolver
    chooses this task's CUDA_VISIBLE_DEVICES).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver

    try:
        return slurm_cluster_resolver.get_num_gpus()
    except RuntimeError:
        return 0


def resolve_collective(collective: str, gpus: bool) -> str:
    """The all-reduce `trainer.collective` means here: "auto" is NCCL on GPUs, ring elsewhere.

    TensorFlow's own AUTO is a ring all-reduce over gRPC even on GPUs (it uses
    NCCL only when asked), which sends every BatchNorm all-reduce and the
    gradients through the host.

    Args:
      collective: "auto", "nccl" or "ring".
      gpus: whether the replicas are GPUs.
    """
    if collective not in COLLECTIVE_CHOICES:
        raise ValueError(f"unknown collective {collective!r}; choose one of {', '.join(COLLECTIVE_CHOICES)}")
    if collective == "auto":
        return "nccl" if gpus else "ring"
    return collective


def _cluster_size(resolver) -> int:
    spec = resolver.cluster_spec().as_dict()
    return len(spec.get("worker", [])) + len(spec.get("chief", []))


def make_strategy(
    kind: str = "auto",
    cluster: str = "tf_config",
    collective: str = "auto",
    slurm_port_base: int = SLURM_PORT_BASE,
    inter_op_threads: int | None = None,
    allow_cpu: bool | None = None,
) -> tf.distribute.Strategy:
    """Returns the strategy for this machine or the one `kind` forces.

    Args:
      kind: "auto" (cluster of several workers -> multi-worker; GPUs or
        several logical CPUs -> mirrored; else default), "mirrored" (all
        local GPUs, else all local CPUs), "multiworker" (needs a cluster) or
        "default" (no distribution).
      cluster: where the cluster is described, see `cluster_resolver`.
      collective: all-reduce implementation of the multi-worker strategy,
        "auto" (NCCL on GPUs, ring elsewhere: `resolve_collective`), "nccl"
        or "ring".
      slurm_port_base: see `cluster_resolver`.
      inter_op_threads: if not None, `fcn_tf.devices.set_inter_op_threads`
        is called with it once the cluster is resolved: the Slurm resolver
        chooses this task's GPUs (CUDA_VISIBLE_DEVICES), which must happen
        before anything asks TensorFlow about devices.
      allow_cpu: if not None, `fcn_tf.devices.check_accelerators(allow_cpu)`
        once the cluster is resolved: TPUs refused, GPUs that the driver lists
        but TensorFlow does not see refused unless `allow_cpu`.

    Raises:
      ValueError: unknown `kind`, `cluster` or `collective`, or
        "multiworker" without a cluster.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"unknown strategy {kind!r}; choose one of {', '.join(STRATEGIES)}")
    resolve_collective(collective, False)  # an unknown name fails before the cluster is read
    # First: the Slurm resolver sets CUDA_VISIBLE_DEVICES, and any device query fixes the GPUs seen.
    resolver = cluster_resolver(cluster, slurm_port_base) if kind in ("auto", "multiworker") else None
    if allow_cpu is not None:
        check_accelerators(allow_cpu)
    if inter_op_threads is not None:
        set_inter_op_threads(inter_op_threads)
    if kind == "multiworker" or (kind == "auto" and _cluster_size(resolver) > 1):
        if _cluster_size(resolver) == 0:
            where = "TF_CONFIG" if cluster == "tf_config" else "the Slurm job step"
            raise ValueError(f"--strategy=multiworker needs {where} describing the cluster")
        gpus = bool(tf.config.list_physical_devices("GPU"))
        implementation = _COLLECTIVES[resolve_collective(collective, gpus)]
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            ),
        )
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

    Args:
      strategy: the strategy of the run.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def task_id(strategy: tf.distribute.Strategy) -> int:
    """This task's index within its task type (0 without a cluster).

    Args:
      strategy: the strategy of the run.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None else 0


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's position among all workers, chief first (tf.distribute's input pipeline id).

    Args:
      strategy: the strategy of the run.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return 0
    return task_id(strategy) + (1 if has_chief else 0)


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker (and chief) tasks of the job: 1 without a cluster.

    Args:
      strategy: the strategy of the run.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 1
    return max(_cluster_size(resolver), 1)
