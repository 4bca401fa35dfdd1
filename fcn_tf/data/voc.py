"""PASCAL VOC 2012 + SBD "trainaug" (21 classes) as a TFDS builder ("voc_aug").

Manual directory (either train source):

  RAW/VOCdevkit/VOC2012/JPEGImages/ID.jpg
  RAW/VOCdevkit/VOC2012/SegmentationClass/ID.png        palette PNGs, 255 = boundary
  RAW/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
  RAW/benchmark_RELEASE/dataset/{img/ID.jpg, cls/ID.mat, train.txt, val.txt}   SBD
or, instead of SBD, an already merged set:
  RAW/VOCdevkit/VOC2012/SegmentationClassAug/ID.png     (or RAW/SegmentationClassAug/)
  RAW/VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt

Splits: "train" = trainaug = (VOC train | SBD train | SBD val) - VOC val, as
sets of ids, sorted (10,582 with the real data); "validation" = VOC val
(1,449). An id of VOC train takes its VOC label (finer, with the 255
boundary band); the other ids take SBD's `GTcls.Segmentation` (0..20, no
ignore band). Images come from VOC's JPEGImages (a superset of SBD's), or
SBD's img/ when VOC lacks one.

The synthetic dataset uses the same layout and reader (`voc_split`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import scipy.io

from fcn_tf.data import classes, raw_examples
from fcn_tf.data.raw_examples import BadExampleError, RawExample
from fcn_tf.data.tfds_builder import SegmentationBuilder, SplitListing, read_split_file

NUM_CLASSES = classes.num_classes("voc_aug")
# Raw VOC/SBD values are already model classes; 255 is VOC's boundary band.
LABEL_TABLE = raw_examples.lookup_table({**{k: k for k in range(NUM_CLASSES)}, 255: 255})

VOC_LAYOUT = "RAW/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}"
SBD_LAYOUT = "RAW/benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}"


def find_voc_root(manual_dir: Path) -> Path:
    """The VOC2012 folder under `manual_dir` (VOCdevkit/VOC2012, VOC2012 or itself)."""
    candidates = [manual_dir / "VOCdevkit" / "VOC2012", manual_dir / "VOC2012", manual_dir]
    for c in candidates:
        if (c / "ImageSets" / "Segmentation").is_dir():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise raw_examples.DatasetLayoutError(
        f"no VOC2012 folder with ImageSets/Segmentation (tried {tried}); expected {VOC_LAYOUT}"
    )


def read_sbd_mat(path: str) -> np.ndarray:
    """Reads SBD's class segmentation `GTcls.Segmentation` from a cls/*.mat file.

    Args:
      path: an SBD `cls/ID.mat` file.

    Returns:
      The raw label (H, W), values 0..20.

    Raises:
      BadExampleError: missing, unreadable or not SBD's struct format.
    """
    contents = raw_examples.read_bytes(path)  # through tf.io.gfile; missing -> BadExampleError
    try:
        mat = scipy.io.loadmat(io.BytesIO(contents), squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for corrupt files.
        raise BadExampleError(path, f"cannot read .mat file ({type(e).__name__}: {e})") from None
    gt = mat.get("GTcls")
    segmentation = getattr(gt, "Segmentation", None)
    if segmentation is None:
        raise BadExampleError(path, "no GTcls.Segmentation in the .mat file (not an SBD cls file?)")
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2 or not np.issubdtype(segmentation.dtype, np.integer):
        raise BadExampleError(
            path, f"GTcls.Segmentation is {segmentation.dtype} {segmentation.shape}, expected 2-D ints"
        )
    return segmentation


def raw_example(image_id: str, image: Path, label: Path) -> RawExample:
    """One example from a JPEG and a label file (a PNG, or an SBD `.mat`)."""

    def read_label():
        if label.suffix == ".mat":
            return read_sbd_mat(str(label))
        return raw_examples.decode_label_png(raw_examples.read_bytes(str(label)), str(label))

    return RawExample(
        image_id, str(image), str(label), lambda: raw_examples.read_bytes(str(image)), read_label
    )


def voc_split(voc_root: Path, ids: list[str], label_dir: Path | None = None) -> list[RawExample]:
    """The examples of `ids`: VOC2012's JPEGImages/ID.jpg and LABEL_DIR/ID.png.

    Args:
      voc_root: the VOC2012 folder.
      ids: image ids.
      label_dir: the folder of the PNG labels; default VOC2012/SegmentationClass.
    """
    label_dir = label_dir or voc_root / "SegmentationClass"
    return [raw_example(i, voc_root / "JPEGImages" / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]


def trainaug_ids(
    voc_train: list[str], sbd_train: list[str], sbd_val: list[str], voc_val: list[str]
) -> list[str]:
    """trainaug = (VOC train | SBD train | SBD val) - VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def _sbd_train(voc_root: Path, sbd_root: Path, voc_val: list[str]) -> SplitListing:
    seg_lists = voc_root / "ImageSets" / "Segmentation"
    voc_train = read_split_file(seg_lists / "train.txt")
    ids = trainaug_ids(
        voc_train, read_split_file(sbd_root / "train.txt"), read_split_file(sbd_root / "val.txt"), voc_val
    )
    voc_train = set(voc_train)
    examples = []
    for image_id in ids:
        image = voc_root / "JPEGImages" / f"{image_id}.jpg"
        if not image.exists() and (sbd_root / "img" / f"{image_id}.jpg").exists():
            image = sbd_root / "img" / f"{image_id}.jpg"
        if image_id in voc_train:
            label = voc_root / "SegmentationClass" / f"{image_id}.png"
        else:
            label = sbd_root / "cls" / f"{image_id}.mat"
        examples.append(raw_example(image_id, image, label))
    source = f"trainaug from {seg_lists / 'train.txt'}, {sbd_root / 'train.txt'}, {sbd_root / 'val.txt'}"
    return SplitListing(source, examples)


