"""The TensorFlow side: train-step and inference throughput, FLOPs, peak memory.

`run_tf` is what a child process runs for one `benchmarks.harness.Measurement`
(see the harness for why every figure comes from a fresh process). The
pieces it is made of (`inference_fn`, `train_step_fn`, `graph_flops`,
`random_batch`) are what the tests call on a tiny model.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.harness import Measurement, current_rss_mb, device_peak_mb, peak_rss_mb, time_calls

# The inference model as the exports build it (main path, BatchNorm folded
# or not), so the inference rows time what an export runs.
from fcn_tf.export import inference_model, logits_model


def _fetch(tensor) -> float:
    # One element to the host: waits for the whole computation producing it.
    return (
        float(tensor.numpy().ravel()[0])
        if tensor.shape.rank == 0
        else float(tensor[(0,) * tensor.shape.rank])
    )


def configure_tensorflow(threads: int, inter_op_threads: int = 0) -> None:
    """Sets TensorFlow's thread pools; must run before TensorFlow executes anything.

    Args:
      threads: intra-op threads (0: TensorFlow's default, one per core).
      inter_op_threads: inter-op threads (0: TensorFlow's default; -1: auto as
        scripts/train.py, see `fcn_tf.devices.set_inter_op_threads`).
    """
    import tensorflow as tf

    from fcn_tf.devices import set_inter_op_threads

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        set_inter_op_threads(inter_op_threads)
    except RuntimeError:
        # TensorFlow already started (an in-process call, e.g. a test): its pools stay.
        print("TensorFlow is already initialized; thread settings not applied", file=sys.stderr)


def random_batch(batch: int, size: Sequence[int], num_classes: int, seed: int = 0, ignore_label: int = 255):
    """A normalized-looking image batch and labels with ~5% ignored pixels, as tf tensors.

    Args:
      batch: images.
      size: (h, w).
      num_classes: labels are drawn in [0, num_classes).
      seed: seed of the stateless generators.
      ignore_label: value of the ignored pixels.
    """
    import tensorflow as tf

    h, w = size
    images = tf.random.stateless_normal([batch, h, w, 3], seed=[seed, 1])
    labels = tf.random.stateless_uniform([batch, h, w], seed=[seed, 2], maxval=num_classes, dtype=tf.int32)
    ignore = tf.random.stateless_uniform([batch, h, w], seed=[seed, 3]) < 0.05
    labels = tf.where(ignore, tf.fill(tf.shape(labels), ignore_label), labels)
    return images, labels


def inference_fn(model, jit_compile: bool = False) -> Callable:
    """`fn(images) -> logits` as a tf.function in inference mode (main path only).

    Args:
      model: a segmenter (dict outputs) or a logits model.
      jit_compile: compile with XLA.
    """
    import tensorflow as tf

    main = logits_model(model) if isinstance(model.output, dict) else model

    def forward(images):
        return main(images, training=False)

    return tf.function(forward, jit_compile=jit_compile, reduce_retracing=True)


def graph_flops(fn: Callable, input_spec) -> int:
    """Floating-point operations of one call of `fn`, from TensorFlow's profiler.

    The function is traced for `input_spec`, its variables are frozen into
    constants (so every shape is static), and
    `tf.compat.v1.profiler` sums the registered `flops` statistics of the
    graph's ops: 2 x multiply-adds for convolutions and matmuls (the same
    convention as PyTorch's FlopCounterMode), plus elementwise ops.

    Args:
      fn: a tf.function (or a callable) taking one tensor.
      input_spec: a `tf.TensorSpec` with a fully defined shape.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Always a fresh trace: a tf.function that has seen other shapes (or has
    # reduce_retracing) would hand back a concrete function with unknown
    # dimensions, whose convolutions the profiler cannot count.
    fn = tf.function(getattr(fn, "python_function", fn))
    concrete = fn.get_concrete_function(input_spec)
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    info = tf.compat.v1.profiler.profile(
        graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
    )
    return int(info.total_float_ops)


def _minimal_train_step(
    model, optimizer, aux_weight: float, ignore_label: int, jit_compile: bool
) -> Callable:
    """The real step's computation, without the distribution plumbing.

    Forward in training mode, main + aux_weight x aux pixel cross-entropy over
    the valid pixels, backward, PyTorch-style SGD update (fcn_tf.optimizers).
    Used when `fcn_tf.training.make_train_step` cannot be XLA-compiled
    (its step pulls the batch from an iterator inside).
    """
    import tensorflow as tf

    from fcn_tf.losses import segmentation_losses, valid_pixel_count

    variables = model.trainable_variables

    def step(images, labels):
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            count = valid_pixel_count(labels, ignore_label)
            loss = segmentation_losses(outputs, labels, count, ignore_label, aux_weight)["total"]
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return tf.function(step, jit_compile=jit_compile)


def train_step_fn(
    model, config, images, labels, jit_compile: bool = False, strategy=None
) -> tuple[Callable[[], Any], str]:
    """A no-argument callable running one real training step on a fixed batch.

    Uses the project's own step (`fcn_tf.training.make_train_step`, with the
    experiment's `trainer.grad_accum_steps`, fed from a repeating dataset
    through `make_train_iterator`); when that step does not compile with XLA,
    `_minimal_train_step`. Returns `(call, which)` with `which` naming the one.

    Args:
      model: the segmenter (with its aux head when the experiment has one),
        built in `strategy.scope()`.
      config: the experiment (optimizer, trainer.aux_weight,
        trainer.grad_accum_steps, data.ignore_label).
      images: float32 (N, h, w, 3): one replica's batch (every replica gets it).
      labels: int32 (N, h, w).
      jit_compile: compile the step with XLA.
      strategy: the strategy the model was built in (None: the default one).
    """
    import tensorflow as tf

    from fcn_tf.optimizers import build_optimizer
    from fcn_tf.training import make_train_iterator, make_train_step

    strategy = strategy or tf.distribute.get_strategy()
    config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, jit_compile=jit_compile))
    with strategy.scope():
        optimizer = build_optimizer(
            config.optimizer, config.trainer.train_steps, config.trainer.precision, aggregate_gradients=False
        )
        optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, strategy, config)
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
    # Several replicas: one batch per local replica, as in training.
    iterator = (
        iter(batches)
        if strategy.num_replicas_in_sync == 1
        else make_train_iterator(strategy, lambda _: batches)
    )
    try:
        _fetch(step(iterator)["total"])
        return (lambda: _fetch(step(iterator)["total"])), "fcn_tf.training.make_train_step"
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError) as error:
        if not jit_compile or strategy.num_replicas_in_sync > 1 or config.trainer.grad_accum_steps > 1:
            raise
        reason = str(error).splitlines()[0][:80]
        print(
            f"fcn_tf.training step does not compile with XLA ({reason}); using the minimal step",
            file=sys.stderr,
        )
    optimizer = build_optimizer(config.optimizer, config.trainer.train_steps, config.trainer.precision)
    optimizer.build(model.trainable_variables)
    step = _minimal_train_step(
        model, optimizer, config.trainer.aux_weight, config.data.ignore_label, jit_compile
    )
    return (lambda: _fetch(step(images, labels))), "benchmarks.model minimal step"


