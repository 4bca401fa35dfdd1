"""Regenerates the tiny dataset fixtures in their official on-disk layouts.

  python tests/testdata/make_fixtures.py

Writes (deterministically, a few KB each) under tests/testdata/:

  voc/         VOCdevkit/VOC2012 (palette PNG labels) + SBD benchmark_RELEASE (cls/*.mat)
  voc_merged/  VOCdevkit/VOC2012 with SegmentationClassAug/ (grayscale PNGs) + trainaug.txt
  ade20k/      ADEChallengeData2016/{images,annotations}/{training,validation}
  cityscapes/  leftImg8bit/ and gtFine/ folders (tests zip them for the zip variant)

The tests import this module for the ids and the raw label content
(`raw_label`), so the expected values follow from the definitions here and
the rules of each dataset, not from the code under test.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import scipy.io

HERE = Path(__file__).resolve().parent
HEIGHT, WIDTH = 24, 32

# VOC + SBD ids chosen to exercise the trainaug rule: "b" is in VOC train and
# SBD train (one copy), "c" is VOC val and SBD train (excluded from train),
# "f" is in SBD train and SBD val (one copy), "g" has no VOC JPEG (read from
# SBD's img/).
VOC_TRAIN = ["2008_000002", "2008_000001"]  # unsorted on purpose
VOC_VAL = ["2008_000003", "2008_000004"]
SBD_TRAIN = ["2008_000002", "2008_000003", "2008_000005", "2008_000006"]
SBD_VAL = ["2008_000006", "2008_000007"]
SBD_ONLY_IMAGE = "2008_000007"
TRAINAUG = ["2008_000001", "2008_000002", "2008_000005", "2008_000006", "2008_000007"]

ADE_TRAIN = ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"]
ADE_VAL = ["ADE_val_00000001", "ADE_val_00000002"]

# (split folder, city, frame base) of the Cityscapes fixture.
CITYSCAPES = {
    "train": [("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"), ("bochum", "bochum_000000_000313")],
    "val": [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")],
}  # fmt: skip
CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH = 16, 32
# Every raw value a Cityscapes labelIds PNG may hold: ids 0..33 and 255 (-1).
CITYSCAPES_RAW_VALUES = list(range(34)) + [255]


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def image(key: str, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A smooth random RGB image (compresses to a few hundred bytes)."""
    rng = _rng("image/" + key)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 200, 3)
    ramp = yy[..., None] * rng.uniform(-3, 3, 3) + xx[..., None] * rng.uniform(-3, 3, 3)
    return np.clip(base + ramp, 0, 255).astype(np.uint8)


