r"""Prepares a dataset as TFDS files from the raw files in their official layout.

  python scripts/prepare_data.py --dataset=voc_aug --manual_dir=RAW --data_dir=~/tensorflow_datasets
  python scripts/prepare_data.py --dataset=ade20k --manual_dir=RAW --data_dir=~/tensorflow_datasets
  python scripts/prepare_data.py --dataset=cityscapes --manual_dir=RAW --data_dir=~/tensorflow_datasets
  python scripts/prepare_data.py --dataset=synthetic --manual_dir=data/synthetic_raw --data_dir=data/tfds

(~/tensorflow_datasets and data/tfds are the experiments' data.data_dir) each
writes DATA_DIR/DATASET/VERSION (labels in model space; images in their
original encoding, except Cityscapes' training images, stored as lossless
PNG strips in cityscapes/2.0.0), atomically: on any error nothing is left
behind and an existing prepared dataset is untouched. The layouts each dataset expects are
in the docstrings of fcn_tf/data/{voc,ade20k,cityscapes,synthetic}.py.
"""

import sys

from fcn_tf.startup import start

start()  # before TensorFlow is imported; quiet unless --verbosity=1

from absl import app, flags

from fcn_tf.data import sources
from fcn_tf.data.raw_examples import BadExampleError, DatasetLayoutError
from fcn_tf.data.tfds_builder import CountMismatchError

_DATASET = flags.DEFINE_enum("dataset", None, list(sources.BUILDERS), "Dataset to prepare.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Raw files in the dataset's official layout.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "TFDS data directory to write into: the experiment's data.data_dir (or train.py --data_dir).",
)
_SKIP_BAD = flags.DEFINE_bool("skip_bad_examples", False, "Skip and count bad examples instead of stopping.")
_ALLOW_COUNT_MISMATCH = flags.DEFINE_bool(
    "allow_count_mismatch", False, "Accept split sizes that differ from the real dataset's (subsets)."
)
flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])


def main(argv):
    del argv
    try:
        result = sources.prepare(
            _DATASET.value,
            _MANUAL_DIR.value,
            _DATA_DIR.value,
            skip_bad_examples=_SKIP_BAD.value,
            allow_count_mismatch=_ALLOW_COUNT_MISMATCH.value,
        )
    except BadExampleError as e:
        sys.exit(f"error: bad example {e} (nothing was written; --skip_bad_examples skips and counts them)")
    except (DatasetLayoutError, CountMismatchError, OSError) as e:
        sys.exit(f"error: {e} (nothing was written)")
    counts = ", ".join(f"{split}: {n:,}" for split, n in result.num_examples.items())
    print(f"Prepared {_DATASET.value} in {result.path} ({counts})")
    if result.skipped:
        print(f"Skipped {len(result.skipped)} bad example(s):")
        for error in result.skipped:
            print(f"  {error}")


if __name__ == "__main__":
    app.run(main)
