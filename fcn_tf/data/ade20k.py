"""ADE20k (MIT Scene Parsing, ADEChallengeData2016; 150 classes) as a TFDS builder.

Manual directory:

  RAW/ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
  RAW/ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   0 = other, 1..150

Splits: "train" = training (20,210), "validation" = validation (2,000).
Labels: raw 0 ("other") -> 255 (ignored), k -> k-1, as the reference's
`reduce_zero_label`. Raw values above 150 are bad input.
"""

from __future__ import annotations

from pathlib import Path

from fcn_tf.data import classes, raw_examples
from fcn_tf.data.raw_examples import RawExample
from fcn_tf.data.tfds_builder import SegmentationBuilder, SplitListing, first_existing

NUM_CLASSES = classes.num_classes("ade20k")
LABEL_TABLE = raw_examples.lookup_table({0: 255, **{k: k - 1 for k in range(1, NUM_CLASSES + 1)}})

LAYOUT = "RAW/ADEChallengeData2016/{images,annotations}/{training,validation}"
_FOLDERS = {"train": "training", "validation": "validation"}


def ade_split(root: Path, folder: str) -> SplitListing:
    """The examples of one ADE20k folder ("training" or "validation").

    Every image needs an annotation of the same stem; a missing one is a bad
    example (reported when it is read).
    """
    image_dir = root / "images" / folder
    if not image_dir.is_dir():
        raise raw_examples.DatasetLayoutError(f"{image_dir}: image folder is missing; expected {LAYOUT}")
    examples = []
    for image in sorted(image_dir.glob("*.jpg")):
        label = root / "annotations" / folder / f"{image.stem}.png"
        examples.append(
            RawExample(
                image_id=image.stem,
                image_path=str(image),
                label_path=str(label),
                read_image=lambda p=str(image): raw_examples.read_bytes(p),
                read_label=lambda p=str(label): raw_examples.decode_label_png(raw_examples.read_bytes(p), p),
            )
        )
    return SplitListing(str(image_dir / "*.jpg"), examples)


class Ade20k(SegmentationBuilder):
    """ADE20k / ADEChallengeData2016; see the module docstring."""

    name = "ade20k"
    NUM_CLASSES = NUM_CLASSES
    LABEL_TABLE = LABEL_TABLE
    IMAGE_FORMAT = "jpeg"
    EXPECTED_COUNTS = classes.SPLIT_SIZES["ade20k"]
    DESCRIPTION = (
        "ADE20k scene parsing (ADEChallengeData2016): training (20,210), validation (2,000), 150 classes."
    )
    HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract ADEChallengeData2016.zip into the manual directory ({LAYOUT})."

    def _list_splits(self, manual_dir: Path) -> dict[str, SplitListing]:
        # Accept RAW/ADEChallengeData2016/images/... or RAW pointing at that folder.
        candidates = [manual_dir / "ADEChallengeData2016", manual_dir]
        root = first_existing(
            [c / "images" for c in candidates], "ADEChallengeData2016/images", LAYOUT
        ).parent
        return {split: ade_split(root, folder) for split, folder in _FOLDERS.items()}
