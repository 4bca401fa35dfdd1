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

from fcn_tf.devices import prefer_onednn

prefer_onednn()  # before TensorFlow is imported

from absl import app, flags

import experiments
from fcn_tf import export_lib, predict_lib
from fcn_tf.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "export_dir",
    None,
    "Export: a SavedModel version directory, BASE/NAME (latest), or a .tflite / .onnx file.",
)
flags.DEFINE_string("experiment", None, "Registered experiment name (with --checkpoint).")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix, workdir or .weights.h5 (with --experiment).")
flags.DEFINE_multi_string("override", [], "Config overrides key=value (with --experiment).")
flags.DEFINE_string("input", None, "An image file or a directory of images.", required=True)
flags.DEFINE_string("output", None, "Directory for the PNGs.", required=True)
flags.DEFINE_float("alpha", 0.5, "Weight of the label colours in the overlay.")
flags.DEFINE_integer(
    "max_pixels",
    export_lib.DEFAULT_MAX_PIXELS,
    "Largest height*width (with --checkpoint or a .tflite / .onnx file).",
)


def main(argv):
    del argv
    if bool(FLAGS.export_dir) == bool(FLAGS.checkpoint):
        raise app.UsageError("give either --export_dir, or --experiment with --checkpoint")
    if FLAGS.export_dir:
        runtime = {".tflite": "litert", ".onnx": "onnx"}.get(os.path.splitext(FLAGS.export_dir)[1].lower())
        missing = export_lib.missing_requirements([runtime]) if runtime else None
        if missing:
            sys.exit(f"predict.py: {missing}")
        predictor = predict_lib.Predictor.load(FLAGS.export_dir, FLAGS.max_pixels)
    else:
        if not FLAGS.experiment:
            raise app.UsageError("--checkpoint needs --experiment")
        workdir = FLAGS.checkpoint if os.path.isdir(FLAGS.checkpoint) else None
        try:
            config = experiments.resolve(FLAGS.experiment, workdir, FLAGS.override)
        except ConfigError as e:
            sys.exit(f"error: {e}")
        predictor = predict_lib.Predictor.from_checkpoint(config, FLAGS.checkpoint, FLAGS.max_pixels)
    paths = predict_lib.list_images(FLAGS.input)
    results = predict_lib.predict_files(predictor, paths, FLAGS.output, alpha=FLAGS.alpha)
    print(predict_lib.summary(results))
    if not paths or any(r.error for r in results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
