"""Trains an experiment; rerunning the same command resumes from the workdir's last checkpoint.

    python scripts/train.py --experiment=ade20k_r50_os8 --workdir=runs/ade20k_r50_os8 \
        [--data_dir=~/tensorflow_datasets] [--override=trainer.train_steps=1000 ...] \
        [--strategy=auto|mirrored|multiworker|default] [--cluster=tf_config|slurm] [--from_scratch]
        [--init_checkpoint=PATH]

Fine-tuning: --init_checkpoint=PATH (a converted reference model .weights.h5, or another fcn_tf
workdir or checkpoint) starts a new run from every weight whose name and shape match; the
classifiers of another class count start fresh, and the log lists what was loaded and what
re-initialized. Rerunning an interrupted fine-tuning resumes from its own checkpoint.

The strategy follows the machine (multi-worker when the cluster has several
workers, else mirrored over the local GPUs, else the CPU). The cluster is
read by TensorFlow's resolver for TF_CONFIG (Kubernetes and most launchers)
or for Slurm (`srun`, one task per worker); `trainer.collective` picks the
all-reduce (auto = NCCL on GPUs, else ring). On SIGTERM (any platform, also
during evaluation) every worker saves the same step and the process exits with
code 143 (`trainer.preemption_exit_code`); rerun to resume.
"""

import sys

from absl import app


def _resolve_cluster_first():
    """The cluster, resolved before anything asks TensorFlow about devices.

    TensorFlow registers an absl start-up callback that lists the GPUs
    (tensorflow/python/distribute/combinations.py, imported with Keras); that
    fixes the GPUs the process sees before SlurmClusterResolver can give
    each task its own (CUDA_VISIBLE_DEVICES). Registered before TensorFlow
    is imported, this callback runs first; errors are reported by main().
    """
    if _STRATEGY.value in ("auto", "multiworker"):
        try:
            distribute.cluster_resolver(_CLUSTER.value, _SLURM_PORT_BASE.value)
        except ValueError:
            pass
    startup.start_devices()  # only now: the resolver has chosen this task's GPUs


# Registered before TensorFlow is imported: importing it registers a callback
# of its own that lists the GPUs, and callbacks run in the order registered.
app.call_after_init(_resolve_cluster_first)

from fcn_tf import startup  # noqa: E402

startup.start(onednn=True, devices_now=False)  # before TensorFlow is imported; quiet unless --verbosity=1

from absl import flags, logging  # noqa: E402

import experiments  # noqa: E402  (after the start-up callback above)
from fcn_tf import distribute, training
from fcn_tf.config import ConfigError

_EXPERIMENT = flags.DEFINE_string(
    "experiment", None, "Registered experiment name (scripts/list_experiments.py).", required=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory: config.json, checkpoints/, tensorboard/.", required=True
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (overrides data.data_dir).")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "Config assignment key=value, e.g. trainer.train_steps=20; repeatable."
)
_STRATEGY = flags.DEFINE_enum("strategy", "auto", list(distribute.STRATEGIES), "tf.distribute strategy.")
_CLUSTER = flags.DEFINE_enum(
    "cluster", "tf_config", list(distribute.CLUSTERS), "Where the cluster is described: TF_CONFIG or Slurm."
)
_SLURM_PORT_BASE = flags.DEFINE_integer(
    "slurm_port_base", distribute.SLURM_PORT_BASE, "--cluster=slurm: port of a node's first task."
)
_LOCK_WORKDIR = flags.DEFINE_bool(
    "lock_workdir",
    True,
    "Lock the workdir against a second run; --nolock_workdir only where the filesystem refuses locks.",
)
_ALLOW_CPU = flags.DEFINE_bool(
    "allow_cpu", False, "Train on the CPU although nvidia-smi lists GPUs that TensorFlow does not see."
)
_FROM_SCRATCH = flags.DEFINE_bool(
    "from_scratch", False, "Ignore model.pretrained_backbone and start from random weights."
)


_INIT_CHECKPOINT = flags.DEFINE_string(
    "init_checkpoint", "", "Fine-tune: start a new run from this checkpoint's matching weights."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    assignments = list(_OVERRIDE.value)
    if _DATA_DIR.value:
        assignments.append(f"data.data_dir={_DATA_DIR.value}")
    try:
        # A workdir that was trained before resumes with the config it wrote.
        config = experiments.resolve(_EXPERIMENT.value, _WORKDIR.value, assignments)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        # The cluster is resolved before any device query (Slurm sets this task's GPUs).
        strategy = distribute.make_strategy(
            _STRATEGY.value,
            _CLUSTER.value,
            config.trainer.collective,
            _SLURM_PORT_BASE.value,
            inter_op_threads=config.trainer.inter_op_threads,
            allow_cpu=_ALLOW_CPU.value,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        result = training.train(
            config,
            _WORKDIR.value,
            strategy,
            from_scratch=_FROM_SCRATCH.value,
            init_checkpoint=_INIT_CHECKPOINT.value,
            lock_workdir=_LOCK_WORKDIR.value,
        )
    except training.Preempted as e:
        logging.warning("%s", e)
        sys.exit(e.exit_code)
    except (
        training.NonFiniteLossError,
        training.WorkdirLockedError,
        training.InitCheckpointError,
        FileNotFoundError,
        RuntimeError,
        ConfigError,  # e.g. a global batch the replicas do not divide: the overrides that start
    ) as e:
        sys.exit(f"error: {e}")
    evaluation = result.get("eval")
    if evaluation:
        print(
            f"{config.name}: step {result['step']}, mIoU {evaluation['miou']:.4f}, aAcc {evaluation['aacc']:.4f} "
            f"({result['checkpoint']})"
        )
    else:
        print(f"{config.name}: step {result['step']}, loss {result['loss']:.4f} ({result['checkpoint']})")


if __name__ == "__main__":
    app.run(main)
