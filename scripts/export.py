"""Exports a trained model as a TF Serving SavedModel (BASE/NAME/VERSION).

    python scripts/export.py --experiment=synthetic_r18_os8 --workdir=runs/demo \
        --export_dir=exports/fcn

With --workdir the model is restored from the workdir's latest checkpoint and
the config comes from WORKDIR/config.json (the one training used) when it
exists; --override is applied on top. See fcn_tf/export_lib.py for the
signatures.
"""

from absl import app, flags, logging

import experiments
from fcn_tf import export_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", None, "Registered experiment name.", required=True)
flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint, config.json).")
flags.DEFINE_string("checkpoint", None, "Checkpoint prefix, workdir or .weights.h5 file.")
flags.DEFINE_string(
    "export_dir", None, "BASE/NAME; the version directory is created below it.", required=True
)
flags.DEFINE_integer("version", None, "Version number (default: the next free integer).")
flags.DEFINE_integer("max_pixels", export_lib.DEFAULT_MAX_PIXELS, "Largest height*width accepted.")
flags.DEFINE_bool("fold_batchnorm", False, "Fold BatchNorm into the convolutions (inference only).")
flags.DEFINE_multi_string("override", [], "Config overrides key=value, e.g. data.eval_target=1024,512.")
flags.mark_flags_as_mutual_exclusive(["workdir", "checkpoint"], required=True)


def main(argv):
    del argv
    from fcn_tf.checkpoints import restore_model
    from fcn_tf.models import build_fcn

    config = export_lib.load_config(experiments.get(FLAGS.experiment), FLAGS.workdir, FLAGS.override)
    model = build_fcn(config.model, sync_bn=False)
    restored = restore_model(model, FLAGS.workdir or FLAGS.checkpoint)
    logging.info("restored %s", restored)
    path = export_lib.export(
        config,
        model,
        FLAGS.export_dir,
        version=FLAGS.version,
        max_pixels=FLAGS.max_pixels,
        fold_bn=FLAGS.fold_batchnorm,
    )
    print(f"exported {config.name} ({restored}) to {path}")


if __name__ == "__main__":
    app.run(main)
