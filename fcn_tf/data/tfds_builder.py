"""The TFDS builder shared by every dataset (run by `sources.prepare`): features, counts, bad examples.

A dataset module subclasses `SegmentationBuilder` and says only what is
particular to it: where the files are (`_list_splits`), how raw label
values map to model classes (`LABEL_TABLE`), the image encoding and the
expected example counts. Every builder stores the same features:

  image:    the original JPEG/PNG bytes, decoded as uint8 (H, W, 3)
            (or, with STRIP_HEIGHT, "image_strips" + "strip_height": the
            image as horizontal PNG strips, see `fcn_tf.data.strips`)
  label:    PNG, uint8 (H, W, 1), model space (0..C-1, ignore 255)
  image_id: the dataset's own id (e.g. "2007_000032")

in the splits "train" and "validation", in sorted id order; `sources.prepare`
adds the byte offset of every record (`fcn_tf.data.records`) for the
training order's random access. `fcn_tf.data.sources` reads the image and
label back still encoded, as the one source contract (`fcn_tf.data.encoded`). The builders are not registered in
TFDS's global registry (TFDS ships unrelated builders named "cityscapes"
and "voc"); read them through `fcn_tf.data.sources` or
`tfds.builder_from_directory(DATA_DIR/NAME/VERSION)`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from fcn_tf.data import raw_examples
from fcn_tf.data.raw_examples import BadExampleError, RawExample


class CountMismatchError(ValueError):
    """A split does not hold the number of examples of the real dataset."""


@dataclasses.dataclass(frozen=True)
class SplitListing:
    """The examples of one split and where their list came from (for errors)."""

    source: str
    examples: list[RawExample]


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the segmentation builders; see the module docstring.

    Subclasses set `name` and these class attributes:
      NUM_CLASSES: classes in model space.
      LABEL_TABLE: int16 (256,) raw value -> model class (`raw_examples.lookup_table`).
      IMAGE_FORMAT: "jpeg" or "png", the images' original encoding.
      EXPECTED_COUNTS: split -> examples of the real dataset, or None.
      DESCRIPTION, HOMEPAGE: shown in the DatasetInfo.
      STRIP_HEIGHT: None (images stored whole as "image"), or the rows per
        PNG strip of the STRIP_SPLITS' images, stored as "image_strips" and
        "strip_height" (`fcn_tf.data.strips`); the other splits then hold
        their original image bytes as a single strip.
      STRIP_SPLITS: the splits stored in strips (training reads crops).
    and implement `_list_splits(manual_dir) -> {split: SplitListing}`.
    """

    # TFDS looks for checksums.tsv beside the builder's code through
    # importlib_resources, which is not installed; these builders download
    # nothing, so there is no checksum file to find.
    code_path = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Labels in model space (0..C-1, ignore 255); original image bytes."}
    NUM_CLASSES: int = 0
    LABEL_TABLE: np.ndarray = np.zeros(0)
    IMAGE_FORMAT = "jpeg"
    EXPECTED_COUNTS: dict[str, int] | None = None
    DESCRIPTION = ""
    HOMEPAGE = ""
    STRIP_HEIGHT: int | None = None
    STRIP_SPLITS: tuple[str, ...] = ("train",)

    def __init__(self, *, skip_bad_examples: bool = False, allow_count_mismatch: bool = False, **kwargs):
        """Creates the builder.

        Args:
          skip_bad_examples: skip (and record in `self.skipped`) examples that
            fail the checks instead of stopping at the first one.
          allow_count_mismatch: accept splits whose size differs from
            `EXPECTED_COUNTS` (subsets, test fixtures).
          **kwargs: passed to tfds.core.GeneratorBasedBuilder (data_dir, ...).
        """
        self.skip_bad_examples = skip_bad_examples
        self.allow_count_mismatch = allow_count_mismatch
        self.skipped: list[BadExampleError] = []
        super().__init__(**kwargs)

    # TFDS prints "Downloading and preparing dataset Unknown size (download: ...)"
    # and "downloaded and prepared to <temporary folder>": nothing is downloaded
    # here, and `sources.prepare` says what it prepares and where it ends up.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self) instead of dataset_info_from_configs: the
        # latter expects TFDS's package layout (README.md, CITATIONS.bib).
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    **self._image_features(),
                    "label": tfds.features.Image(
                        shape=(None, None, 1), dtype=np.uint8, encoding_format="png"
                    ),
                    "image_id": tfds.features.Text(),
                }
            ),
            supervised_keys=None if self.STRIP_HEIGHT else ("image", "label"),
            homepage=self.HOMEPAGE,
            # Keep the listed (sorted) order: evaluation and debugging see
            # the ids in a predictable order; training draws its own order
            # by random access (`fcn_tf.data.order`), whatever is stored.
            disable_shuffling=True,
        )

    def _image_features(self) -> dict:
        if self.STRIP_HEIGHT:
            return {
                "image_strips": tfds.features.Tensor(shape=(None,), dtype=np.object_),
                "strip_height": tfds.features.Tensor(shape=(), dtype=np.int32),
            }
        return {"image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_FORMAT)}

    def _list_splits(self, manual_dir: Path) -> dict[str, SplitListing]:
        raise NotImplementedError

    def list_splits(self, manual_dir: str | Path) -> dict[str, SplitListing]:
        """Lists and checks the splits under `manual_dir` without decoding anything.

        Raises:
          raw_examples.DatasetLayoutError: missing split list or empty split.
          CountMismatchError: a split's size differs from EXPECTED_COUNTS
            (unless `allow_count_mismatch`).
        """
        splits = self._list_splits(Path(manual_dir))
        for name, listing in splits.items():
            if not listing.examples:
                raise raw_examples.DatasetLayoutError(f"{listing.source}: split {name!r} is empty")
        if self.EXPECTED_COUNTS and not self.allow_count_mismatch:
            wrong = [
                f"{name!r} has {len(splits[name].examples):,} examples ({splits[name].source}), "
                f"expected {expected:,}"
                for name, expected in self.EXPECTED_COUNTS.items()
                if len(splits[name].examples) != expected
            ]
            if wrong:
                raise CountMismatchError(
                    f"{self.name}: " + "; ".join(wrong) + ". The real dataset has these counts: check the "
                    "manual_dir layout, or pass --allow_count_mismatch to prepare a subset on purpose."
                )
        return splits

    def finish(self, path: str) -> None:
        """Writes what the dataset keeps beside its TFDS files (nothing here), before it is moved into place.

        Args:
          path: the built dataset's folder (DATA_DIR/NAME/VERSION, still temporary).
        """

    def _split_generators(self, dl_manager):
        splits = self.list_splits(dl_manager.manual_dir)
        return {name: self._generate_examples(name, listing) for name, listing in splits.items()}

    def _generate_examples(self, split: str, listing: SplitListing):
        skipped_before = len(self.skipped)
        written = 0
        strip_height = None
        if self.STRIP_HEIGHT:
            strip_height = self.STRIP_HEIGHT if split in self.STRIP_SPLITS else 0
        for raw in listing.examples:
            try:
                example = raw_examples.make_example(raw, self.LABEL_TABLE, self.NUM_CLASSES, strip_height)
            except BadExampleError as e:
                if not self.skip_bad_examples:
                    raise
                self.skipped.append(e)
                continue
            written += 1
            yield raw.image_id, example
        if not written:
            skipped = self.skipped[skipped_before:]
            raise raw_examples.DatasetLayoutError(
                f"{listing.source}: split {split!r} left empty after skipping {len(skipped)} bad example(s): "
                + "; ".join(str(e) for e in skipped[:3])
            )


def read_split_file(path: Path) -> list[str]:
    """Ids listed one per line in a split file (blank lines ignored).

    Raises:
      raw_examples.DatasetLayoutError: the file is missing or lists nothing.
    """
    if not path.is_file():
        raise raw_examples.DatasetLayoutError(f"{path}: split list is missing")
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise raw_examples.DatasetLayoutError(f"{path}: split list is empty")
    return ids


def first_existing(candidates: list[Path], what: str, hint: str) -> Path:
    """The first directory of `candidates` that exists, else a layout error.

    Args:
      candidates: directories to try, in order.
      what: what is looked for, for the message.
      hint: the expected layout, for the message.
    """
    for c in candidates:
        if c.is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise raw_examples.DatasetLayoutError(f"{what} not found (tried {tried}). Expected layout: {hint}")