def _strategy(m: Measurement):
    """The measurement's MirroredStrategy over its first `replicas` devices, or None for one replica."""
    import tensorflow as tf

    if m.replicas == 1:
        return None
    kind = "GPU" if m.device == "gpu" else "CPU"
    devices = tf.config.list_logical_devices(kind)
    if len(devices) < m.replicas:
        raise ValueError(f"{m.replicas} replicas asked for, {len(devices)} {kind} devices visible")
    return tf.distribute.MirroredStrategy([d.name for d in devices[: m.replicas]])


def _build_tf_model(measurement: Measurement, strategy):
    import keras

    from fcn_tf.config import ModelConfig
    from fcn_tf.models import build_fcn

    if measurement.precision != "float32":
        keras.mixed_precision.set_dtype_policy(measurement.precision)
    keras.utils.set_random_seed(measurement.seed)
    config = ModelConfig(**{**measurement.model, "pretrained_backbone": ""})
    if strategy is None:
        return build_fcn(config, sync_bn=False), config
    with strategy.scope():
        # Several replicas: BatchNorm synchronized as the experiment says, as in training.
        return build_fcn(config, packed_sync=not measurement.keras_sync_bn), config


def _experiment(m: Measurement, model_config):
    import experiments
    from fcn_tf.config import ExperimentConfig

    experiment = experiments.get(m.experiment) if m.experiment else ExperimentConfig(name="benchmark")
    return dataclasses.replace(
        experiment,
        model=model_config,
        trainer=dataclasses.replace(experiment.trainer, precision=m.precision, grad_accum_steps=m.grad_accum),
    )