def _merged_train(voc_root: Path, aug_dir: Path, voc_val: list[str]) -> SplitListing:
    split_file = voc_root / "ImageSets" / "Segmentation" / "trainaug.txt"
    ids = read_split_file(split_file)
    leaked = sorted(set(ids) & set(voc_val))
    if leaked:
        raise raw_examples.DatasetLayoutError(
            f"{split_file}: lists {len(leaked)} validation ids (e.g. {leaked[0]}); trainaug must exclude VOC val"
        )
    examples = voc_split(voc_root, ids, label_dir=aug_dir)
    return SplitListing(str(split_file), examples)


class VocAug(SegmentationBuilder):
    """PASCAL VOC 2012 + SBD trainaug; see the module docstring."""

    name = "voc_aug"
    NUM_CLASSES = NUM_CLASSES
    LABEL_TABLE = LABEL_TABLE
    IMAGE_FORMAT = "jpeg"
    EXPECTED_COUNTS = classes.SPLIT_SIZES["voc_aug"]
    DESCRIPTION = "PASCAL VOC 2012 segmentation + SBD: trainaug (10,582) and val (1,449), 21 classes."
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Extract VOCtrainval_11-May-2012.tar ({VOC_LAYOUT}) and SBD's benchmark.tgz ({SBD_LAYOUT}) into "
        "the manual directory, or provide VOCdevkit/VOC2012/SegmentationClassAug/ with "
        "ImageSets/Segmentation/trainaug.txt instead of SBD."
    )

    def _list_splits(self, manual_dir: Path) -> dict[str, SplitListing]:
        voc_root = find_voc_root(manual_dir)
        val_file = voc_root / "ImageSets" / "Segmentation" / "val.txt"
        voc_val = read_split_file(val_file)
        sbd_candidates = [manual_dir / "benchmark_RELEASE" / "dataset", manual_dir / "benchmark_RELEASE"]
        aug_candidates = [voc_root / "SegmentationClassAug", manual_dir / "SegmentationClassAug"]
        sbd_root = next((c for c in sbd_candidates if (c / "cls").is_dir()), None)
        aug_dir = next((c for c in aug_candidates if c.is_dir()), None)
        if sbd_root is not None:
            train = _sbd_train(voc_root, sbd_root, voc_val)
        elif aug_dir is not None:
            train = _merged_train(voc_root, aug_dir, voc_val)
        else:
            raise raw_examples.DatasetLayoutError(
                f"no trainaug source under {manual_dir}: expected SBD ({SBD_LAYOUT}) or "
                "VOCdevkit/VOC2012/SegmentationClassAug/ with ImageSets/Segmentation/trainaug.txt"
            )
        return {"train": train, "validation": SplitListing(str(val_file), voc_split(voc_root, voc_val))}
