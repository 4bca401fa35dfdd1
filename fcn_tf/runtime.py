"""Process-wide TensorFlow settings, and where a train step's ops run.

`prefer_onednn` runs before TensorFlow is imported; `set_inter_op_threads`
before TensorFlow executes anything (creating the strategy does);
`apply_training_settings` when a training run starts. This module imports
nothing heavy at import time, so scripts can call it first.

`check_train_step` and `gpu_check` are the accelerator smoke check: a few
train steps of a small FCN, failing where a convolution, matmul or BatchNorm
op is placed off the GPU or the CPU-only kernels appear in the step.
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


def apply_training_settings(config, strategy) -> None:
    """Start-up settings of a training run, made before the model is built.

    TF32 follows `trainer.tf32` (TensorFlow enables it by default on Ampere
    and newer GPUs; the reference publishes its numbers without it). XLA
    (`trainer.jit_compile`) with synchronized BatchNorm over several
    replicas is refused here, with a one-line message, where TensorFlow
    cannot compile it (`fcn_tf.models.layers.check_xla_sync_bn`).

    Args:
      config: the validated `ExperimentConfig`.
      strategy: the strategy the run trains with.

    Raises:
      fcn_tf.models.layers.SyncBatchNormXlaError: XLA with synchronized
        BatchNorm on replicas that are not all GPUs.
    """
    import tensorflow as tf

    from fcn_tf.models.layers import check_xla_sync_bn

    tf.config.experimental.enable_tensor_float_32_execution(config.trainer.tf32)
    if config.trainer.jit_compile and config.model.sync_bn:
        check_xla_sync_bn(strategy.extended.worker_devices, strategy.num_replicas_in_sync)


# Op types of a train step that must run on the accelerator, as substrings so
# that Grappler's fused and oneDNN forms (_FusedConv2D, _MklFusedBatchNormV3)
# match too.
ACCELERATOR_OP_TYPES = ("Conv2D", "MatMul", "FusedBatchNorm")


def traced_ops(graph) -> list[tuple[str, str]]:
    """(name, type) of every op of a traced graph and of the functions it calls.

    Args:
      graph: a `tf.function`'s graph (`get_concrete_function(...).graph`).
    """
    ops = [(op.name, op.type) for op in graph.get_operations()]
    for function in graph.as_graph_def().library.function:
        ops += [(node.name, node.op) for node in function.node_def]
    return ops


def cpu_kernel_ops(graph) -> list[str]:
    """Names of the ops only the "cpu_fast" kernels make (`fcn_tf.models.layers.CPU_KERNEL_SCOPE`).

    Args:
      graph: a traced graph, e.g. of a train step.
    """
    import re

    from fcn_tf.models.layers import CPU_KERNEL_SCOPE

    scope = re.compile(rf"(^|/){CPU_KERNEL_SCOPE}(_\d+)?/")
    return sorted(name for name, _ in traced_ops(graph) if scope.search(name))


def op_placement(fn, *args) -> list[tuple[str, str]]:
    """Runs the `tf.function` `fn(*args)` once; returns (op type, device) of every op TensorFlow ran.

    The ops are those of the partitioned graphs after Grappler, with the
    device TensorFlow's placer gave each (run metadata of the call).
    TensorFlow records them only when it first runs a traced function: call
    this on a function not yet run with these argument types (else: []).

    Args:
      fn: a `tf.function`.
      *args: its arguments.
    """
    from tensorflow.python.eager import context

    context.enable_run_metadata()
    try:
        fn(*args)
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    return [
        (node.op, node.device)
        for function_graph in metadata.function_graphs
        for partition in function_graph.partition_graphs
        for node in partition.node
    ]


def check_train_step(devices, steps: int = 3, precision: str = "float32", image_size: int = 64) -> dict:
    """Trains a small FCN (R18-D8) for `steps` steps on `devices`; reports what ran where.

    One device runs under `OneDeviceStrategy`, several under
    `MirroredStrategy` with synchronized BatchNorm; the kernels are the
    default ("auto"). A problem is: on a GPU or TPU, a convolution, matmul or
    BatchNorm op placed on another device type, or an op of the CPU-only
    kernels in the step's graph; anywhere, a non-finite loss.

    Args:
      devices: device names, e.g. ["/gpu:0"] or ["/cpu:0"].
      steps: train steps (at least 2); the placement is read from the first.
      precision: the trainer precision.
      image_size: side of the random square training images.

    Returns:
      {"devices", "precision", "kernels" (of the built model), "replicas",
      "placed" (op type -> count, of ACCELERATOR_OP_TYPES on the expected
      device type), "cpu_kernel_ops" (count), "collectives", "loss",
      "seconds_per_step", "problems" (list of strings; empty when fine)}.
    """
    import time
    from collections import Counter

    import keras
    import numpy as np
    import tensorflow as tf

    from fcn_tf import train_lib
    from fcn_tf.config import DataConfig, ExperimentConfig, ModelConfig, TrainerConfig, validate
    from fcn_tf.models import build_fcn
    from fcn_tf.optimizers import build_optimizer

    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first one is not timed), got {steps}")
    devices = list(devices)
    kind = tf.DeviceSpec.from_string(devices[0]).device_type
    strategy = (
        tf.distribute.OneDeviceStrategy(devices[0])
        if len(devices) == 1
        else tf.distribute.MirroredStrategy(devices)
    )
    replicas = strategy.num_replicas_in_sync
    config = validate(
        ExperimentConfig(
            name="check_train_step",
            model=ModelConfig(backbone_depth=18, head_channels=16, aux_channels=16),
            data=DataConfig(global_batch_size=2 * replicas),
            trainer=TrainerConfig(train_steps=steps, precision=precision),
        )
    )
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, image_size, image_size, 3)).astype(np.float32)
    labels = rng.integers(0, config.model.num_classes, (8, image_size, image_size)).astype(np.int32)

    def dataset_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(config.data.global_batch_size)
        return (
            tf.data.Dataset.from_tensor_slices((images, labels))
            .repeat()
            .batch(per_replica, drop_remainder=True)
        )

    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with strategy.scope():
            model = build_fcn(config.model)
            optimizer = build_optimizer(config.optimizer, steps, precision, aggregate_gradients=False)
            optimizer.build(model.trainable_variables)
        iterator = train_lib.make_train_iterator(strategy, dataset_fn)
        step = train_lib.make_train_step(model, optimizer, strategy, config)
        graph = step.function.get_concrete_function(iterator, tf.constant(-1, tf.int64)).graph
        # The placement is recorded when TensorFlow first partitions the step's graph.
        placement = op_placement(step, iterator)
        start = time.perf_counter()
        for _ in range(steps - 1):
            loss = float(step(iterator)["total"])
        seconds = (time.perf_counter() - start) / max(steps - 1, 1)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    def tracked(op_type):
        return any(name in op_type for name in ACCELERATOR_OP_TYPES)

    placed = Counter(
        op for op, device in placement if tracked(op) and device and f"/device:{kind}:" in device
    )
    elsewhere = Counter(
        f"{op} on {device}"
        for op, device in placement
        if tracked(op) and device and f"/device:{kind}:" not in device
    )
    cpu_ops = cpu_kernel_ops(graph)
    problems = [f"{count} x {what}" for what, count in sorted(elsewhere.items())]
    if kind != "CPU" and cpu_ops:
        problems.append(f"{len(cpu_ops)} ops of the CPU-only kernels in the step, e.g. {cpu_ops[0]}")
    if not placed:
        problems.append(f"no convolution, matmul or BatchNorm op ran on {kind}")
    if not np.isfinite(loss):
        problems.append(f"non-finite loss {loss}")
    kernels = sorted({layer.kernels for layer in _layers(model) if hasattr(layer, "kernels")})
    return {
        "devices": devices,
        "precision": precision,
        "kernels": kernels,
        "replicas": replicas,
        "placed": dict(sorted(placed.items())),
        "cpu_kernel_ops": len(cpu_ops),
        "collectives": sum(1 for _, op_type in traced_ops(graph) if op_type.startswith("Collective")),
        "loss": loss,
        "seconds_per_step": seconds,
        "problems": problems,
    }


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def gpu_check(steps: int = 3) -> dict:
    """The GPU smoke check: `check_train_step` on every visible GPU, then on all of them at once.

    Each GPU trains alone in float32, the first also in mixed_float16; with
    several GPUs, one run mirrors over all of them (synchronized BatchNorm).
    On a machine without GPUs nothing runs.

    Args:
      steps: train steps per run.

    Returns:
      {"gpus": count, "status": "no GPU visible" | "ok" | "problems",
      "runs": [check_train_step reports], "problems": ["<devices>: <problem>", ...]}.
    """
    import tensorflow as tf

    gpus = [f"/gpu:{i}" for i in range(len(tf.config.list_logical_devices("GPU")))]
    if not gpus:
        return {"gpus": 0, "status": "no GPU visible", "runs": [], "problems": []}
    plan = [([gpu], "float32") for gpu in gpus] + [([gpus[0]], "mixed_float16")]
    if len(gpus) > 1:
        plan.append((gpus, "float32"))
    runs = [check_train_step(devices, steps, precision) for devices, precision in plan]
    problems = [f"{','.join(r['devices'])} {r['precision']}: {p}" for r in runs for p in r["problems"]]
    return {"gpus": len(gpus), "status": "problems" if problems else "ok", "runs": runs, "problems": problems}
