"""Where the raw examples come from: preparing and reading the TFDS datasets.

`prepare` builds one dataset from the files a user has on disk (the
"manual directory") into DATA_DIR/NAME/VERSION, with the byte offset of
every stored example (`fcn_tf.data.records`). A prepared split is read
with its image and label still encoded, as the one source contract
(`fcn_tf.data.encoded`): `encoded_split` in its stored (sorted) order,
`random_access_split` example `i` on demand for the training order;
`load_split` is `encoded_split` decoded, and `num_examples` counts.
DataConfig.dataset names the builder:

  voc_aug     fcn_tf.data.voc.VocAug            -> DATA_DIR/voc_aug/1.0.0
  ade20k      fcn_tf.data.ade20k.Ade20k         -> DATA_DIR/ade20k/1.0.0
  cityscapes  fcn_tf.data.cityscapes.Cityscapes -> DATA_DIR/cityscapes/2.0.0
  synthetic   fcn_tf.data.synthetic.Synthetic   -> DATA_DIR/synthetic/1.0.0
  folder      fcn_tf.data.folder.FolderBuilder  -> DATA_DIR/NAME/1.0.0 (DataConfig.name)

A dataset prepared by an older version of fcn_tf in another format (e.g.
cityscapes/1.0.0) is not read: `load_split` says to prepare it again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import tensorflow as tf
import tensorflow_datasets as tfds

from fcn_tf import storage
from fcn_tf.config import DataConfig
from fcn_tf.data import encoded, raw_examples, records
from fcn_tf.data.ade20k import Ade20k
from fcn_tf.data.cityscapes import Cityscapes
from fcn_tf.data.folder import FolderBuilder
from fcn_tf.data.folder import builder_class as folder_builder_class
from fcn_tf.data.raw_examples import BadExampleError
from fcn_tf.data.synthetic import Synthetic
from fcn_tf.data.tfds_builder import SegmentationBuilder
from fcn_tf.data.voc import VocAug

BUILDERS: dict[str, type[SegmentationBuilder]] = {
    "voc_aug": VocAug,
    "ade20k": Ade20k,
    "cityscapes": Cityscapes,
    "synthetic": Synthetic,
    "folder": FolderBuilder,
}


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset has not been prepared in the configured data_dir."""


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """What `prepare` wrote.

    Attributes:
      path: the dataset's folder (DATA_DIR/NAME/VERSION).
      num_examples: split -> examples written.
      skipped: the bad examples skipped (with `skip_bad_examples`).
    """

    path: Path
    num_examples: dict[str, int]
    skipped: list[BadExampleError]


def builder_class(dataset: str, name: str = "") -> type[SegmentationBuilder]:
    """The builder class of `dataset` (a DataConfig.dataset value; "folder" with the dataset's `name`)."""
    if dataset not in BUILDERS:
        raise KeyError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(BUILDERS)}")
    if dataset == "folder":
        return folder_builder_class(name)
    return BUILDERS[dataset]


def prepare_command(dataset: str, data_dir: str, name: str = "") -> str:
    """The command line that prepares `dataset` into `data_dir` (for messages)."""
    if dataset == "folder":
        return f"python scripts/prepare_data.py --dataset=folder --manual_dir=ROOT --name={name} --data_dir={data_dir}"
    if dataset == "synthetic":
        return (
            "python scripts/make_synthetic.py --output_dir=data/synthetic_raw && "
            f"python scripts/prepare_data.py --dataset=synthetic --manual_dir=data/synthetic_raw --data_dir={data_dir}"
        )
    return f"python scripts/prepare_data.py --dataset={dataset} --manual_dir=RAW --data_dir={data_dir}"


