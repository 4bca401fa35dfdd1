"""Trains an experiment; rerunning the same command resumes from the workdir's last checkpoint.

    python scripts/train.py --experiment=ade20k_r50_os8 --workdir=runs/ade20k_r50_os8 \
        [--data_dir=~/tensorflow_datasets] [--override=trainer.train_steps=1000 ...] \
        [--strategy=auto|mirrored|multiworker|default] [--cluster=tf_config|slurm] [--from_scratch]

The strategy follows the machine (multi-worker when the cluster has several
workers, else mirrored over the local GPUs, else the CPU). The cluster is
read by TensorFlow's resolver for TF_CONFIG (Kubernetes and most launchers)
or for Slurm (`srun`, one task per worker); `trainer.collective` picks the
all-reduce (auto, nccl, ring). On SIGTERM a checkpoint is saved and the
process exits with code 42 (rerun to resume).
"""

import sys

from fcn_tf.devices import prefer_onednn

prefer_onednn()  # before TensorFlow is imported

from absl import app, flags, logging

import experiments
from fcn_tf import distribute, training
from fcn_tf.config import ConfigError
from fcn_tf.devices import set_inter_op_threads

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
_FROM_SCRATCH = flags.DEFINE_bool(
    "from_scratch", False, "Ignore model.pretrained_backbone and start from random weights."
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
    set_inter_op_threads(config.trainer.inter_op_threads)  # before the strategy starts TensorFlow
    try:
        strategy = distribute.make_strategy(
            _STRATEGY.value, _CLUSTER.value, config.trainer.collective, _SLURM_PORT_BASE.value
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        result = training.train(config, _WORKDIR.value, strategy, from_scratch=_FROM_SCRATCH.value)
    except training.Preempted as e:
        logging.warning("%s", e)
        sys.exit(training.PREEMPTED_EXIT_CODE)
    except (
        training.NonFiniteLossError,
        training.WorkdirLockedError,
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
