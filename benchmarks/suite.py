"""What `scripts/benchmark.py` runs: the plans, the interleaved runs, the tables.

The CPU plan times our model as the experiment defines it, in torchvision's
layout (the like-for-like row) and, with `compare="torchvision"`,
torchvision's FCN of the same depth, each against the matrix-multiply peak
of its own framework measured with the same environment (the roofline). The
GPU plan times our model for float32 and mixed precision, with and without
XLA, on 1, 2, 4, ... of the visible GPUs, with TensorFlow's peak device
memory. The input benchmark is `benchmarks.input`, the export latency
`benchmarks.export`.

This module imports neither TensorFlow nor torch: every measurement runs in
a child process (`benchmarks.harness`).
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
from collections.abc import Sequence

from benchmarks import export as export_bench
from benchmarks import torch_side
from benchmarks.harness import Measurement, child_env, load_average, run_child, run_isolated

KINDS = ("train", "infer", "input", "export", "reads")
# What "all" means: "export" times files written beforehand, so it is asked for by name.
ALL = ("train", "infer", "input")
DEVICES = ("auto", "cpu", "gpu")
NO_GPU = "GPU: no GPU visible (the float32 / mixed precision x XLA x replicas table needs one)"

# Defaults of `jit_compile="auto"` and `onednn="auto"`, per measurement kind,
# from the settings study in BENCHMARKS.md: TensorFlow's oneDNN kernels make
# the CPU train step faster, and plain-graph inference with oneDNN beat the
# XLA-compiled one; the training step follows the experiment's
# `trainer.jit_compile`.
AUTO_JIT_INFERENCE = False
AUTO_ONEDNN = {"train": "on", "infer": "on", "slide": "on"}


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything `run` needs: the flags of scripts/benchmark.py.

    Attributes:
      experiment: registered experiment name ("" only for what=("input",)).
      what: kinds to run, from KINDS ("all" is expanded by `parse_what`).
      batch: images per replica per step (model benchmarks).
      size: (h, w), or () for the experiment's crop size.
      repeats: timed calls per measurement.
      warmup: untimed calls first.
      rounds: interleaved rounds of all measurements (times pooled).
      compare: "" or "torchvision".
      jit_compile: "auto", "on" or "off" (our CPU rows).
      threads: intra-op threads of both frameworks and of the matmul peaks.
      inter_op_threads: TensorFlow inter-op threads (-1 auto, 0 default, N).
      precision: our precision on the CPU ("" the experiment's).
      fold_bn: fold BatchNorm into the convs for our inference.
      onednn: "auto", "default", "on" or "off" (our CPU rows).
      flops: count FLOPs per image.
      matmul_peak: measure the roofline.
      device: "auto" (the GPU table when a GPU is visible, else the CPU
        table), "cpu" or "gpu".
      replicas: replicas of our CPU rows (logical CPU devices, synchronized
        BatchNorm as the experiment says).
      grad_accum: > 1 adds a train row with that many accumulated
        micro-batches of `batch` images next to "train: ours".
      input_dataset: "", "voc", "cityscapes" or "both" (what=input).
      images: images per timed repeat of the input benchmark (0: its default).
      exports: what=export: the exports to time (`benchmarks.export.find_exports`).
      checkpoint: what=export with evaluate: also score TensorFlow in-process.
      evaluate: what=export: score each fixed-size file on the evaluation split.
    """

    experiment: str = ""
    what: tuple[str, ...] = KINDS
    batch: int = 2
    size: tuple[int, ...] = ()
    repeats: int = 3
    warmup: int = 1
    rounds: int = 1
    compare: str = ""
    jit_compile: str = "auto"
    threads: int = 2
    inter_op_threads: int = -1
    precision: str = ""
    fold_bn: bool = True
    onednn: str = "auto"
    flops: bool = True
    matmul_peak: bool = True
    device: str = "auto"
    replicas: int = 1
    grad_accum: int = 1
    input_dataset: str = ""
    images: int = 0
    exports: tuple[str, ...] = ()
    checkpoint: str = ""
    evaluate: bool = False

    def __post_init__(self):
        unknown = [k for k in self.what if k not in KINDS]
        if unknown or not self.what:
            raise ValueError(f"--what={','.join(self.what)}: choose from {', '.join(KINDS)} or all")
        if self.device not in DEVICES:
            raise ValueError(f"--device={self.device}: choose from {', '.join(DEVICES)}")
        if not self.experiment and set(self.what) - {"input", "export", "reads"}:
            raise ValueError("--experiment is required (except for --what=input,export)")
        if "export" in self.what and not self.exports:
            raise ValueError("--what=export needs --exports")
        for name in ("batch", "repeats", "rounds", "replicas", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")


def parse_what(values: Sequence[str]) -> tuple[str, ...]:
    """`--what` as a tuple of KINDS: a comma list, "all" meaning ALL."""
    kinds = [v.strip() for v in values if v.strip()]
    if "all" in kinds:
        return ALL
    return tuple(dict.fromkeys(kinds))


def parse_size(text: str) -> tuple[int, ...]:
    """`--size` "HxW" as (h, w); "" as () (the experiment's crop size)."""
    if not text:
        return ()
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size={text!r} is not HxW (e.g. 512x512)") from None
    return h, w


# --------------------------------------------------------------------------- plans


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
    grad_accum: int = 1,
    **overrides,
) -> list[Measurement]:
    """The CPU measurements of `scripts/benchmark.py` for an experiment.

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
      grad_accum: > 1 adds "train: ours, grad_accum K" after "train: ours":
        K accumulated micro-batches of `batch` images per step.
      **overrides: further `Measurement` fields for our side (e.g.
        precision, fold_bn, onednn, inter_op_threads, replicas).
    """
    if compare not in ("", "torchvision"):
        raise ValueError(f"--compare must be empty or 'torchvision', got {compare!r}")
    if jit_compile not in ("auto", "on", "off"):
        raise ValueError(f"jit_compile must be auto, on or off, got {jit_compile!r}")
    ours = dataclasses.asdict(config.model)
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
        if kind == "train" and ours_common.get("replicas", 1) > 1:
            # The same step with Keras' synchronized BatchNorm (several all-reduces per layer).
            measurements.append(
                Measurement(
                    label="train: ours, Keras SyncBN",
                    framework="tf",
                    model=ours,
                    keras_sync_bn=True,
                    **{**ours_common, "flops": False},
                )
            )
        if kind == "train" and grad_accum > 1:
            measurements.append(
                Measurement(
                    label=f"train: ours, grad_accum {grad_accum}",
                    framework="tf",
                    model=ours,
                    grad_accum=grad_accum,
                    **{**ours_common, "flops": False},
                )
            )
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
            arch = torch_side.torchvision_arch(config.model.backbone_depth)
            measurements.append(
                Measurement(
                    label=f"{kind}: torchvision {arch}",
                    framework="torch",
                    model={"arch": arch, "num_classes": config.model.num_classes},
                    **common,
                )
            )
    return measurements


