"""Converts a reference PyTorch checkpoint into Keras weights for an experiment.

    # a whole sssegmentation FCN model -> load with model.load_weights(...)
    python scripts/convert_checkpoint.py --experiment=voc_r50_os8 \
        --input=fcn_resnet50os8_voc.pth --output=fcn_r50_os8_voc.weights.h5
    # an OpenMMLab ImageNet ResNet-v1c backbone -> the experiment's pretrained backbone
    python scripts/convert_checkpoint.py --experiment=voc_r50_os8 \
        --input=resnet50_v1c-2cccc1ad.pth --output=~/.fcn_tf/pretrained/resnet50_v1c.weights.h5

Inputs: .pth/.pt (needs `pip install .[torch]`), .npz, .safetensors. On any
missing, unexpected or mis-shaped key, every problem is listed and nothing
is written.
"""

import sys

from fcn_tf.startup import start

start()  # before TensorFlow is imported; quiet unless --verbosity=1

from absl import app, flags

import experiments
from fcn_tf import config as config_lib
from fcn_tf import storage
from fcn_tf.models import convert

_EXPERIMENT = flags.DEFINE_string(
    "experiment", None, "Experiment whose model the weights are for.", required=True
)
_INPUT = flags.DEFINE_string(
    "input", None, "Checkpoint to convert (.pth, .npz, .safetensors).", required=True
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where to write the Keras weights (*.weights.h5).", required=True
)
_KIND = flags.DEFINE_enum(
    "kind", "auto", ["auto", "fcn", "backbone"], "Checkpoint kind; auto looks at the keys."
)
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "Config overrides key=value, e.g. model.output_stride=16 (repeatable)."
)


def main(argv):
    del argv
    try:
        config = experiments.resolve(_EXPERIMENT.value, overrides=_OVERRIDE.value)
        output = storage.normalize(_OUTPUT.value)
        summary = convert.convert_checkpoint(
            config.model, storage.normalize(_INPUT.value), output, _KIND.value
        )
    # OSError: a missing input, an output folder that cannot be written, a full disk.
    except (config_lib.ConfigError, convert.ConversionError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"converted {summary['converted']} tensors ({summary['kind']} checkpoint) -> {output}")
    if summary["skipped"]:
        print(
            f"skipped on purpose ({len(summary['skipped'])}): {', '.join(summary['skipped'][:6])}"
            + (" ..." if len(summary["skipped"]) > 6 else "")
        )


if __name__ == "__main__":
    app.run(main)
