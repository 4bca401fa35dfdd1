"""What the machine has, and the process-wide TensorFlow switches.

The bottom of the package: nothing here imports the rest of fcn_tf, and
nothing heavy is imported at import time, so scripts can call
`prefer_onednn` before TensorFlow is loaded. Order matters for some calls:

* `prefer_onednn` before TensorFlow is imported (it reads
  `TF_ENABLE_ONEDNN_OPTS` once);
* `set_inter_op_threads` and `configure_logical_cpus` before TensorFlow
  initializes its devices (the first op or device query does).
"""

from __future__ import annotations

import os


def prefer_onednn() -> None:
    """Turns on TensorFlow's oneDNN CPU kernels unless the user chose otherwise.

    TensorFlow enables them by default only on Intel CPUs. On the project's AMD
    CPU they make the train step 1.3-1.8x faster and plain-graph inference
    1.2x faster (BENCHMARKS.md), with the parity tests green. TensorFlow reads
    `TF_ENABLE_ONEDNN_OPTS` once, when it is imported: call this before any
    import that pulls in TensorFlow. A value already exported wins.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def onednn_enabled() -> bool:
    """Whether this TensorFlow process runs oneDNN CPU kernels (imports TensorFlow)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def accelerators_visible() -> bool:
    """Whether TensorFlow sees a GPU or TPU (imports TensorFlow)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU") + tf.config.list_physical_devices("TPU"))


def deterministic_accelerator() -> bool:
    """Whether op determinism is on and a GPU or TPU is visible (imports TensorFlow).

    There, ops without a deterministic GPU kernel (`tf.math.bincount`, a
    scatter-add with repeated indices) raise or are not reproducible; the
    metric and the sliding-window inference switch to deterministic
    formulations.
    """
    from tensorflow.python.framework import config as tf_config

    return bool(tf_config.is_op_determinism_enabled()) and accelerators_visible()


def set_inter_op_threads(threads: int) -> int:
    """Sizes TensorFlow's inter-op thread pool; returns the size set (0: TensorFlow's default).

    Args:
      threads: -1 (auto): 1 when no GPU or TPU is visible, else TensorFlow's
        default. On a CPU-only machine every convolution and matmul already
        spreads over all cores through the intra-op pool; a second op running
        beside it gains a little speed (~2.5% for R50-D8) and keeps more tensors
        alive (250-300 MB; `TrainerConfig.inter_op_threads`).
        0: TensorFlow's default. N > 0: N threads.

    Raises:
      ValueError: `threads` < -1.
      RuntimeError: TensorFlow has already started executing.
    """
    import tensorflow as tf

    if threads < -1:
        raise ValueError(f"inter-op threads must be >= -1 (-1: auto), got {threads}")
    if threads == -1:
        threads = 0 if accelerators_visible() else 1
    if threads != tf.config.threading.get_inter_op_parallelism_threads():
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    return threads


def configure_logical_cpus(count: int) -> None:
    """Splits the first CPU into `count` logical devices ("/cpu:0" ... ).

    Must run before TensorFlow initializes its devices (before the first op
    or device query); used by tests and benchmarks to get several replicas on
    one CPU.

    Raises:
      RuntimeError: TensorFlow is already initialized with another layout.
    """
    import tensorflow as tf

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


class AcceleratorError(ValueError):
    """The machine's accelerators cannot be used as they are (one-line message)."""


def nvidia_smi_gpus() -> int:
    """GPUs the NVIDIA driver lists (`nvidia-smi -L`); 0 without the driver. Does not ask TensorFlow."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def check_accelerators(allow_cpu: bool = False) -> None:
    """Refuses a machine whose accelerators this run would silently not use.

    * TPUs: fcn_tf has no TPU strategy; a TPU VM is refused rather than
      trained on its CPU.
    * GPUs the driver lists (`nvidia-smi`) that TensorFlow does not see
      (TensorFlow installed without its CUDA libraries: `pip install -e .[gpu]`)
      unless `allow_cpu`. GPUs hidden on purpose (`CUDA_VISIBLE_DEVICES=""`)
      are not counted.

    Call it after the cluster is resolved (Slurm chooses this task's GPUs).

    Raises:
      AcceleratorError: one line saying what was found and what to do.
    """
    import tensorflow as tf

    if tf.config.list_physical_devices("TPU"):
        raise AcceleratorError(
            "this machine has TPUs, which fcn_tf does not support (no TPUStrategy); train on GPUs or CPUs"
        )
    if allow_cpu or os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return
    listed = nvidia_smi_gpus()
    if listed and not tf.config.list_physical_devices("GPU"):
        raise AcceleratorError(
            f"nvidia-smi lists {listed} GPU(s) but TensorFlow sees none (installed without its CUDA libraries?): "
            "pip install -e '.[gpu]' (tensorflow[and-cuda]), or pass --allow_cpu to train on the CPU anyway"
        )
