"""Exports a trained model: a TF Serving SavedModel, and/or fixed-size LiteRT and ONNX files.

    python scripts/export.py --experiment=synthetic_r18_os8 --workdir=runs/demo \
        --export_dir=exports/fcn
    python scripts/export.py --experiment=synthetic_r18_os8 --workdir=runs/demo \
        --export_dir=exports/fcn_mobile --format=litert,onnx --litert_variants=float32,float16,int8

--format=saved_model (the default) writes BASE/NAME/VERSION (see
fcn_tf/export/saved_model.py for the signatures). litert and onnx write
model.tflite (model_float16.tflite, model_int8.tflite) and model.onnx into
--export_dir with the class names, palette and config in assets/, each
checked in its own runtime before it is kept (see fcn_tf/export/fixed_size.py).

With --workdir the model is restored from the workdir's latest checkpoint and
the config comes from WORKDIR/config.json (the one training used) when it
exists; --override is applied on top. A missing optional package, an
existing version or file, a missing checkpoint or a file that fails its
check stops the command with one line; all but the last are found before
the model is built, so nothing is written.

To time the exports side by side in their runtimes and score them on the
evaluation split: `python scripts/benchmark.py --what=export
--exports=exports/fcn,exports/fcn_mobile --evaluate`.
"""

import sys

from fcn_tf.startup import start

start()  # before TensorFlow is imported; quiet unless --verbosity=1

from absl import app, flags

import experiments
from fcn_tf import export
from fcn_tf.config import ConfigError

_EXPERIMENT = flags.DEFINE_string("experiment", None, "Registered experiment name.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint, config.json).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint prefix, workdir or .weights.h5 file.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir",
    None,
    "SavedModel: BASE/NAME, the version directory is created below it. LiteRT/ONNX: the directory for the files.",
    required=True,
)
_FORMAT = flags.DEFINE_list(
    "format", ["saved_model"], "Export formats: saved_model, litert, onnx (comma-separated)."
)
_LITERT_VARIANTS = flags.DEFINE_list(
    "litert_variants", ["float32"], "LiteRT weights: float32, float16, int8 (comma-separated)."
)
_IMAGE_SIZE = flags.DEFINE_list(
    "image_size", None, "LiteRT/ONNX input H,W (default: the experiment's evaluation size)."
)
_INPUT_DTYPE = flags.DEFINE_enum(
    "input_dtype", "uint8", ["uint8", "float32"], "LiteRT/ONNX input type (0..255 scale)."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "LiteRT/ONNX images per call.")
_MIN_LABEL_AGREEMENT = flags.DEFINE_float(
    "min_label_agreement", None, "Quantized LiteRT variants: accepted label agreement (default per variant)."
)
_VERSION = flags.DEFINE_integer(
    "version", None, "SavedModel version number (default: the next free integer)."
)
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels", export.DEFAULT_MAX_PIXELS, "SavedModel: largest height*width accepted."
)
_FOLD_BATCHNORM = flags.DEFINE_bool(
    "fold_batchnorm", False, "Fold BatchNorm into the convolutions (inference only)."
)
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "Config overrides key=value, e.g. data.eval_target=1024,512."
)
flags.mark_flags_as_mutual_exclusive(["workdir", "checkpoint"], required=True)


def main(argv):
    del argv
    size = None
    if _IMAGE_SIZE.value:
        try:
            size = tuple(int(s) for s in _IMAGE_SIZE.value)
        except ValueError:
            size = ()
        if len(size) != 2:
            raise app.UsageError(f"--image_size={','.join(_IMAGE_SIZE.value)} must be H,W")
    try:
        config = experiments.resolve(_EXPERIMENT.value, _WORKDIR.value, _OVERRIDE.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    try:
        export.export_checkpoint(
            config,
            _WORKDIR.value or _CHECKPOINT.value,
            _EXPORT_DIR.value,
            formats=_FORMAT.value,
            litert_variants=_LITERT_VARIANTS.value,
            version=_VERSION.value,
            max_pixels=_MAX_PIXELS.value,
            fold_bn=_FOLD_BATCHNORM.value,
            size=size,
            batch_size=_BATCH_SIZE.value,
            input_dtype=_INPUT_DTYPE.value,
            min_label_agreement=_MIN_LABEL_AGREEMENT.value,
        )
    except (export.ExportError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"export.py: {e}")


if __name__ == "__main__":
    app.run(main)
