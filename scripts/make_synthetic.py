r"""Writes the synthetic shapes dataset in the PASCAL VOC layout.

  python scripts/make_synthetic.py --output_dir=data/synthetic_raw
  python scripts/prepare_data.py --dataset=synthetic --manual_dir=data/synthetic_raw --data_dir=data/tfds

With --layout=folder the same images are written in the folder dataset's layout
(images/, annotations/, classes.txt; --coloured for RGB annotations), prepared with
prepare_data.py --dataset=folder --name=NAME.

5 classes (background, disc, square, triangle, ring), 255 on a thin
boundary band; deterministic for a given seed. See fcn_tf/data/synthetic.py.
"""

import sys

from fcn_tf.startup import start

start()  # before TensorFlow is imported; quiet unless --verbosity=1

from absl import app, flags

from fcn_tf.data import synthetic

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write VOCdevkit/VOC2012/...")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 400, "Training images.")
_NUM_VAL = flags.DEFINE_integer("num_val", 100, "Validation images.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed (the only source of randomness).")
_HEIGHT = flags.DEFINE_integer("height", 96, "Image height.")
_WIDTH = flags.DEFINE_integer("width", 128, "Image width.")
_LAYOUT = flags.DEFINE_enum("layout", "voc", ["voc", "folder"], "The on-disk layout to write.")
_COLOURED = flags.DEFINE_bool("coloured", False, "--layout=folder: RGB annotations in the class colours.")
flags.mark_flag_as_required("output_dir")


def main(argv):
    del argv
    try:
        root = synthetic.write_dataset(
            _OUTPUT_DIR.value,
            num_train=_NUM_TRAIN.value,
            num_val=_NUM_VAL.value,
            seed=_SEED.value,
            height=_HEIGHT.value,
            width=_WIDTH.value,
            layout=_LAYOUT.value,
            coloured=_COLOURED.value,
        )
    except (ValueError, OSError) as e:  # bad counts or size; an output folder that cannot be written
        sys.exit(f"error: {e}")
    print(f"Wrote {_NUM_TRAIN.value} train + {_NUM_VAL.value} val images to {root}")


if __name__ == "__main__":
    app.run(main)
