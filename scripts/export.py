"""Exports a trained model: a TF Serving SavedModel, and/or fixed-size LiteRT and ONNX files.

    python scripts/export.py --experiment=synthetic_r18_os8 --workdir=runs/demo \
        --export_dir=exports/fcn
    python scripts/export.py --experiment=synthetic_r18_os8 --workdir=runs/demo \
        --export_dir=exports/fcn_mobile --format=litert,onnx --litert_variants=float32,float16,int8

--format=saved_model (the default) writes BASE/NAME/VERSION (see
fcn_tf/export_lib.py for the signatures). litert and onnx write
model.tflite (model_float16.tflite, model_int8.tflite) and model.onnx into
--export_dir with the class names, palette and config in assets/, each
checked in its own runtime before it is kept (see fcn_tf/export_fixed.py).

With --workdir the model is restored from the workdir's latest checkpoint and
the config comes from WORKDIR/config.json (the one training used) when it
exists; --override is applied on top. --benchmark_runs=N times every file
written, side by side, in its runtime; --evaluate scores each on the
experiment's evaluation split.
"""

import os
import sys

from absl import app, flags, logging

import experiments
from fcn_tf import export_lib
from fcn_tf.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None, "Registered experiment name.", required=True)
flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint, config.json).")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix, workdir or .weights.h5 file.")
flags.DEFINE_string(
    "export_dir",
    None,
    "SavedModel: BASE/NAME, the version directory is created below it. LiteRT/ONNX: the directory for the files.",
    required=True,
)
flags.DEFINE_list("format", ["saved_model"], "Export formats: saved_model, litert, onnx (comma-separated).")
flags.DEFINE_list("litert_variants", ["float32"], "LiteRT weights: float32, float16, int8 (comma-separated).")
flags.DEFINE_list("image_size", None, "LiteRT/ONNX input H,W (default: the experiment's evaluation size).")
flags.DEFINE_enum("input_dtype", "uint8", ["uint8", "float32"], "LiteRT/ONNX input type (0..255 scale).")
flags.DEFINE_integer("batch_size", 1, "LiteRT/ONNX images per call.")
flags.DEFINE_float(
    "min_label_agreement", None, "Quantized LiteRT variants: accepted label agreement (default per variant)."
)
flags.DEFINE_integer("version", None, "SavedModel version number (default: the next free integer).")
flags.DEFINE_integer(
    "max_pixels", export_lib.DEFAULT_MAX_PIXELS, "SavedModel: largest height*width accepted."
)
flags.DEFINE_bool("fold_batchnorm", False, "Fold BatchNorm into the convolutions (inference only).")
flags.DEFINE_integer("benchmark_runs", 0, "Time each written export over N calls at the fixed size (0: no).")
flags.DEFINE_bool("evaluate", False, "mIoU of each LiteRT/ONNX export and of TensorFlow on the eval split.")
flags.DEFINE_multi_string("override", [], "Config overrides key=value, e.g. data.eval_target=1024,512.")
flags.mark_flags_as_mutual_exclusive(["workdir", "checkpoint"], required=True)


def _directory_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv):
    del argv
    formats = list(dict.fromkeys(FLAGS.format))
    try:
        missing = export_lib.missing_requirements(formats)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if missing:
        sys.exit(f"export.py: {missing}")
    fixed = [
        (f, v)
        for f in formats
        if f != "saved_model"
        for v in (FLAGS.litert_variants if f == "litert" else ["float32"])
    ]
    size = tuple(int(s) for s in FLAGS.image_size) if FLAGS.image_size else None
    if size is not None and len(size) != 2:
        raise app.UsageError(f"--image_size={','.join(FLAGS.image_size)} must be H,W")

    from fcn_tf import export_fixed
    from fcn_tf.checkpoints import restore_model
    from fcn_tf.models import build_fcn
    from fcn_tf.models.fold_batchnorm import fold_batchnorm

    for key in fixed:
        if key not in export_fixed.VARIANTS:
            raise app.UsageError(
                f"no {key[0]} variant {key[1]!r}; choose from {sorted(export_fixed.VARIANTS)}"
            )
    try:
        config = experiments.resolve(FLAGS.experiment, FLAGS.workdir, FLAGS.override)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    model = build_fcn(config.model, sync_bn=False)
    restored = restore_model(model, FLAGS.workdir or FLAGS.checkpoint)
    logging.info("restored %s", restored)
    written = []  # (name, path, bytes, runner)
    if "saved_model" in formats:
        path = export_lib.export(
            config,
            model,
            FLAGS.export_dir,
            version=FLAGS.version,
            max_pixels=FLAGS.max_pixels,
            fold_bn=FLAGS.fold_batchnorm,
        )
        print(f"exported {config.name} ({restored}) to {path}")
        written.append(("saved_model", path, _directory_bytes(path), None))
    if fixed:
        main_model = fold_batchnorm(export_lib.logits_model(model)) if FLAGS.fold_batchnorm else model
        try:
            results = export_fixed.export(
                config,
                main_model,
                FLAGS.export_dir,
                variants=fixed,
                size=size,
                batch_size=FLAGS.batch_size,
                input_dtype=FLAGS.input_dtype,
                min_label_agreement=FLAGS.min_label_agreement,
            )
        except (export_fixed.ExportCheckError, FileExistsError) as e:
            sys.exit(f"export.py: {e}")
        for (fmt, variant), (path, _) in results.items():
            print(f"exported {config.name} ({restored}) to {path}")
            written.append((f"{fmt} {variant}", path, os.path.getsize(path), None))
    if FLAGS.benchmark_runs or FLAGS.evaluate:
        _measure(config, model, written, size, FLAGS.benchmark_runs, FLAGS.evaluate)


def _measure(config, model, written, size, runs, evaluate):
    """Latency per image and file size of each export, side by side; mIoU with --evaluate."""
    import numpy as np
    import tensorflow as tf

    from fcn_tf import export_fixed

    module = export_fixed.FixedSizeModel(
        config, model, size or export_fixed.default_size(config), FLAGS.batch_size, FLAGS.input_dtype
    )
    images = export_fixed.check_images(module.input_spec)
    batch = images.shape[0]
    rows = []
    reference = export_fixed.TensorFlowRunner(module)
    if evaluate:
        rows.append(("tensorflow (in-process)", None, None, export_fixed.evaluate(reference, config)["miou"]))
    for name, path, size_bytes, _ in written:
        if name == "saved_model":
            loaded = tf.saved_model.load(path)
            signature = loaded.signatures[export_lib.PREDICT_IMAGES]
            uint8 = tf.constant(images.astype(np.uint8))

            def call(_, signature=signature, uint8=uint8):
                return signature(images=uint8)["labels"].numpy()

            runner, miou = call, None
        else:
            runner = export_fixed.load_runner(path)
            miou = export_fixed.evaluate(runner, config)["miou"] if evaluate else None
        latency = export_fixed.measure_latency(runner, images, runs) / batch if runs else None
        rows.append((name, size_bytes, latency, miou))
    print(f"{'export':<24} {'size MB':>8} {'ms/image':>9} {'mIoU':>7}")
    for name, size_bytes, latency, miou in rows:
        size_text = f"{size_bytes / 1e6:8.1f}" if size_bytes is not None else f"{'-':>8}"
        latency_text = f"{latency * 1e3:9.1f}" if latency is not None else f"{'-':>9}"
        miou_text = f"{miou:7.4f}" if miou is not None else f"{'-':>7}"
        print(f"{name:<24} {size_text} {latency_text} {miou_text}")


if __name__ == "__main__":
    app.run(main)