def prepare(
    dataset: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    skip_bad_examples: bool = False,
    allow_count_mismatch: bool = False,
    name: str = "",
) -> PrepareResult:
    """Builds `dataset` from `manual_dir` into `data_dir`, all or nothing.

    The dataset is built in a temporary folder inside `data_dir` and moved
    into place only once complete and checked, so a failure leaves no
    half-written dataset and an existing prepared one untouched; a success
    replaces an existing one.

    Args:
      dataset: one of `BUILDERS`.
      manual_dir: the raw files in the dataset's official layout.
      data_dir: the TFDS data directory (DataConfig.data_dir).
      skip_bad_examples: skip and count bad examples instead of stopping.
      allow_count_mismatch: accept split sizes that differ from the real
        dataset's (subsets, fixtures).
      name: the folder dataset's name (dataset "folder": DATA_DIR/NAME/VERSION).

    Returns:
      A PrepareResult.

    Raises:
      raw_examples.DatasetLayoutError: missing folders or split lists, or a split
        left empty (also after skipping bad examples).
      tfds_builder.CountMismatchError: split sizes differ from the real dataset.
      BadExampleError: a bad example (without `skip_bad_examples`).
    """
    cls = builder_class(dataset, name)
    manual_dir, data_dir = _local_folder(manual_dir, "raw data"), _local_folder(data_dir, "data_dir")
    if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
        raise raw_examples.DatasetLayoutError(
            f"{manual_dir}: manual directory is missing or empty. {cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    # A killed run cannot clean up after itself; say so rather than delete a
    # folder that a concurrent run may still be writing.
    for stale in sorted(data_dir.glob(f".prepare_{cls.name}_*")):
        logging.warning(
            "%s: temporary folder of an interrupted or concurrent prepare; delete it if unused", stale
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".prepare_{cls.name}_", dir=data_dir))
    logging.info("Preparing %s %s from the raw files in %s into %s", cls.name, cls.VERSION, manual_dir, data_dir)
    if not sys.stderr.isatty():
        # TFDS's progress bars redraw one line on a terminal; in a log each redraw is a line.
        tfds.disable_progress_bar()
    try:
        builder = cls(
            data_dir=str(tmp), skip_bad_examples=skip_bad_examples, allow_count_mismatch=allow_count_mismatch
        )
        builder.download_and_prepare(
            download_dir=str(tmp / "downloads"),
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        )
        counts = {name: split.num_examples for name, split in builder.info.splits.items()}
        built = Path(builder.data_path)
        shards = [f for split in builder.info.splits.values() for f in split.filenames]
        records.write_index(str(built), [str(built / f) for f in shards])
        builder.finish(str(built))
        final = data_dir / built.relative_to(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        previous = tmp / "previous"
        if final.exists():
            final.rename(previous)
        try:
            built.rename(final)
        except OSError:
            if previous.exists():
                previous.rename(final)
            raise
        return PrepareResult(path=final, num_examples=counts, skipped=list(builder.skipped))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_folder(path: str, what: str) -> Path:
    """Preparation works on local folders (TFDS builds and renames there): a URL is refused in one line."""
    local = storage.local_path(path)
    if local is None:
        raise raw_examples.DatasetLayoutError(
            f"{what} {path}: prepare_data.py works on local folders; prepare into a local --data_dir and copy "
            "the prepared folder to the bucket (e.g. gsutil -m cp -r), then train with --data_dir=URL"
        )
    return Path(local)


def _builder(data_config: DataConfig) -> SegmentationBuilder:
    # Training reads through TensorFlow's filesystem layer: data_dir may be a URL TFDS opens.
    data_dir = storage.tfds_path(data_config.data_dir)
    if data_dir is None:
        raise DatasetNotPreparedError(
            f"data.data_dir={data_config.data_dir}: TensorFlow Datasets reads datasets from local paths, "
            f"file:// and {', '.join(storage.TFDS_SCHEMES)} URLs only; copy the prepared folder to one of those"
        )
    builder = builder_class(data_config.dataset, data_config.name)(data_dir=data_dir)
    if not builder.is_prepared():
        command = prepare_command(data_config.dataset, data_config.data_dir, data_config.name)
        dataset_dir = os.path.dirname(str(builder.data_path).rstrip("/"))
        names = tf.io.gfile.listdir(dataset_dir) if tf.io.gfile.isdir(dataset_dir) else []
        older = sorted(
            name.rstrip("/")
            for name in names
            if name.rstrip("/") != str(builder.version)
            and tf.io.gfile.exists(os.path.join(dataset_dir, name.rstrip("/"), "dataset_info.json"))
        )
        if older:
            notes = builder.RELEASE_NOTES.get(str(builder.version), "").rstrip(".")
            raise DatasetNotPreparedError(
                f"dataset {data_config.dataset!r} in {dataset_dir} was prepared in format {', '.join(older)}; "
                f"this fcn_tf reads format {builder.version} ({notes}). Prepare it again: {command}"
            )
        raise DatasetNotPreparedError(
            f"dataset {data_config.dataset!r} is not prepared in {builder.data_path}; run: {command}"
        )
    return builder


def _decoders(features) -> dict:
    # The image and label stay encoded: the pipelines decode them (the
    # training crop only where it reads). The strips are a tf.string
    # tensor feature, left encoded anyway.
    return {name: tfds.decode.SkipDecoding() for name in ("image", "label") if name in features}


def _as_contract(stored: dict) -> dict:
    """A stored example, image and label still encoded, in the one source contract (`fcn_tf.data.encoded`)."""
    if "image_strips" in stored:
        return encoded.from_strips(
            stored["image_strips"], stored["strip_height"], stored["label"], stored["image_id"]
        )
    return encoded.from_files(stored["image"], stored["label"], stored["image_id"])


def encoded_split(data_config: DataConfig, split: str) -> tf.data.Dataset:
    """One pass over a split in stored (sorted id) order, image and label left encoded.

    Args:
      data_config: names the dataset and its data_dir.
      split: a TFDS split ("train", "validation", or a slice like "train[:10]").

    Returns:
      A tf.data.Dataset of encoded examples (`fcn_tf.data.encoded`).

    Raises:
      DatasetNotPreparedError: the message gives the prepare_data.py command.
    """
    builder = _builder(data_config)
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=_decoders(builder.info.features))
    return ds.map(_as_contract, num_parallel_calls=tf.data.AUTOTUNE)