def replica_counts(gpus: int) -> list[int]:
    """1, 2, 4, ... up to `gpus`, and `gpus` itself."""
    counts, n = [], 1
    while n < gpus:
        counts.append(n)
        n *= 2
    return counts + [gpus]


def plan_gpu(
    config,
    what: Sequence[str],
    gpus: int,
    batch: int,
    size: tuple[int, int],
    repeats: int = 3,
    warmup: int = 1,
    fold_bn: bool = True,
) -> list[Measurement]:
    """The GPU measurements: float32 and mixed_float16, without and with XLA, per replica count.

    Our model as the experiment defines it, `batch` images per GPU (the
    reference trains 2 per GPU), TensorFlow's default threads and kernels
    (oneDNN and the inter-op setting are CPU matters). XLA compiles the
    forward and backward of the train step (`trainer.jit_compile`).

    Args:
      config: the experiment.
      what: "train" and/or "infer".
      gpus: visible GPUs.
      batch: images per GPU.
      size: (h, w).
      repeats: timed calls.
      warmup: untimed calls first (XLA compiles in the first).
      fold_bn: fold BatchNorm for inference.
    """
    ours = dataclasses.asdict(config.model)
    plan = []
    for kind in what:
        for replicas in replica_counts(gpus):
            for precision in ("float32", "mixed_float16"):
                for jit in (False, True):
                    plan.append(
                        Measurement(
                            label=f"{kind}: ours, {replicas} GPU, {precision}, {'xla' if jit else 'no xla'}",
                            framework="tf",
                            what=kind,
                            model=ours,
                            batch=batch,
                            size=tuple(size),
                            warmup=warmup,
                            repeats=repeats,
                            threads=0,
                            jit_compile=jit,
                            precision=precision,
                            fold_bn=fold_bn and kind == "infer",
                            experiment=config.name,
                            device="gpu",
                            replicas=replicas,
                        )
                    )
    return plan


# --------------------------------------------------------------------------- running


def _peak_key(m: Measurement) -> tuple:
    return (m.framework, tuple(sorted(child_env(m).items())))