def run_tf(measurement: Measurement) -> dict:
    """Runs one TensorFlow measurement in this process; returns the result dict.

    Call it in a fresh process (`benchmarks.harness.run_isolated`) for
    meaningful memory and thread figures; the tests call it in-process on a
    tiny model.
    """
    m = measurement
    if m.device == "cpu" and m.replicas > 1:
        from fcn_tf.devices import configure_logical_cpus

        configure_logical_cpus(m.replicas)
    configure_tensorflow(m.threads, m.inter_op_threads)
    import tensorflow as tf

    if m.device == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise ValueError("no GPU visible")
    baseline_mb = current_rss_mb()
    start = time.perf_counter()
    strategy = _strategy(m)
    model, model_config = _build_tf_model(m, strategy)
    per_replica = m.batch * (m.grad_accum if m.what == "train" else 1)
    images, labels = random_batch(per_replica, m.size, model_config.num_classes, m.seed)
    result: dict[str, Any] = {
        "label": m.label,
        "framework": "tf",
        "what": m.what,
        "batch": m.batch,
        "images_per_call": m.images_per_call,
        "jit_compile": m.jit_compile,
        "precision": m.precision,
        "fold_bn": m.fold_bn,
        "device": m.device,
        "replicas": m.replicas,
        "grad_accum": m.grad_accum,
    }
    spec = tf.TensorSpec([1, *m.size, 3], tf.float32)
    if m.what == "train":
        experiment = _experiment(m, model_config)
        call, result["step"] = train_step_fn(model, experiment, images, labels, m.jit_compile, strategy)

        def count_flops():
            # Forward of the training graph (main + aux head) from the profiler;
            # a training step is counted as 3x that (backward = 2x forward,
            # the usual convention, also used for the torchvision side).
            forward = graph_flops(tf.function(lambda x: model(x, training=False)), spec)
            result["forward_flops_per_image"] = forward
            result["flops_per_image"] = 3 * forward
    elif m.what in ("infer", "slide"):
        main = inference_model(model, m.fold_bn)
        if m.what == "infer":
            call = _inference_call(main, images, m.jit_compile, strategy)

            def count_flops():
                result["flops_per_image"] = graph_flops(inference_fn(main, False), spec)
        else:
            call, count_flops = _slide_call(main, images[:1], m, model_config.num_classes), None
    else:
        raise ValueError(f"unknown measurement kind {m.what!r}; choose train, infer or slide")
    times = time_calls(call, m.warmup, m.repeats)
    result.update(
        onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        times=times,
        images_per_s=m.images_per_call / statistics.median(times),
        setup_s=time.perf_counter() - start - sum(times),
        # Read before counting FLOPs: freezing and profiling the graph costs
        # memory of its own (measured, see BENCHMARKS.md), not the step's.
        peak_rss_mb=peak_rss_mb(baseline_mb),
        baseline_rss_mb=baseline_mb,
        versions={"tensorflow": tf.__version__},
    )
    if m.device == "gpu":
        per_device = device_peak_mb([f"GPU:{i}" for i in range(m.replicas)])
        result.update(peak_device_mb=max(per_device), peak_device_mb_per_replica=per_device)
    if m.flops and count_flops is not None:
        count_flops()
    return result


def _inference_call(main, images, jit_compile: bool, strategy) -> Callable[[], float]:
    """`call()` running the main-path forward on `images` (on every replica with a strategy)."""
    forward = inference_fn(main, jit_compile)
    if strategy is None:
        return lambda: _fetch(forward(images))
    import tensorflow as tf

    distributed = strategy.experimental_distribute_values_from_function(lambda _: images)

    @tf.function
    def replicated(x):
        return strategy.experimental_local_results(strategy.run(forward, args=(x,)))[0]

    return lambda: _fetch(replicated(distributed))


def _slide_call(main, image, m: Measurement, num_classes: int) -> Callable[[], float]:
    """`call()` running sliding-window inference of one image with the experiment's eval windows."""
    import tensorflow as tf

    import experiments
    from fcn_tf import inference

    eval_config = experiments.get(m.experiment).eval
    logits_fn = inference.model_logits_fn(main)
    # One tf.function around the whole sliding window: the windows' forward
    # calls are compiled with the rest (XLA cannot take the while loop's
    # dynamic gathers, so jit applies to the per-window forward only).
    inner = tf.function(logits_fn, jit_compile=m.jit_compile, reduce_retracing=True)
    slide = tf.function(
        lambda x: inference.predict_slide(
            inner, x, m.size, eval_config.crop_size, eval_config.stride, m.batch, num_classes
        )
    )
    return lambda: _fetch(slide(image))


def gpu_count() -> int:
    """GPUs TensorFlow sees (run in a child: the parent never imports TensorFlow)."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def matmul_gflops(threads: int, sizes: Sequence[int] = (2048, 4096, 6144), repeats: int = 3) -> dict:
    """TensorFlow's float32 matrix-multiply peak in this process (the roofline), in GFLOP/s.

    `tf.linalg.matmul` of n x n matrices, the best median over `sizes`: the
    library and kernels the model runs on, so no model row can exceed it.
    Run it in a child with the model rows' environment
    (`benchmarks.harness.child_env`): TensorFlow reads TF_ENABLE_ONEDNN_OPTS
    at import, and the thread count is fixed before it executes anything.

    Args:
      threads: intra-op threads.
      sizes: matrix sizes tried.
      repeats: timed products per size, after one untimed one.

    Returns:
      {"gflops": the best, "by_size": {n: GFLOP/s}}.
    """
    configure_tensorflow(threads)
    import tensorflow as tf

    matmul = tf.function(tf.linalg.matmul)
    by_size = {}
    for n in sizes:
        a = tf.random.stateless_normal([n, n], seed=[0, 1])
        b = tf.random.stateless_normal([n, n], seed=[0, 2])
        times = time_calls(lambda a=a, b=b: _fetch(matmul(a, b)), 1, repeats)
        by_size[str(n)] = 2.0 * n**3 / statistics.median(times) / 1e9
    return {"gflops": max(by_size.values()), "by_size": by_size}
