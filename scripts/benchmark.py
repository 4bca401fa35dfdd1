r"""Benchmarks an experiment's model (and input pipeline) on this machine.

  python scripts/benchmark.py --experiment=voc_r50_os8 --what=all --compare=torchvision

prints, as medians over --repeats timed calls after --warmup untimed ones,
each measured in a fresh process: training and inference images/s, peak
resident memory, FLOPs per image (TensorFlow's profiler; PyTorch's
FlopCounterMode for torchvision), achieved FLOP/s and its share of the
machine's matrix-multiply peak (numpy sgemm), and with --compare=torchvision
the same for torchvision's FCN and the ratios. Our model is timed as the
experiment defines it and in torchvision's layout (7x7 stem, one head conv,
256-channel aux head), so the comparison is also like for like. For
Cityscapes experiments "infer" adds sliding-window inference of a 1024x2048
image. --compare=torchvision needs the bench extra (`pip install .[bench]`).
"""

import dataclasses
import platform
import sys

from absl import app, flags

import experiments
from fcn_tf.benchmark import model as model_bench

_EXPERIMENT = flags.DEFINE_string("experiment", None, "Registered experiment name.")
_WHAT = flags.DEFINE_enum("what", "all", ["train", "infer", "input", "all"], "What to measure.")
_BATCH = flags.DEFINE_integer("batch", 2, "Images per step (model benchmarks).")
_SIZE = flags.DEFINE_string("size", "", "Input HxW, e.g. 512x512 (default: the experiment's crop size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (the median is printed).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls before timing.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Interleaved rounds of all measurements (times pooled).")
_COMPARE = flags.DEFINE_enum("compare", "", ["", "torchvision"], "Also run torchvision's FCN side by side.")
_JIT = flags.DEFINE_enum("jit_compile", "auto", ["auto", "on", "off"], "XLA for our step / forward.")
_THREADS = flags.DEFINE_integer("threads", 2, "Intra-op threads of both frameworks and of the matmul peak.")
_INTER_OP = flags.DEFINE_integer(
    "inter_op_threads",
    -1,
    "TensorFlow inter-op threads. -1 (auto): for training what scripts/train.py uses "
    "(trainer.inter_op_threads=-1: 1 on a machine without GPU/TPU), for inference "
    "TensorFlow's default; 0: TensorFlow's default; N: N threads.",
)
_PRECISION = flags.DEFINE_enum(
    "precision", "", ["", "float32", "mixed_bfloat16"], "Our precision (default: the experiment's)."
)
_FOLD_BN = flags.DEFINE_bool(
    "fold_bn", True, "Fold BatchNorm into the convs for our inference (as export --fold_batchnorm)."
)
_ONEDNN = flags.DEFINE_enum(
    "onednn",
    "auto",
    ["auto", "default", "on", "off"],
    "TF_ENABLE_ONEDNN_OPTS of our side; auto: on (see AUTO_ONEDNN in fcn_tf/benchmark/model.py).",
)
_FLOPS = flags.DEFINE_bool("flops", True, "Count FLOPs per image.")
_PEAK = flags.DEFINE_bool("matmul_peak", True, "Measure the numpy sgemm peak (the roofline).")
_INPUT_DATASET = flags.DEFINE_enum(
    "input_dataset",
    "",
    ["", "voc", "cityscapes", "both"],
    "--what=input: VOC-sized JPEGs, Cityscapes-sized PNGs or both (default: --experiment's dataset, else both).",
)
_IMAGES = flags.DEFINE_integer(
    "images", 0, "--what=input: images per timed repeat (0: 192 VOC, 32 Cityscapes)."
)


def _size(config):
    if not _SIZE.value:
        return tuple(config.data.crop_size)
    try:
        h, w = (int(v) for v in _SIZE.value.lower().split("x"))
    except ValueError:
        sys.exit(f"error: --size={_SIZE.value!r} is not HxW (e.g. 512x512)")
    return h, w


def _run_models(config, kinds):
    """Train / infer (and Cityscapes sliding window): the model measurements."""
    size = _size(config)
    overrides = {"inter_op_threads": _INTER_OP.value, "fold_bn": _FOLD_BN.value, "onednn": _ONEDNN.value}
    if _PRECISION.value:
        overrides["precision"] = _PRECISION.value
    plan = model_bench.plan_measurements(
        config,
        kinds,
        batch=_BATCH.value,
        size=size,
        repeats=_REPEATS.value,
        warmup=_WARMUP.value,
        threads=_THREADS.value,
        jit_compile=_JIT.value,
        compare=_COMPARE.value,
        flops=_FLOPS.value,
        **overrides,
    )
    if "infer" in kinds and config.data.dataset == "cityscapes":
        # The reference's Cityscapes evaluation: sliding 512x1024 windows over 1024x2048.
        slide = model_bench.plan_measurements(
            config,
            ["slide"],
            batch=config.eval.window_batch,
            size=(1024, 2048),
            repeats=_REPEATS.value,
            warmup=_WARMUP.value,
            threads=_THREADS.value,
            jit_compile=_JIT.value,
            flops=False,
            **overrides,
        )
        plan += [dataclasses.replace(m, label="slide 1024x2048: ours") for m in slide]
    peak = model_bench.matmul_peak_gflops(threads=_THREADS.value) if _PEAK.value else 0.0
    if peak:
        print(f"matmul peak (numpy sgemm 4096, {_THREADS.value} threads): {peak:.1f} GFLOP/s", flush=True)
    results = model_bench.run_interleaved(plan, rounds=_ROUNDS.value, log=lambda s: print(s, flush=True))
    for r, m in zip(results, plan):
        r.setdefault("jit_compile", m.jit_compile if m.framework == "tf" else None)
    rows = model_bench.summarize(results, peak)
    print()
    print(
        f"{config.name}: batch {_BATCH.value}, {size[0]}x{size[1]}, {_THREADS.value} threads, "
        f"{_WARMUP.value} warm-up + {_REPEATS.value} x {_ROUNDS.value} timed calls, "
        f"load average now {model_bench.load_average():.2f}"
    )
    print(model_bench.format_table(rows))
    for r in rows:
        if r.get("step"):
            print(f"  {r['label']}: step = {r['step']}")
    return rows


def _run_input(config):
    try:
        from fcn_tf.benchmark import input as input_bench
    except ImportError:
        print("input pipeline benchmark: fcn_tf.benchmark.input is not available")
        return None
    return input_bench.main(
        config,
        input_dataset=_INPUT_DATASET.value or None,
        images=_IMAGES.value or None,
        repeats=_REPEATS.value,
    )


# What each --what runs; "all" runs them in this order.
MODES = {
    "train": lambda config: _run_models(config, ["train"]),
    "infer": lambda config: _run_models(config, ["infer"]),
    "input": _run_input,
}


def main(argv):
    del argv
    if not _EXPERIMENT.value and _WHAT.value != "input":
        sys.exit("error: --experiment is required (except for --what=input)")
    # The input benchmark alone needs no experiment: it uses voc/cityscapes DataConfigs.
    config = experiments.get(_EXPERIMENT.value) if _EXPERIMENT.value else None
    print(
        f"{platform.node()} {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    if _WHAT.value == "all":
        _run_models(config, ["train", "infer"])
        MODES["input"](config)
    else:
        MODES[_WHAT.value](config)


if __name__ == "__main__":
    app.run(main)
