"""Process-wide settings a training run makes before it builds the model."""

from __future__ import annotations

import tensorflow as tf

from fcn_tf import distribute
from fcn_tf.config import ExperimentConfig
from fcn_tf.models.sync_batch_norm import check_xla_sync_bn


def apply_training_settings(config: ExperimentConfig, strategy) -> None:
    """Start-up settings of a training run, made before the model is built.

    TF32 follows `trainer.tf32` (TensorFlow enables it by default on Ampere
    and newer GPUs; the reference publishes its numbers without it). XLA
    (`trainer.jit_compile`) with synchronized BatchNorm over several
    replicas is refused here, with a one-line message, where TensorFlow
    cannot compile it: replicas that are not all GPUs, or a ring all-reduce
    between workers (`fcn_tf.models.sync_batch_norm.check_xla_sync_bn`).

    Args:
      config: the validated `ExperimentConfig`.
      strategy: the strategy the run trains with.

    Raises:
      fcn_tf.models.sync_batch_norm.SyncBatchNormXlaError: XLA with synchronized
        BatchNorm on replicas that are not all GPUs.
    """
    tf.config.experimental.enable_tensor_float_32_execution(config.trainer.tf32)
    if config.trainer.jit_compile and config.model.sync_bn:
        devices = strategy.extended.worker_devices
        collective = None
        if distribute.num_workers(strategy) > 1:  # the all-reduce between workers follows the hint
            gpus = all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices)
            collective = distribute.resolve_collective(config.trainer.collective, gpus)
        check_xla_sync_bn(devices, strategy.num_replicas_in_sync, collective)
