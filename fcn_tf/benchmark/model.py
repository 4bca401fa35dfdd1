"""Model benchmarks: train-step and inference throughput, FLOPs, peak memory, roofline.

Every figure that is quoted comes from a fresh Python process
(`run_isolated`): peak resident memory is a per-process high-water mark,
thread pools and the oneDNN switch are fixed when TensorFlow starts, and one
model's allocations must not hide the next one's. The in-process pieces
(`time_calls`, `inference_fn`, `train_step_fn`, `graph_flops`,
`fold_batch_norms`) are what that child process runs and what the tests call
on a tiny model.

A measurement is described by a `Measurement` (JSON-serializable, so it
crosses the process boundary as a command-line argument); the child prints
one `RESULT {...}` line that the parent parses. The PyTorch side
(`fcn_tf.benchmark.torch_compare`) follows the same protocol.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

RESULT_PREFIX = "RESULT "

# What the reference's FLOP counts mean: 2 x multiply-adds of the main path
# (PyTorch's FlopCounterMode), per 512x512 image. Quoted next to ours.
REFERENCE_GFLOP_512 = {
    "fcn_r50_d8": 298.6,
    "fcn_r101_d8": 453.7,
    "torchvision_fcn_resnet50": 276.7,
}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One benchmark run, executed in its own process.

    Attributes:
      label: row name in the printed table.
      framework: "tf" (this project) or "torch" (torchvision).
      what: "train" (one optimizer step), "infer" (whole-image forward,
        main path only) or "slide" (sliding-window inference of one image).
      model: for "tf" the `ModelConfig` fields; for "torch"
        {"arch": "fcn_resnet50" | "fcn_resnet101", "num_classes": C}.
      batch: images per step (per window call for "slide": windows).
      size: (h, w) of the input (the whole image for "slide").
      warmup: untimed calls first (tracing, XLA compilation, allocator).
      repeats: timed calls; the median is quoted.
      threads: intra-op threads (torch.set_num_threads for torch).
      inter_op_threads: TensorFlow's inter-op pool (0: TensorFlow's default;
        -1: what scripts/train.py uses by default, `fcn_tf.runtime.set_inter_op_threads(-1)`).
      jit_compile: compile the step / forward with XLA (tf only).
      precision: "float32" or "mixed_bfloat16" (tf only).
      fold_bn: fold BatchNorm into the convolutions for inference (tf only).
      onednn: "default", "on" or "off": TF_ENABLE_ONEDNN_OPTS (tf only).
      flops: also count the model's FLOPs per image with the profiler.
      experiment: experiment name (loss/optimizer settings for "train",
        eval window settings for "slide").
      seed: seed of the weights and the random inputs.
    """

    label: str
    framework: str
    what: str
    model: dict
    batch: int = 2
    size: tuple[int, int] = (512, 512)
    warmup: int = 1
    repeats: int = 3
    threads: int = 2
    inter_op_threads: int = 0
    jit_compile: bool = False
    precision: str = "float32"
    fold_bn: bool = False
    onednn: str = "default"
    flops: bool = False
    experiment: str = ""
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        values = json.loads(text)
        values["size"] = tuple(values["size"])
        return cls(**values)