def raw_label(dataset: str, key: str) -> np.ndarray:
    """The raw label values stored in the fixture file of `key`.

    Args:
      dataset: "voc" (0..20 + 255 band), "sbd" (0..20), "ade20k" (0..150)
        or "cityscapes" (every id of CITYSCAPES_RAW_VALUES, tiled).
      key: the example id.
    """
    if dataset == "cityscapes":
        values = np.array(CITYSCAPES_RAW_VALUES, np.uint8)
        rolled = np.roll(values, _rng("cs/" + key).integers(len(values)))
        return np.resize(rolled, (CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH))
    rng = _rng(f"{dataset}/{key}")
    top = {"voc": 20, "sbd": 20, "ade20k": 150}[dataset]
    # Blocks of random classes, always including the extremes 0 and top.
    blocks = rng.integers(0, top + 1, (3, 4))
    blocks[0, 0], blocks[-1, -1] = 0, top
    label = np.kron(blocks, np.ones((HEIGHT // 3, WIDTH // 4), np.int64)).astype(np.uint8)
    if dataset == "voc":
        label[HEIGHT // 3, :] = 255  # VOC's boundary band
    return label


def _jpeg(array: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_jpeg(array, quality=90).numpy()


def _png(array: np.ndarray) -> bytes:
    import tensorflow as tf

    return tf.io.encode_png(array if array.ndim == 3 else array[..., None]).numpy()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def _lines(ids: list[str]) -> str:
    return "\n".join(ids) + "\n"


def write_sbd_mat(path: Path, label: np.ndarray) -> None:
    """Writes an SBD cls/*.mat file: struct GTcls {Boundaries, Segmentation, CategoriesPresent}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    present = np.unique(label[(label > 0) & (label < 255)]).astype(np.uint8)
    gtcls = {
        "Boundaries": np.empty((len(present), 1), dtype=object),
        "Segmentation": label.astype(np.uint8),
        "CategoriesPresent": present.reshape(-1, 1),
    }
    for i in range(len(present)):
        gtcls["Boundaries"][i, 0] = np.zeros((1, 1), np.uint8)
    scipy.io.savemat(str(path), {"GTcls": gtcls}, do_compression=True)
    # The 116-byte MAT 5 header text holds a creation time; fix it so the
    # fixtures regenerate byte for byte.
    data = path.read_bytes()
    path.write_bytes(
        b"MATLAB 5.0 MAT-file, written by tests/testdata/make_fixtures.py".ljust(116) + data[116:]
    )


def make_voc(root: Path) -> None:
    from fcn_tf.data import classes, png

    voc = root / "VOCdevkit" / "VOC2012"
    colours = classes.voc_colormap(256)
    for image_id in sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL)):
        target = root / "benchmark_RELEASE/dataset/img" if image_id == SBD_ONLY_IMAGE else voc / "JPEGImages"
        _write(target / f"{image_id}.jpg", _jpeg(image(image_id)))
    for image_id in VOC_TRAIN + VOC_VAL:
        _write(
            voc / "SegmentationClass" / f"{image_id}.png",
            png.encode_palette_png(raw_label("voc", image_id), colours),
        )
    _write(voc / "ImageSets/Segmentation/train.txt", _lines(VOC_TRAIN))
    _write(voc / "ImageSets/Segmentation/val.txt", _lines(VOC_VAL))
    sbd = root / "benchmark_RELEASE" / "dataset"
    for image_id in sorted(set(SBD_TRAIN + SBD_VAL)):
        write_sbd_mat(sbd / "cls" / f"{image_id}.mat", raw_label("sbd", image_id))
    _write(sbd / "train.txt", _lines(SBD_TRAIN))
    _write(sbd / "val.txt", _lines(SBD_VAL))


def make_voc_merged(root: Path) -> None:
    from fcn_tf.data import classes, png

    voc = root / "VOCdevkit" / "VOC2012"
    colours = classes.voc_colormap(256)
    for image_id in TRAINAUG + VOC_VAL:
        _write(voc / "JPEGImages" / f"{image_id}.jpg", _jpeg(image(image_id)))
    for image_id in TRAINAUG:
        # The merged set stores indices as grayscale PNGs.
        _write(voc / "SegmentationClassAug" / f"{image_id}.png", _png(raw_label("voc", image_id)))
    for image_id in VOC_VAL:
        _write(
            voc / "SegmentationClass" / f"{image_id}.png",
            png.encode_palette_png(raw_label("voc", image_id), colours),
        )
    _write(voc / "ImageSets/Segmentation/trainaug.txt", _lines(TRAINAUG))
    _write(voc / "ImageSets/Segmentation/val.txt", _lines(VOC_VAL))


def make_ade20k(root: Path) -> None:
    ade = root / "ADEChallengeData2016"
    for folder, ids in (("training", ADE_TRAIN), ("validation", ADE_VAL)):
        for image_id in ids:
            _write(ade / "images" / folder / f"{image_id}.jpg", _jpeg(image(image_id)))
            _write(ade / "annotations" / folder / f"{image_id}.png", _png(raw_label("ade20k", image_id)))


def make_cityscapes(root: Path) -> None:
    for folder, frames in CITYSCAPES.items():
        for city, base in frames:
            rgb = image(base, CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH)
            _write(root / "leftImg8bit" / folder / city / f"{base}_leftImg8bit.png", _png(rgb))
            _write(
                root / "gtFine" / folder / city / f"{base}_gtFine_labelIds.png",
                _png(raw_label("cityscapes", base)),
            )
            # The real folders also hold other annotation files; they must be ignored.
            _write(root / "gtFine" / folder / city / f"{base}_gtFine_polygons.json", "{}\n")


MAKERS = {
    "voc": make_voc,
    "voc_merged": make_voc_merged,
    "ade20k": make_ade20k,
    "cityscapes": make_cityscapes,
}


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    for name, make in MAKERS.items():
        target = HERE / name
        shutil.rmtree(target, ignore_errors=True)
        make(target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"{target}: {size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