def matmul_peaks(plan: Sequence[Measurement], log=print) -> dict[tuple, float | None]:
    """The roofline of every row: each framework's float32 matmul peak, once per distinct environment.

    TensorFlow rows get `tf.linalg.matmul` under their oneDNN setting and
    thread count; torchvision rows `torch.mm` with their thread count: the
    kernels each model runs on, so no "% of peak" can exceed 100 except by
    measurement noise.

    Returns:
      {key: GFLOP/s or None when the peak could not be measured}; the key of
      a measurement is `_peak_key(m)`.
    """
    peaks: dict[tuple, float | None] = {}
    for m in plan:
        key = _peak_key(m)
        if key in peaks:
            continue
        target = (
            "benchmarks.model:matmul_gflops" if m.framework == "tf" else "benchmarks.torch_side:matmul_gflops"
        )
        library = f"TensorFlow tf.linalg.matmul, oneDNN {m.onednn}" if m.framework == "tf" else "torch.mm"
        try:
            peak = run_child(target, {"kwargs": {"threads": m.threads}}, child_env(m), timeout=900)
        except RuntimeError as error:
            log(f"matmul peak ({library}): not measured: {str(error).splitlines()[-1][:200]}")
            peaks[key] = None
            continue
        sizes = ", ".join(f"{n}: {g:.1f}" for n, g in peak["by_size"].items())
        log(
            f"matmul peak ({library}, float32, {m.threads} threads, best of n x n with n = {sizes}): "
            f"{peak['gflops']:.1f} GFLOP/s"
        )
        peaks[key] = peak["gflops"]
    return peaks


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
    pooled: dict[str, dict] = {}
    for r in range(rounds):
        for m in measurements:
            m = m if r == 0 else dataclasses.replace(m, flops=False)
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
            previous["images_per_s"] = m.images_per_call / statistics.median(previous["times"])
            for key in ("peak_rss_mb", "peak_device_mb"):
                if key in result:
                    previous[key] = max(previous[key], result[key])
    return [pooled[m.label] for m in measurements]


def summarize(results: Sequence[dict]) -> list[dict]:
    """Adds achieved GFLOP/s, share of the row's matmul peak and ratios to torchvision to each result.

    A result's roofline is its "peak_gflops" (set by `run_cpu` from
    `matmul_peaks`). The ratio columns compare each row with the
    torchvision row of the same kind: images/s ratio (higher is better),
    FLOP/s ratio (work done per second: the fair figure when the
    architectures differ) and peak memory ratio (lower is better).
    """
    rows = []
    reference = {r["what"]: r for r in results if r.get("framework") == "torch" and "error" not in r}
    for r in results:
        row = dict(r)
        if "error" not in r and r.get("flops_per_image"):
            row["gflops_per_s"] = r["flops_per_image"] * r["images_per_s"] / 1e9
            row["peak_share"] = row["gflops_per_s"] / r["peak_gflops"] if r.get("peak_gflops") else None
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
    if result.get("replicas", 1) > 1:
        parts.append(f"{result['replicas']} replicas")
    if result.get("grad_accum", 1) > 1:
        parts.append(f"{result['grad_accum']} x {result['batch']} accumulated")
    return ", ".join(parts)


def _markdown_table(header: str, rows: Sequence[dict], cells) -> str:
    # One line per row: `cells(row)`, or the row's error across the columns.
    columns = header.count("|") - 1
    lines = [header, "|" + " --- |" * columns]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['label']} | error: {r['error'].splitlines()[-1][:120]} |" + " |" * (columns - 2)
            )
        else:
            lines.append("| " + " | ".join(cells(r)) + " |")
    return "\n".join(lines)


