"""Segments images and writes NAME_labels.png and NAME_overlay.png for each.

    python scripts/predict.py --export_dir=exports/fcn --input=photos/ --output=out/
    python scripts/predict.py --export_dir=exports/fcn_mobile/model.tflite --input=photos/ --output=out/
    python scripts/predict.py --experiment=synthetic_r18_os8 --checkpoint=runs/demo \
        --input=photo.jpg --output=out/

A file that cannot be segmented is reported (name and reason) and the others
are still processed; the exit code is 1 when any file failed.
"""

import os
import sys

from fcn_tf.startup import start

start(onednn=True)  # before TensorFlow is imported; quiet unless --verbosity=1

import tensorflow as tf
from absl import app, flags

import experiments
from fcn_tf import api, export, predict_lib
from fcn_tf.config import ConfigError

_EXPORT_DIR = flags.DEFINE_string(
    "export_dir",
    None,
    "Export: a SavedModel version directory, BASE/NAME (latest), or a .tflite / .onnx file.",
)
_EXPERIMENT = flags.DEFINE_string("experiment", None, "Registered experiment name (with --checkpoint).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint prefix, workdir or .weights.h5 (with --experiment)."
)
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Config overrides key=value (with --experiment).")
_INPUT = flags.DEFINE_string("input", None, "An image file or a directory of images.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the PNGs.", required=True)
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Weight of the label colours in the overlay.")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels",
    export.DEFAULT_MAX_PIXELS,
    "Largest height*width (with --checkpoint or a .tflite / .onnx file).",
)


def main(argv):
    del argv
    if bool(_EXPORT_DIR.value) == bool(_CHECKPOINT.value):
        raise app.UsageError("give either --export_dir, or --experiment with --checkpoint")
    if _EXPORT_DIR.value:
        runtime = {".tflite": "litert", ".onnx": "onnx"}.get(os.path.splitext(_EXPORT_DIR.value)[1].lower())
        missing = export.missing_requirements([runtime]) if runtime else None
        if missing:
            sys.exit(f"predict.py: {missing}")
        segmenter = api.Segmenter(predict_lib.Predictor.load(_EXPORT_DIR.value, _MAX_PIXELS.value))
    else:
        if not _EXPERIMENT.value:
            raise app.UsageError("--checkpoint needs --experiment")
        workdir = _CHECKPOINT.value if tf.io.gfile.isdir(_CHECKPOINT.value) else None
        try:
            config = experiments.resolve(_EXPERIMENT.value, workdir, _OVERRIDE.value)
        except ConfigError as e:
            sys.exit(f"error: {e}")
        segmenter = api.Segmenter.load(_CHECKPOINT.value, config, _MAX_PIXELS.value)
    paths = predict_lib.list_images(_INPUT.value)
    results = segmenter.segment_files(paths, _OUTPUT.value, alpha=_ALPHA.value)
    print(predict_lib.summary(results))
    if not paths or any(r.error for r in results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