def load_split(data_config: DataConfig, split: str) -> tf.data.Dataset:
    """One pass over a split in stored (sorted id) order, decoded (`encoded.decode`).

    Args:
      data_config: names the dataset and its data_dir.
      split: a TFDS split or slice.

    Returns:
      A tf.data.Dataset of {"image": uint8 (H, W, 3), "label": uint8 (H, W)
      in model space (0..C-1, ignore 255), "image_id": tf.string}; images
      stored in strips (Cityscapes) are reassembled exactly.

    Raises:
      DatasetNotPreparedError: the message gives the prepare_data.py command.
    """
    return encoded_split(data_config, split).map(encoded.decode, num_parallel_calls=tf.data.AUTOTUNE)


def num_examples(data_config: DataConfig, split: str) -> int:
    """Examples in a prepared split (a TFDS split name or slice).

    Args:
      data_config: names the dataset and its data_dir.
      split: e.g. "train", "validation", "train[:10]".
    """
    return _builder(data_config).info.splits[split].num_examples


def random_access_split(data_config: DataConfig, split: str) -> records.RandomAccessSplit:
    """Example `i` of a prepared split on demand (`fcn_tf.data.records`), still encoded.

    Args:
      data_config: names the dataset and its data_dir.
      split: a TFDS split or slice.

    Returns:
      A RandomAccessSplit of encoded examples (`fcn_tf.data.encoded`).

    Raises:
      DatasetNotPreparedError: the message gives the prepare_data.py command.
      records.CorruptShardError: the shards disagree with the dataset info.
    """
    builder = _builder(data_config)
    info = builder.info.splits[split]
    index = records.split_index(builder.data_path, info.file_instructions)
    features = builder.info.features
    decoders = _decoders(features)

    def read(i):
        return records.read_record(index, i).map(
            lambda serialized: _as_contract(features.deserialize_example(serialized, decoders=decoders))
        )

    return records.RandomAccessSplit(num_examples=len(index), read=read)
