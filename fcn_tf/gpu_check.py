"""The accelerator smoke check: a few train steps of a small FCN on each GPU.

`gpu_check()` trains R18-D8 for a few steps on every visible GPU (float32
and mixed_float16), then mirrored over all of them, and reports a problem
where a convolution, matmul or BatchNorm op is placed off the GPU or the
CPU-only kernels (`fcn_tf.models.cpu_kernels.CPU_KERNEL_SCOPE`) appear in the
step. `pytest -m gpu` and users on a GPU machine run it; it is the top of
the package (it imports the training code), nothing imports it.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context

from fcn_tf import training
from fcn_tf.config import DataConfig, ExperimentConfig, ModelConfig, TrainerConfig, validate
from fcn_tf.models import build_fcn
from fcn_tf.models.cpu_kernels import CPU_KERNEL_SCOPE
from fcn_tf.optimizers import build_optimizer

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
    """Names of the ops only the "cpu_fast" kernels make (`fcn_tf.models.cpu_kernels.CPU_KERNEL_SCOPE`).

    Args:
      graph: a traced graph, e.g. of a train step.
    """
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
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the first one is not timed), got {steps}")
    devices = list(devices)
    kind = tf.DeviceSpec.from_string(devices[0]).device_type
    strategy = (
        tf.distribute.OneDeviceStrategy(devices[0])
        if len(devices) == 1
        else tf.distribute.MirroredStrategy(devices)
    )
    config = validate(
        ExperimentConfig(
            name="check_train_step",
            model=ModelConfig(backbone_depth=18, head_channels=16, aux_channels=16),
            data=DataConfig(global_batch_size=2 * strategy.num_replicas_in_sync),
            trainer=TrainerConfig(train_steps=steps, precision=precision),
        )
    )
    run = _run_steps(strategy, config, _random_dataset_fn(config, image_size))
    placed, problems = _placement_problems(kind, run["placement"], run["graph"], run["loss"])
    return {
        "devices": devices,
        "precision": precision,
        "kernels": sorted({layer.kernels for layer in _layers(run["model"]) if hasattr(layer, "kernels")}),
        "replicas": strategy.num_replicas_in_sync,
        "placed": placed,
        "cpu_kernel_ops": len(cpu_kernel_ops(run["graph"])),
        "collectives": sum(1 for _, op_type in traced_ops(run["graph"]) if op_type.startswith("Collective")),
        "loss": run["loss"],
        "seconds_per_step": run["seconds_per_step"],
        "problems": problems,
    }


def _random_dataset_fn(config: ExperimentConfig, image_size: int):
    """`input_context -> dataset`: 8 fixed random images and labels, repeated, per-replica batches."""
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

    return dataset_fn


def _run_steps(strategy, config: ExperimentConfig, dataset_fn) -> dict:
    """Trains `config.trainer.train_steps` steps.

    Returns:
      {"model", "graph" (the step's), "placement" (of the first step), "loss"
      (of the last), "seconds_per_step" (the steps after the first)}.
    """
    steps, precision = config.trainer.train_steps, config.trainer.precision
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with strategy.scope():
            model = build_fcn(config.model)
            optimizer = build_optimizer(config.optimizer, steps, precision, aggregate_gradients=False)
            optimizer.build(model.trainable_variables)
        iterator = training.make_train_iterator(strategy, dataset_fn)
        step = training.make_train_step(model, optimizer, strategy, config)
        graph = step.function.get_concrete_function(iterator, tf.constant(-1, tf.int64)).graph
        # The placement is recorded when TensorFlow first partitions the step's graph.
        placement = op_placement(step, iterator)
        start = time.perf_counter()
        for _ in range(steps - 1):
            loss = float(step(iterator)["total"])
        seconds = (time.perf_counter() - start) / max(steps - 1, 1)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return {"model": model, "graph": graph, "placement": placement, "loss": loss, "seconds_per_step": seconds}


def _placement_problems(kind: str, placement, graph, loss: float) -> tuple[dict, list[str]]:
    """(op type -> count of the tracked ops placed on `kind`, the problems found)."""

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
    return dict(sorted(placed.items())), problems


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
    gpus = [f"/gpu:{i}" for i in range(len(tf.config.list_logical_devices("GPU")))]
    if not gpus:
        return {"gpus": 0, "status": "no GPU visible", "runs": [], "problems": []}
    plan = [([gpu], "float32") for gpu in gpus] + [([gpus[0]], "mixed_float16")]
    if len(gpus) > 1:
        plan.append((gpus, "float32"))
    runs = [check_train_step(devices, steps, precision) for devices, precision in plan]
    problems = [f"{','.join(r['devices'])} {r['precision']}: {p}" for r in runs for p in r["problems"]]
    return {"gpus": len(gpus), "status": "problems" if problems else "ok", "runs": runs, "problems": problems}