def _cpu_cells(r: dict) -> list[str]:
    flops = r.get("flops_per_image")
    return [
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


def _gpu_cells(r: dict) -> list[str]:
    return [
        r["label"],
        str(r["replicas"]),
        r["precision"],
        "yes" if r["jit_compile"] else "no",
        f"{r['images_per_s']:.2f}",
        f"{r['images_per_s'] / r['replicas']:.2f}",
        f"{r['peak_device_mb']:.0f}",
        " ".join(f"{t:.3f}" for t in r["times"]),
    ]


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of summarized CPU rows (one per measurement)."""
    header = (
        "| measurement | images/s | ratio | GFLOP/img | GFLOP/s | % peak | FLOP/s ratio "
        "| peak RSS MiB | mem ratio | settings | step times s |"
    )
    return _markdown_table(header, rows, _cpu_cells)


def format_gpu_table(rows: Sequence[dict]) -> str:
    """A Markdown table of GPU rows: images/s and TensorFlow's peak device memory."""
    header = (
        "| measurement | GPUs | precision | XLA | images/s | images/s per GPU "
        "| peak device MiB (largest GPU) | step times s |"
    )
    return _markdown_table(header, rows, _gpu_cells)


def visible_gpus() -> int:
    """GPUs TensorFlow sees, asked in a child process (this one never imports TensorFlow)."""
    return run_child("benchmarks.model:gpu_count", {"kwargs": {}}, {"TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=600)


def run_cpu(config, o: Options, kinds: Sequence[str], size: tuple[int, int], log=print) -> list[dict]:
    """The CPU table: train / infer (and Cityscapes sliding window) rows, their rooflines, printed."""
    overrides = {
        "inter_op_threads": o.inter_op_threads,
        "fold_bn": o.fold_bn,
        "onednn": o.onednn,
        "replicas": o.replicas,
    }
    if o.precision:
        overrides["precision"] = o.precision
    common = dict(
        repeats=o.repeats, warmup=o.warmup, threads=o.threads, jit_compile=o.jit_compile, **overrides
    )
    plan = plan_measurements(
        config, kinds, o.batch, size, compare=o.compare, flops=o.flops, grad_accum=o.grad_accum, **common
    )
    if "infer" in kinds and config.data.dataset == "cityscapes":
        # The reference's Cityscapes evaluation: sliding 512x1024 windows over 1024x2048.
        slide = plan_measurements(
            config, ["slide"], config.eval.window_batch, (1024, 2048), flops=False, **common
        )
        plan += [dataclasses.replace(m, label="slide 1024x2048: ours", replicas=1) for m in slide]
    before = matmul_peaks(plan, log) if o.matmul_peak else {}
    results = run_interleaved(plan, rounds=o.rounds, log=log)
    # A peak is a maximum: measured before and after the rows, the better one
    # counts, so a busy moment of a shared machine does not lower the roofline.
    after = matmul_peaks(plan, log) if o.matmul_peak else {}
    peaks = {k: max((p for p in (before[k], after[k]) if p), default=None) for k in before}
    for r, m in zip(results, plan):
        r.setdefault("jit_compile", m.jit_compile if m.framework == "tf" else None)
        r["peak_gflops"] = peaks.get(_peak_key(m))
    rows = summarize(results)
    log("")
    log(
        f"{config.name}: batch {o.batch}, {size[0]}x{size[1]}, {o.threads} threads, "
        f"{o.warmup} warm-up + {o.repeats} x {o.rounds} timed calls, load average now {load_average():.2f}"
    )
    log(format_table(rows))
    for r in rows:
        if r.get("step"):
            log(f"  {r['label']}: step = {r['step']}")
    return rows


def run_gpu(
    config, o: Options, kinds: Sequence[str], size: tuple[int, int], gpus: int, log=print
) -> list[dict]:
    """The GPU table (see `plan_gpu`), printed."""
    plan = plan_gpu(config, kinds, gpus, o.batch, size, o.repeats, o.warmup, o.fold_bn)
    rows = run_interleaved(plan, rounds=o.rounds, log=log)
    log("")
    log(
        f"{config.name}: {gpus} GPU(s) visible, batch {o.batch} per GPU, {size[0]}x{size[1]}, "
        f"{o.warmup} warm-up + {o.repeats} x {o.rounds} timed calls"
    )
    log(format_gpu_table(rows))
    return rows


def run(o: Options, log=print) -> dict[str, list[dict]]:
    """Runs and prints what `o` asks for; returns {"cpu"/"gpu"/"input"/"export": rows}.

    With device "auto", train and infer run on the GPUs when TensorFlow sees
    one (the GPU table), else on the CPU (the CPU table, then NO_GPU).
    """
    import experiments

    config = experiments.get(o.experiment) if o.experiment else None
    log(f"{platform.node()} {platform.processor() or platform.machine()}, python {platform.python_version()}")
    out: dict[str, list[dict]] = {}
    kinds = [k for k in o.what if k not in ("input", "export", "reads")]
    if kinds:
        size = o.size or tuple(config.data.crop_size)
        gpus = 0 if o.device == "cpu" else visible_gpus()
        if gpus and o.device != "cpu":
            out["gpu"] = run_gpu(config, o, kinds, size, gpus, log)
        elif o.device == "gpu":
            log(NO_GPU)
        if o.device == "cpu" or (o.device == "auto" and not gpus):
            out["cpu"] = run_cpu(config, o, kinds, size, log)
            if o.device == "auto":
                log(NO_GPU)
    if "input" in o.what:
        from benchmarks import input as input_bench

        out["input"] = input_bench.main(
            config, input_dataset=o.input_dataset or None, images=o.images or None, repeats=o.repeats
        )
    if "reads" in o.what:
        from benchmarks import reads

        out["reads"] = reads.main(log=log)
    if "export" in o.what:
        out["export"] = export_bench.main(
            o.exports, o.checkpoint, o.repeats, o.warmup, o.threads, o.evaluate, log=log
        )
    return out
