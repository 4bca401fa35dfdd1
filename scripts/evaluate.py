r"""Evaluates a trained FCN on its experiment's evaluation split (mIoU as the reference computes it).

  python scripts/evaluate.py --experiment=synthetic_r18_os8 --workdir=runs/demo --output=runs/demo/eval.json
  python scripts/evaluate.py --experiment=cityscapes_r50_os8 --checkpoint=PATH --mode=slide \
      --scales=0.5,0.75,1.0,1.25,1.5,1.75 --flip --save_predictions=/tmp/preds

Prints the per-class IoU table and the summary (mIoU, mAcc, aAcc), and with
--output writes them as JSON (nan -> null). With --workdir the config the
run was trained with (WORKDIR/config.json) is used when present; --override
and the eval flags apply on top. Runs under the same strategy selection as
training (`fcn_tf.distribute.make_strategy`).
"""

import json
import os
import sys

from fcn_tf.startup import start

start(onednn=True)  # before TensorFlow is imported; quiet unless --verbosity=1

import tensorflow as tf
from absl import app, flags

import experiments
from fcn_tf import config as config_lib

_EXPERIMENT = flags.DEFINE_string(
    "experiment", None, "Registered experiment name (see scripts/list_experiments.py)."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training work directory: its latest checkpoint is evaluated."
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A checkpoint prefix or a Keras .weights.h5 file.")
_MODE = flags.DEFINE_enum(
    "mode", None, list(config_lib.EVAL_MODES), "Inference mode (default: the experiment's)."
)
_SCALES = flags.DEFINE_list("scales", None, "Test-time scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75.")
_FLIP = flags.DEFINE_bool("flip", None, "Also average horizontally flipped predictions.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the metrics to this JSON file.")
_SAVE_PREDICTIONS = flags.DEFINE_string(
    "save_predictions", None, "Write prediction PNGs into this directory."
)
_OVERRIDE = flags.DEFINE_multi_string("override", [], "Config override key=value (repeatable).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the experiment's).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Evaluate only the first N examples (0: all).")
_STRATEGY = flags.DEFINE_string(
    "strategy", "auto", "Distribution strategy: auto, mirrored, multiworker or default (fcn_tf.distribute)."
)


def eval_overrides(mode=None, scales=None, flip=None, data_dir=None) -> list[str]:
    """The eval flags as config overrides, applied after --override."""
    assignments = []
    if mode:
        assignments.append(f"eval.mode={mode}")
    if scales:
        assignments.append(f"eval.scales={','.join(scales)}")
    if flip is not None:
        assignments.append(f"eval.flip={flip}")
    if data_dir:
        assignments.append(f"data.data_dir={data_dir}")
    return assignments


def write_output(path: str, record: dict) -> None:
    """Writes `record` as JSON to `path`, creating its folder; a failure ends in one line.

    Args:
      path: the JSON file to write.
      record: plain values only (nan already turned into None).
    """
    try:
        # Through TensorFlow's filesystem layer: `path` may be a URL (gs://, file://, ...).
        directory = os.path.dirname(path)
        if directory:
            tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(json.dumps(record, indent=2, allow_nan=False))
    except (OSError, tf.errors.OpError) as e:
        sys.exit(f"error: cannot write --output={path}: {e}")
    print(f"Wrote {path}")


def main(argv):
    del argv
    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        sys.exit("error: give exactly one of --workdir or --checkpoint")
    flag_overrides = eval_overrides(_MODE.value, _SCALES.value, _FLIP.value, _DATA_DIR.value)
    try:
        config = experiments.resolve(_EXPERIMENT.value, _WORKDIR.value, [*_OVERRIDE.value, *flag_overrides])
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")

    # TensorFlow is imported only now, so that bad arguments are reported at once.
    from fcn_tf import api, distribute, eval_lib
    from fcn_tf.metrics import format_table

    try:
        strategy = distribute.make_strategy(_STRATEGY.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    eval_config = config.eval
    try:
        result = api.evaluate(
            config,
            _WORKDIR.value or _CHECKPOINT.value,
            strategy=strategy,
            max_examples=_MAX_EXAMPLES.value,
            save_predictions_dir=_SAVE_PREDICTIONS.value,
        )
    # FileNotFoundError: no checkpoint there, or the dataset is not prepared in data.data_dir
    # (the message says how); CheckpointError: a damaged checkpoint or another model's.
    except (FileNotFoundError, api.CheckpointError) as e:
        sys.exit(f"error: {e}")
    restored = result.pop("checkpoint")
    if not distribute.is_chief(strategy):
        return
    print(format_table(result, result["class_names"]))
    print(
        f"{config.name} ({eval_config.mode}, scales={list(eval_config.scales)}, flip={eval_config.flip}): {result['num_examples']} images, "
        f"mIoU={100 * result['miou']:.2f} mAcc={100 * result['macc']:.2f} aAcc={100 * result['aacc']:.2f} "
        f"({result['examples_per_second']:.2f} images/s)"
    )
    if _OUTPUT.value:
        record = dict(
            experiment=config.name,
            checkpoint=restored,
            eval=config_lib.to_dict(config)["eval"],
            dataset=config.data.dataset,
            split=config.data.eval_split,
            **eval_lib.to_jsonable(result),
        )
        write_output(_OUTPUT.value, record)


if __name__ == "__main__":
    flags.mark_flag_as_required("experiment")
    app.run(main)
