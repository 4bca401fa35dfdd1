r"""Benchmarks an experiment's model (and input pipeline) on this machine.

  python scripts/benchmark.py --experiment=voc_r50_os8 --what=all --compare=torchvision

prints, as medians over --repeats timed calls after --warmup untimed ones,
each measured in a fresh process: training and inference images/s, peak
resident memory, FLOPs per image (TensorFlow's profiler; PyTorch's
FlopCounterMode for torchvision), achieved FLOP/s and its share of the
matrix-multiply peak of the row's own framework (TensorFlow's
tf.linalg.matmul under the row's oneDNN setting; torch.mm for torchvision),
and with --compare=torchvision the same for torchvision's FCN and the
ratios. Our model is timed as the experiment defines it and in torchvision's
layout (7x7 stem, one head conv, 256-channel aux head), so the comparison is
also like for like. For Cityscapes experiments "infer" adds sliding-window
inference of a 1024x2048 image. With a GPU visible (or --device=gpu),
train and infer print the GPU table instead: images/s and peak device
memory for float32 and mixed_float16, with and without XLA, on 1, 2, 4, ...
GPUs; without one, "no GPU visible". --compare=torchvision needs the bench
extra (`pip install .[bench]`). --what=export times exports written by
scripts/export.py side by side in their runtimes (--exports; with --evaluate
their mIoU, see benchmarks/export.py). The code is in benchmarks/ (not
installed).
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

import experiments
from benchmarks import suite

_EXPERIMENT = flags.DEFINE_string("experiment", None, "Registered experiment name.")
_WHAT = flags.DEFINE_list(
    "what",
    ["all"],
    "What to measure: a comma list of train, infer, input, export, reads (records/s against reads in flight), "
    "or all (train, infer, input).",
)
_BATCH = flags.DEFINE_integer("batch", 2, "Images per step (model benchmarks; per GPU on GPUs).")
_SIZE = flags.DEFINE_string("size", "", "Input HxW, e.g. 512x512 (default: the experiment's crop size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (the median is printed).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls before timing.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Interleaved rounds of all measurements (times pooled).")
_COMPARE = flags.DEFINE_enum("compare", "", ["", "torchvision"], "Also run torchvision's FCN side by side.")
_JIT = flags.DEFINE_enum("jit_compile", "auto", ["auto", "on", "off"], "XLA for our CPU step / forward.")
_THREADS = flags.DEFINE_integer("threads", 2, "Intra-op threads of both frameworks and of the matmul peaks.")
_INTER_OP = flags.DEFINE_integer(
    "inter_op_threads",
    -1,
    "TensorFlow inter-op threads. -1 (auto): for training what scripts/train.py uses "
    "(trainer.inter_op_threads=-1: 1 on a machine without GPU/TPU), for inference "
    "TensorFlow's default; 0: TensorFlow's default; N: N threads.",
)
_PRECISION = flags.DEFINE_enum(
    "precision", "", ["", "float32", "mixed_bfloat16"], "Our CPU precision (default: the experiment's)."
)
_FOLD_BN = flags.DEFINE_bool(
    "fold_bn", True, "Fold BatchNorm into the convs for our inference (as export --fold_batchnorm)."
)
_ONEDNN = flags.DEFINE_enum(
    "onednn",
    "auto",
    ["auto", "default", "on", "off"],
    "TF_ENABLE_ONEDNN_OPTS of our CPU side; auto: on (see AUTO_ONEDNN in benchmarks/suite.py).",
)
_FLOPS = flags.DEFINE_bool("flops", True, "Count FLOPs per image.")
_PEAK = flags.DEFINE_bool("matmul_peak", True, "Measure each framework's float32 matmul peak (the roofline).")
_DEVICE = flags.DEFINE_enum(
    "device", "auto", list(suite.DEVICES), "auto: the GPU table when a GPU is visible, else the CPU table."
)
_REPLICAS = flags.DEFINE_integer(
    "replicas", 1, "Replicas of our CPU rows (logical CPU devices, BatchNorm synchronized as in training)."
)
_GRAD_ACCUM = flags.DEFINE_integer(
    "grad_accum", 1, "K > 1: also a train row with trainer.grad_accum_steps=K (K x --batch images per step)."
)
_INPUT_DATASET = flags.DEFINE_enum(
    "input_dataset",
    "",
    ["", "voc", "cityscapes", "both"],
    "--what=input: VOC-sized JPEGs, Cityscapes-sized PNGs or both (default: --experiment's dataset, else both).",
)
_IMAGES = flags.DEFINE_integer(
    "images", 0, "--what=input: images per timed repeat (0: 192 VOC, 32 Cityscapes)."
)
_EXPORTS = flags.DEFINE_list(
    "exports", [], "--what=export: SavedModel directories, .tflite / .onnx files or directories of them."
)
_EVALUATE = flags.DEFINE_bool(
    "evaluate", False, "--what=export: mIoU of each LiteRT/ONNX file on the evaluation split."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "--what=export with --evaluate: also score TensorFlow in-process from this checkpoint."
)


def main(argv):
    del argv
    try:
        options = suite.Options(
            experiment=_EXPERIMENT.value or "",
            what=suite.parse_what(_WHAT.value),
            batch=_BATCH.value,
            size=suite.parse_size(_SIZE.value),
            repeats=_REPEATS.value,
            warmup=_WARMUP.value,
            rounds=_ROUNDS.value,
            compare=_COMPARE.value,
            jit_compile=_JIT.value,
            threads=_THREADS.value,
            inter_op_threads=_INTER_OP.value,
            precision=_PRECISION.value,
            fold_bn=_FOLD_BN.value,
            onednn=_ONEDNN.value,
            flops=_FLOPS.value,
            matmul_peak=_PEAK.value,
            device=_DEVICE.value,
            replicas=_REPLICAS.value,
            grad_accum=_GRAD_ACCUM.value,
            input_dataset=_INPUT_DATASET.value,
            images=_IMAGES.value,
            exports=tuple(_EXPORTS.value),
            checkpoint=_CHECKPOINT.value,
            evaluate=_EVALUATE.value,
        )
        if options.experiment:
            experiments.get(options.experiment)  # an unknown name: fcn_tf.config.ConfigError, a ValueError
    except ValueError as error:
        sys.exit(f"error: {error}")
    # Checked here: without torch every torchvision row would fail in its own child process.
    missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
    if options.compare == "torchvision" and missing:
        sys.exit(f"error: --compare=torchvision needs {' and '.join(missing)}: pip install -e '.[bench]'")
    suite.run(options, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    app.run(main)