# --------------------------------------------------------------------------- process-level figures


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """This process's current resident set size in MiB (from /proc; psutil not needed)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap the BLAS / OpenMP pools of a child process."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}


_MATMUL_CHILD = """
import json, sys, time
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
a @ b  # warm-up: thread pool start and page faults
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); a @ b; times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def matmul_peak_gflops(n: int = 4096, threads: int = 2, repeats: int = 5) -> float:
    """The machine's float32 matrix-multiply peak (the roofline), in GFLOP/s.

    numpy's sgemm (OpenBLAS) on n x n matrices, run in a child process so
    the BLAS thread count can be fixed before numpy loads. TensorFlow's own
    matmul reaches only about half of this on this CPU, so it is not used.

    Args:
      n: matrix size.
      threads: BLAS threads.
      repeats: timed products; the median is used.
    """
    env = {**os.environ, **thread_env(threads)}
    out = subprocess.run(
        [sys.executable, "-c", _MATMUL_CHILD, str(n), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    times = json.loads(out.stdout.strip().splitlines()[-1])
    return 2.0 * n**3 / statistics.median(times) / 1e9


def load_average() -> float:
    """The 1-minute load average (how perturbed a timing is on a shared machine)."""
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls.

    `fn` must return only when its work is done (the callers fetch a value of
    the result to the host, which waits for every op it depends on).

    Args:
      fn: the call to time, without arguments.
      warmup: untimed calls first.
      repeats: timed calls.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _fetch(tensor) -> float:
    # One element to the host: waits for the whole computation producing it.
    return (
        float(tensor.numpy().ravel()[0])
        if tensor.shape.rank == 0
        else float(tensor[(0,) * tensor.shape.rank])
    )


# --------------------------------------------------------------------------- TensorFlow pieces


def configure_tensorflow(threads: int, inter_op_threads: int = 0) -> None:
    """Sets TensorFlow's thread pools; must run before TensorFlow executes anything.

    Args:
      threads: intra-op threads (0: TensorFlow's default, one per core).
      inter_op_threads: inter-op threads (0: TensorFlow's default; -1: auto as
        scripts/train.py, see `fcn_tf.runtime.set_inter_op_threads`).
    """
    import tensorflow as tf

    from fcn_tf.runtime import set_inter_op_threads

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


def logits_model(model):
    """The segmenter reduced to its main path (`fcn_tf.export_lib.logits_model`).

    Keras prunes the auxiliary head from that functional graph, so inference
    does not pay for a head whose output it drops.
    """
    from fcn_tf.export_lib import logits_model as main_path

    return main_path(model)


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


def fold_batch_norms(model):
    """`fcn_tf.export_lib.fold_batchnorm`: BatchNorm folded into the preceding convs (inference only)."""
    from fcn_tf.export_lib import fold_batchnorm

    return fold_batchnorm(model)


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
    Used when `fcn_tf.train_lib.make_train_step` is not importable or cannot
    be XLA-compiled (its step pulls the batch from an iterator inside).
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


def train_step_fn(model, config, images, labels, jit_compile: bool = False) -> tuple[Callable[[], Any], str]:
    """A no-argument callable running one real training step on a fixed batch.

    Uses the project's own step (`fcn_tf.train_lib.make_train_step` under the
    default strategy, fed from a repeating dataset) when it can, else
    `_minimal_train_step`; returns `(call, which)` with `which` naming the one.

    Args:
      model: the segmenter (with its aux head when the experiment has one).
      config: the experiment (optimizer, trainer.aux_weight, data.ignore_label).
      images: float32 (N, h, w, 3).
      labels: int32 (N, h, w).
      jit_compile: compile the step with XLA.
    """
    import dataclasses as dc

    import tensorflow as tf

    from fcn_tf.optimizers import build_optimizer

    config = dc.replace(
        config, trainer=dc.replace(config.trainer, jit_compile=jit_compile, grad_accum_steps=1)
    )
    try:
        from fcn_tf.train_lib import make_train_step
    except ImportError:
        make_train_step = None
    if make_train_step is not None:
        strategy = tf.distribute.get_strategy()
        optimizer = build_optimizer(
            config.optimizer, config.trainer.train_steps, config.trainer.precision, aggregate_gradients=False
        )
        optimizer.build(model.trainable_variables)
        step = make_train_step(model, optimizer, strategy, config)
        iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
        try:
            _fetch(step(iterator)["total"])
            return (lambda: _fetch(step(iterator)["total"])), "fcn_tf.train_lib.make_train_step"
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError) as error:
            if not jit_compile:
                raise
            reason = str(error).splitlines()[0][:80]
            print(
                f"train_lib step does not compile with XLA ({reason}); using the minimal step",
                file=sys.stderr,
            )
    optimizer = build_optimizer(config.optimizer, config.trainer.train_steps, config.trainer.precision)
    optimizer.build(model.trainable_variables)
    step = _minimal_train_step(
        model, optimizer, config.trainer.aux_weight, config.data.ignore_label, jit_compile
    )
    return (lambda: _fetch(step(images, labels))), "fcn_tf.benchmark.model minimal step"


# --------------------------------------------------------------------------- the child process


def _build_tf_model(measurement: Measurement):
    import keras

    from fcn_tf.config import ModelConfig
    from fcn_tf.models import build_fcn

    if measurement.precision != "float32":
        keras.mixed_precision.set_dtype_policy(measurement.precision)
    keras.utils.set_random_seed(measurement.seed)
    config = ModelConfig(**{**measurement.model, "pretrained_backbone": ""})
    return build_fcn(config, sync_bn=False), config


def run_tf(measurement: Measurement) -> dict:
    """Runs one TensorFlow measurement in this process; returns the result dict.

    Call it in a fresh process (`run_isolated`) for meaningful memory and
    thread figures; the tests call it in-process on a tiny model.
    """
    import dataclasses as dc

    configure_tensorflow(measurement.threads, measurement.inter_op_threads)
    import tensorflow as tf

    m = measurement
    baseline_mb = current_rss_mb()
    start = time.perf_counter()
    model, model_config = _build_tf_model(m)
    images, labels = random_batch(m.batch, m.size, model_config.num_classes, m.seed)
    result: dict[str, Any] = {
        "label": m.label,
        "framework": "tf",
        "what": m.what,
        "batch": m.batch,
        "jit_compile": m.jit_compile,
        "precision": m.precision,
        "fold_bn": m.fold_bn,
    }
    if m.what == "train":
        import experiments

        experiment = experiments.get(m.experiment) if m.experiment else None
        if experiment is None:
            from fcn_tf.config import ExperimentConfig

            experiment = ExperimentConfig(name="benchmark")
        experiment = dc.replace(
            experiment,
            model=model_config,
            trainer=dc.replace(experiment.trainer, precision=m.precision),
        )
        call, result["step"] = train_step_fn(model, experiment, images, labels, m.jit_compile)
        images_per_call = m.batch

        def count_flops():
            # Forward of the training graph (main + aux head) from the profiler;
            # a training step is counted as 3x that (backward = 2x forward,
            # the usual convention, also used for the torchvision side).
            spec = tf.TensorSpec([1, *m.size, 3], tf.float32)
            forward = graph_flops(tf.function(lambda x: model(x, training=False)), spec)
            result["forward_flops_per_image"] = forward
            result["flops_per_image"] = 3 * forward
    elif m.what == "infer":
        main = logits_model(model)
        if m.fold_bn:
            main = fold_batch_norms(main)
        forward = inference_fn(main, m.jit_compile)

        def call():
            return _fetch(forward(images))

        images_per_call = m.batch

        def count_flops():
            spec = tf.TensorSpec([1, *m.size, 3], tf.float32)
            result["flops_per_image"] = graph_flops(inference_fn(main, False), spec)
    elif m.what == "slide":
        import experiments
        from fcn_tf import inference

        eval_config = experiments.get(m.experiment).eval
        main = logits_model(model)
        if m.fold_bn:
            main = fold_batch_norms(main)
        logits_fn = inference.model_logits_fn(main)
        # One tf.function around the whole sliding window: the windows' forward
        # calls are compiled with the rest (XLA cannot take the while loop's
        # dynamic gathers, so jit applies to the per-window forward only).
        inner = tf.function(logits_fn, jit_compile=m.jit_compile, reduce_retracing=True)
        image = images[:1]
        slide = tf.function(
            lambda x: inference.predict_slide(
                inner, x, m.size, eval_config.crop_size, eval_config.stride, m.batch, model_config.num_classes
            )
        )

        def call():
            return _fetch(slide(image))

        images_per_call = 1
        count_flops = None
    else:
        raise ValueError(f"unknown measurement kind {m.what!r}; choose train, infer or slide")
    times = time_calls(call, m.warmup, m.repeats)
    result.update(
        onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        times=times,
        images_per_s=images_per_call / statistics.median(times),
        setup_s=time.perf_counter() - start - sum(times),
        # Read before counting FLOPs: freezing and profiling the graph costs
        # memory of its own (over 1 GB for R50 at 512x512), not the step's.
        peak_rss_mb=peak_rss_mb(),
        baseline_rss_mb=baseline_mb,
        versions={"tensorflow": tf.__version__},
    )
    if m.flops and count_flops is not None:
        count_flops()
    return result


def run_isolated(measurement: Measurement, timeout: float = 3600.0) -> dict:
    """Runs `measurement` in a fresh Python process and returns its result dict.

    The child gets the thread caps and the oneDNN switch in its environment.
    A failure returns {"label", "error"} instead of raising, so one failing
    row does not lose the others.

    Args:
      measurement: what to run.
      timeout: seconds before the child is killed.
    """
    module = (
        "fcn_tf.benchmark.torch_compare" if measurement.framework == "torch" else "fcn_tf.benchmark.model"
    )
    env = {**os.environ, **thread_env(measurement.threads), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if measurement.onednn != "default":
        env["TF_ENABLE_ONEDNN_OPTS"] = "1" if measurement.onednn == "on" else "0"
    try:
        out = subprocess.run(
            [sys.executable, "-m", module, measurement.to_json()],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"label": measurement.label, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
    return {"label": measurement.label, "error": f"exit {out.returncode}: {tail}"}


def child_main(argv: Sequence[str], runner: Callable[[Measurement], dict]) -> None:
    """Entry point of a child process: runs argv[1] (a Measurement as JSON), prints RESULT."""
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m {runner.__module__} MEASUREMENT_JSON")
    result = runner(Measurement.from_json(argv[1]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the side-by-side plan

# Defaults of `--jit_compile=auto` and `--onednn=auto`, per measurement kind,
# from the measurements on a quiet machine in BENCHMARKS.md ("Speed
# settings"): TensorFlow's oneDNN kernels (off by default on this AMD CPU) make
# the train step 1.3-1.8x faster, and the plain-graph inference with oneDNN
# beat the XLA-compiled one (0.636 vs 0.583 images/s, R50 512x512); the
# training step follows the experiment's `trainer.jit_compile`.
AUTO_JIT_INFERENCE = False
AUTO_ONEDNN = {"train": "on", "infer": "on", "slide": "on"}


def torchvision_layout(model: dict) -> dict:
    """Our model in torchvision's FCN layout: 7x7 stem, one head conv, 256-channel aux head."""
    return {**model, "stem": "standard", "head_num_convs": 1, "head_channels": 512, "aux_channels": 256}


def plan_measurements(
    config,
    what: Sequence[str],
    batch: int,
    size: tuple[int, int],
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
    jit_compile: str = "auto",
    compare: str = "",
    flops: bool = True,
    **overrides,
) -> list[Measurement]:
    """The measurements of `scripts/benchmark.py` for an experiment.

    For each kind in `what` ("train", "infer", "slide"): our model as the
    experiment defines it, our model in torchvision's layout
    (`torchvision_layout`), and with `compare="torchvision"` torchvision's
    FCN of the same depth. "slide" (sliding-window inference of one
    `size` image with the experiment's eval windows) is ours only.

    Args:
      config: the experiment.
      what: kinds to measure.
      batch: images per step (windows per call for "slide").
      size: (h, w) of the input.
      repeats: timed calls per measurement.
      warmup: untimed calls first.
      threads: intra-op threads of both frameworks.
      jit_compile: "auto" (AUTO_JIT_INFERENCE for inference,
        config.trainer.jit_compile for training), "on" or "off".
      compare: "" or "torchvision".
      flops: count FLOPs per image (once per model).
      **overrides: further `Measurement` fields for our side (e.g.
        precision, fold_bn, onednn, inter_op_threads).
    """
    import dataclasses as dc

    if compare not in ("", "torchvision"):
        raise ValueError(f"--compare must be empty or 'torchvision', got {compare!r}")
    if jit_compile not in ("auto", "on", "off"):
        raise ValueError(f"jit_compile must be auto, on or off, got {jit_compile!r}")
    ours = {k: v for k, v in dc.asdict(config.model).items()}
    measurements = []
    for kind in what:
        if kind not in ("train", "infer", "slide"):
            raise ValueError(f"unknown benchmark kind {kind!r}; choose train, infer or slide")
        auto = config.trainer.jit_compile if kind == "train" else AUTO_JIT_INFERENCE
        jit = auto if jit_compile == "auto" else jit_compile == "on"
        common = dict(
            what=kind,
            batch=batch,
            size=tuple(size),
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            flops=flops and kind != "slide",
            experiment=config.name,
        )
        ours_common = {**common, "jit_compile": jit, "precision": config.trainer.precision, **overrides}
        if ours_common.get("onednn") == "auto":
            ours_common["onednn"] = AUTO_ONEDNN[kind]
        if ours_common.get("inter_op_threads") == -1 and kind != "train":
            ours_common["inter_op_threads"] = 0  # auto: train.py's setting is for training
        measurements.append(Measurement(label=f"{kind}: ours", framework="tf", model=ours, **ours_common))
        if kind == "slide":
            continue
        measurements.append(
            Measurement(
                label=f"{kind}: ours (torchvision layout)",
                framework="tf",
                model=torchvision_layout(ours),
                **ours_common,
            )
        )
        if compare == "torchvision":
            from fcn_tf.benchmark.torch_compare import torchvision_arch

            arch = torchvision_arch(config.model.backbone_depth)
            measurements.append(
                Measurement(
                    label=f"{kind}: torchvision {arch}",
                    framework="torch",
                    model={"arch": arch, "num_classes": config.model.num_classes},
                    **common,
                )
            )
    return measurements


def run_interleaved(measurements: Sequence[Measurement], rounds: int = 1, log=print) -> list[dict]:
    """Runs every measurement `rounds` times, interleaved (A B C A B C ...), each in a fresh process.

    Interleaving spreads the drift of a shared machine over all rows; the
    times of all rounds are pooled before the median, the peak memory is the
    largest seen and FLOPs are counted in the first round only.

    Args:
      measurements: what to run.
      rounds: how many times each runs.
      log: progress printer (one line per child).
    """
    import dataclasses as dc

    pooled: dict[str, dict] = {}
    for r in range(rounds):
        for m in measurements:
            m = m if r == 0 else dc.replace(m, flops=False)
            log(f"[round {r + 1}/{rounds}] {m.label} (load {load_average():.2f}) ...")
            result = run_isolated(m)
            result["load_before"] = load_average()
            previous = pooled.get(m.label)
            if previous is None or "error" in previous:
                pooled[m.label] = result
                continue
            if "error" in result:
                continue
            previous["times"] += result["times"]
            previous["images_per_s"] = previous["batch"] / statistics.median(previous["times"])
            if m.what == "slide":
                previous["images_per_s"] = 1.0 / statistics.median(previous["times"])
            previous["peak_rss_mb"] = max(previous["peak_rss_mb"], result["peak_rss_mb"])
    return [pooled[m.label] for m in measurements]


def summarize(results: Sequence[dict], peak_gflops: float) -> list[dict]:
    """Adds achieved GFLOP/s, share of the matmul peak and ratios to torchvision to each result.

    The ratio columns compare each row with the torchvision row of the same
    kind: images/s ratio (higher is better), FLOP/s ratio (work done per
    second: the fair figure when the architectures differ) and peak memory
    ratio (lower is better).
    """
    rows = []
    reference = {r["what"]: r for r in results if r.get("framework") == "torch" and "error" not in r}
    for r in results:
        row = dict(r)
        if "error" not in r and r.get("flops_per_image"):
            row["gflops_per_s"] = r["flops_per_image"] * r["images_per_s"] / 1e9
            row["peak_share"] = row["gflops_per_s"] / peak_gflops if peak_gflops else None
        ref = reference.get(r.get("what"))
        if ref is not None and ref is not r and "error" not in r:
            row["speed_ratio"] = r["images_per_s"] / ref["images_per_s"]
            row["memory_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
            if r.get("flops_per_image") and ref.get("flops_per_image"):
                row["flops_ratio"] = (r["flops_per_image"] * r["images_per_s"]) / (
                    ref["flops_per_image"] * ref["images_per_s"]
                )
        rows.append(row)
    return rows


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _settings(result: dict) -> str:
    if result.get("framework") != "tf":
        return "-"
    parts = ["xla" if result.get("jit_compile") else "no xla"]
    if result.get("fold_bn") and result.get("what") != "train":
        parts.append("bn folded")
    if result.get("onednn") == "1":
        parts.append("onednn")
    if result.get("inter_op_threads"):
        parts.append(f"inter-op {result['inter_op_threads']}")
    if result.get("precision", "float32") != "float32":
        parts.append(result["precision"])
    return ", ".join(parts)


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of summarized rows (one per measurement)."""
    header = (
        "| measurement | images/s | ratio | GFLOP/img | GFLOP/s | % peak | FLOP/s ratio "
        "| peak RSS MiB | mem ratio | settings | step times s |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'].splitlines()[-1][:120]} |" + " |" * 9)
            continue
        flops = r.get("flops_per_image")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    f"{r['images_per_s']:.3f}",
                    _fmt(r.get("speed_ratio"), ".2f"),
                    _fmt(flops / 1e9 if flops else None, ".1f"),
                    _fmt(r.get("gflops_per_s"), ".1f"),
                    _fmt(100 * r["peak_share"] if r.get("peak_share") else None, ".0f"),
                    _fmt(r.get("flops_ratio"), ".2f"),
                    f"{r['peak_rss_mb']:.0f}",
                    _fmt(r.get("memory_ratio"), ".2f"),
                    _settings(r),
                    " ".join(f"{t:.2f}" for t in r["times"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv, run_tf)
