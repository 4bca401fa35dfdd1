r"""Prepares a dataset as TFDS files from the raw files in their official layout.

  python scripts/prepare_data.py --dataset=voc_aug --manual_dir=RAW --data_dir=~/tensorflow_datasets
  python scripts/prepare_data.py --dataset=ade20k --manual_dir=RAW --data_dir=~/tensorflow_datasets
  python scripts/prepare_data.py --dataset=cityscapes --manual_dir=RAW --data_dir=~/tensorflow_datasets
  python scripts/prepare_data.py --dataset=synthetic --manual_dir=data/synthetic_raw --data_dir=data/tfds
  python scripts/prepare_data.py --dataset=folder --manual_dir=ROOT --name=NAME --data_dir=~/tensorflow_datasets

(~/tensorflow_datasets and data/tfds are the experiments' data.data_dir) each
writes DATA_DIR/DATASET/VERSION (labels in model space; images in their
original encoding, except Cityscapes' training images, stored as lossless
PNG strips in cityscapes/2.0.0), atomically: on any error nothing is left
behind and an existing prepared dataset is untouched. The layouts each dataset expects are
in the docstrings of fcn_tf/data/{voc,ade20k,cityscapes,synthetic,folder}.py. A folder dataset (your
own images, annotations and classes.txt, docs/custom_data.md) is written to DATA_DIR/NAME/1.0.0; the
per-class pixel shares of each split and the classes that never occur are printed after it.
"""

import sys

from fcn_tf.startup import start

start()  # before TensorFlow is imported; quiet unless --verbosity=1

from absl import app, flags

from fcn_tf.data import folder, folder_info, sources
from fcn_tf.data.raw_examples import BadExampleError, DatasetLayoutError
from fcn_tf.data.tfds_builder import CountMismatchError

_DATASET = flags.DEFINE_enum("dataset", None, list(sources.BUILDERS), "Dataset to prepare.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Raw files in the dataset's official layout.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "TFDS data directory to write into: the experiment's data.data_dir (or train.py --data_dir).",
)
_NAME = flags.DEFINE_string("name", None, "--dataset=folder: the dataset's name (DATA_DIR/NAME/1.0.0).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_examples", False, "Skip and count bad examples instead of stopping.")
_ALLOW_COUNT_MISMATCH = flags.DEFINE_bool(
    "allow_count_mismatch", False, "Accept split sizes that differ from the real dataset's (subsets)."
)
flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])


def main(argv):
    del argv
    if _DATASET.value == "folder":
        if not _NAME.value:
            sys.exit(
                "error: --dataset=folder needs --name=NAME (the prepared dataset is DATA_DIR/NAME/1.0.0)"
            )
        try:
            folder_info.check_name(_NAME.value)
        except ValueError as e:
            sys.exit(f"error: --name: {e}")
    elif _NAME.value:
        sys.exit("error: --name is for --dataset=folder only")
    try:
        result = sources.prepare(
            _DATASET.value,
            _MANUAL_DIR.value,
            _DATA_DIR.value,
            skip_bad_examples=_SKIP_BAD.value,
            allow_count_mismatch=_ALLOW_COUNT_MISMATCH.value,
            name=_NAME.value or "",
        )
    except BadExampleError as e:
        sys.exit(f"error: bad example {e} (nothing was written; --skip_bad_examples skips and counts them)")
    except (DatasetLayoutError, CountMismatchError, OSError) as e:
        sys.exit(f"error: {e} (nothing was written)")
    counts = ", ".join(f"{split}: {n:,}" for split, n in result.num_examples.items())
    print(f"Prepared {_NAME.value or _DATASET.value} in {result.path} ({counts})")
    if _DATASET.value == "folder":
        info = folder_info.read_class_info(_DATA_DIR.value, _NAME.value)
        for split in result.num_examples:
            print(f"Pixels per class in {split}:")
            print("\n".join(folder.class_shares(info, split)))
    if result.skipped:
        print(f"Skipped {len(result.skipped)} bad example(s):")
        for error in result.skipped:
            print(f"  {error}")


if __name__ == "__main__":
    app.run(main)
