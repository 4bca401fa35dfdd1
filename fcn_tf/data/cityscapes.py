"""Cityscapes fine annotations (19 train ids) as a TFDS builder ("cityscapes").

Manual directory, extracted folders or the official zips (read in place):

  RAW/leftImg8bit/{train,val}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
  RAW/gtFine/{train,val}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png
or
  RAW/leftImg8bit_trainvaltest.zip   (members leftImg8bit/...)
  RAW/gtFine_trainvaltest.zip        (members gtFine/...)

Splits: "train" (2,975), "validation" = val (500). Labels: the official
label id -> train id table below (cityscapesscripts' labels.py); every
label id that is not one of the 19 train ids -> 255. The license plate has
id -1, which an 8-bit labelIds PNG can only hold as 255, so raw 255 -> 255.
Raw values 34..254 are not label ids: bad input.

Images (version 2.0.0): the training images are stored as horizontal PNG
strips of `strips.DEFAULT_STRIP_HEIGHT` rows ("image_strips",
"strip_height"; the same pixels, re-encoded losslessly), so the training
pipeline decodes only the rows a crop reads; the validation images keep
their original PNG bytes as a single strip. Version 1.0.0 stored every
image whole as "image"; prepare again to read a 1.0.0 dataset.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import tensorflow_datasets as tfds

from fcn_tf.data import classes, raw_examples, strips
from fcn_tf.data.raw_examples import BadExampleError, RawExample
from fcn_tf.data.tfds_builder import SegmentationBuilder, SplitListing

NUM_CLASSES = classes.num_classes("cityscapes")

# (name, label id, train id) of every Cityscapes label (kept with the other metadata).
LABELS = classes.CITYSCAPES_LABELS

# -1 (license plate) is stored as 255 in an 8-bit PNG.
LABEL_TABLE = raw_examples.lookup_table({label_id % 256: train_id for _, label_id, train_id in LABELS})

LAYOUT = (
    "RAW/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and RAW/gtFine/{train,val}/CITY/*_gtFine_labelIds.png, "
    "or RAW/leftImg8bit_trainvaltest.zip and RAW/gtFine_trainvaltest.zip"
)
_FOLDERS = {"train": "train", "validation": "val"}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


class _Folder:
    """Files below a directory, named by their relative path with '/'."""

    def __init__(self, root: Path):
        self.root = root

    def names(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def display(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str) -> bytes:
        return raw_examples.read_bytes(self.display(name))


class _Zip:
    """Members of a zip archive, read without extracting it."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.archive = zipfile.ZipFile(path)
            self.members = set(self.archive.namelist())
        except (zipfile.BadZipFile, OSError) as e:
            raise raw_examples.DatasetLayoutError(f"{path}: cannot open zip ({e})") from None

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.members if n.startswith(prefix + "/") and not n.endswith("/"))

    def display(self, name: str) -> str:
        return f"{self.path}:{name}"

    def read(self, name: str) -> bytes:
        if name not in self.members:
            raise BadExampleError(self.display(name), "file is missing from the archive")
        try:
            return self.archive.read(name)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise BadExampleError(self.display(name), f"cannot read archive member ({e})") from None


def _open(manual_dir: Path, folder: str, archive: str):
    if (manual_dir / folder).is_dir():
        return _Folder(manual_dir)
    if (manual_dir / archive).is_file():
        return _Zip(manual_dir / archive)
    raise raw_examples.DatasetLayoutError(
        f"neither {manual_dir / folder}/ nor {manual_dir / archive} found; expected {LAYOUT}"
    )


def cityscapes_split(images, labels, folder: str) -> SplitListing:
    """The examples of one split folder ("train" or "val").

    Args:
      images: a _Folder or _Zip holding leftImg8bit/.
      labels: a _Folder or _Zip holding gtFine/.
      folder: "train" or "val".
    """
    prefix = f"leftImg8bit/{folder}"
    examples = []
    for name in images.names(prefix):
        if not name.endswith(_IMAGE_SUFFIX):
            continue
        base = name[len(prefix) + 1 : -len(_IMAGE_SUFFIX)]  # CITY/CITY_SEQ_FRAME
        label = f"gtFine/{folder}/{base}{_LABEL_SUFFIX}"
        examples.append(
            RawExample(
                image_id=base.split("/")[-1],
                image_path=images.display(name),
                label_path=labels.display(label),
                read_image=lambda n=name: images.read(n),
                read_label=lambda n=label: raw_examples.decode_label_png(labels.read(n), labels.display(n)),
            )
        )
    return SplitListing(images.display(f"{prefix}/*/*{_IMAGE_SUFFIX}"), examples)


class Cityscapes(SegmentationBuilder):
    """Cityscapes gtFine with train ids; see the module docstring."""

    name = "cityscapes"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Labels in model space (0..C-1, ignore 255); original image bytes.",
        "2.0.0": "Training images as horizontal PNG strips (image_strips, strip_height), decoded only "
        "where a crop reads; validation images as one strip of their original bytes.",
    }
    STRIP_HEIGHT = strips.DEFAULT_STRIP_HEIGHT
    NUM_CLASSES = NUM_CLASSES
    LABEL_TABLE = LABEL_TABLE
    IMAGE_FORMAT = "png"
    EXPECTED_COUNTS = classes.SPLIT_SIZES["cityscapes"]
    DESCRIPTION = "Cityscapes fine annotations: train (2,975), val (500), 19 train ids."
    HOMEPAGE = "https://www.cityscapes-dataset.com/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put leftImg8bit and gtFine (folders or the official zips) in the manual directory: {LAYOUT}."
    )

    def _list_splits(self, manual_dir: Path) -> dict[str, SplitListing]:
        images = _open(manual_dir, "leftImg8bit", "leftImg8bit_trainvaltest.zip")
        labels = _open(manual_dir, "gtFine", "gtFine_trainvaltest.zip")
        return {split: cityscapes_split(images, labels, folder) for split, folder in _FOLDERS.items()}
