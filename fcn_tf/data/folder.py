"""A user's own images and masks (the "folder" dataset) as a TFDS builder.

Manual directory (`scripts/prepare_data.py --dataset=folder --manual_dir=ROOT --name=NAME`):

  ROOT/images/<split>/<id>.<jpg|jpeg|png|bmp|webp>
  ROOT/annotations/<split>/<id>.png
  ROOT/classes.txt        one class per line, "name" or "name R G B" (`fcn_tf.data.folder_info`)

Splits: every folder under ROOT/images (at least "train" and "val"),
stored under their folder names. Annotations are single-channel (or
palette) PNGs of class indices, 255 = ignore, or, when classes.txt gives
colours, RGB PNGs in those colours ("ignore R G B" lines declare colours
that are ignored). Bad input stops preparation with one line naming the
file (or is skipped and counted with --skip_bad_examples): an image
without an annotation or an annotation without an image, a size mismatch,
a class index >= the number of classes, a colour not in classes.txt (with
its pixel count), an unreadable image. JPEG and PNG images keep their bytes;
BMP and WebP are stored as lossless PNG.

The prepared dataset is DATA_DIR/NAME/1.0.0, with its class info
(`folder_info.CLASS_INFO`: names, palette, pixels per class and split).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import numpy as np
import tensorflow as tf

from fcn_tf.data import classes, folder_info, raw_examples
from fcn_tf.data.raw_examples import BadExampleError, RawExample
from fcn_tf.data.tfds_builder import SegmentationBuilder, SplitListing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LAYOUT = (
    "ROOT/images/<split>/<id>.<jpg|jpeg|png|bmp|webp>, ROOT/annotations/<split>/<id>.png, ROOT/classes.txt"
)
REQUIRED_SPLITS = ("train", "val")


def _raise(path: str, problem: str):
    raise BadExampleError(path, problem)


def read_image(path: str) -> bytes:
    """The image's bytes: JPEG and PNG as they are, other formats (BMP, WebP) re-encoded as PNG."""
    data = raw_examples.read_bytes(path)
    if data.startswith(b"\xff\xd8") or data.startswith(b"\x89PNG"):
        return data
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
        raise BadExampleError(path, "image is not a readable JPEG, PNG, BMP or WebP file") from None
    return tf.io.encode_png(image).numpy()


def read_label(path: str, class_list: folder_info.ClassList) -> np.ndarray:
    """The annotation at `path` as class indices uint8 (H, W), 255 = ignore.

    Raises:
      BadExampleError: an unreadable PNG, a class index >= the number of
        classes, or (coloured annotations) a colour not in classes.txt.
    """
    data = raw_examples.read_bytes(path)
    count = len(class_list.names)
    if not class_list.colours:
        label = raw_examples.decode_label_png(data, path)
        bad = (label >= count) & (label != raw_examples.IGNORE_LABEL)
        if bad.any():
            values = np.unique(label[bad])
            raise BadExampleError(
                path,
                f"class index {', '.join(str(v) for v in values[:10])} >= the {count} classes of "
                f"{folder_info.CLASSES_FILE} ({int(bad.sum())} pixels; 255 is ignore)",
            )
        return label
    try:
        rgb = tf.io.decode_png(data, channels=3).numpy().astype(np.int32)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
        raise BadExampleError(path, "annotation is not a readable PNG") from None
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(class_list.colours)}
    table.update({(r << 16) | (g << 8) | b: raw_examples.IGNORE_LABEL for r, g, b in class_list.ignore_colours})
    unique, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    unknown = [(int(c), int(n)) for c, n in zip(unique, counts) if int(c) not in table]
    if unknown:
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) on {n} pixels" for c, n in unknown[:5])
        raise BadExampleError(
            path, f"colour {shown} not in {folder_info.CLASSES_FILE} (declare it with 'ignore R G B' to ignore it)"
        )
    mapped = np.array([table[int(c)] for c in unique], np.uint8)
    return mapped[inverse.reshape(codes.shape)]


def _files(directory: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix.lower() in extensions:
                found.setdefault(path.stem, []).append(path)
    return found


def folder_split(root: Path, split: str, class_list: folder_info.ClassList) -> SplitListing:
    """The examples of ROOT/images/<split> and ROOT/annotations/<split>, paired by id.

    An unpaired file, or two images of one id, becomes an example whose
    reading raises the BadExampleError naming it (stopped or skipped as any
    bad example).
    """
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    images, labels = _files(image_dir, IMAGE_EXTENSIONS), _files(label_dir, (".png",))
    examples = []
    for image_id in sorted(set(images) | set(labels)):
        image_paths = images.get(image_id, [])
        label_path = str(labels[image_id][0]) if image_id in labels else str(label_dir / f"{image_id}.png")
        if not image_paths:
            read_image_fn = lambda p=label_path: _raise(p, f"annotation has no image in {image_dir}")  # noqa: E731
            image_path = str(image_dir / image_id)
        elif len(image_paths) > 1:
            image_path = str(image_paths[0])
            names = ", ".join(p.name for p in image_paths)
            read_image_fn = lambda p=image_path, n=names: _raise(p, f"id has several images: {n}")  # noqa: E731
        else:
            image_path = str(image_paths[0])
            read_image_fn = lambda p=image_path: read_image(p)  # noqa: E731
        if image_id in labels:
            read_label_fn = lambda p=label_path: read_label(p, class_list)  # noqa: E731
        else:
            read_label_fn = lambda p=image_path: _raise(p, f"image has no annotation {label_path}")  # noqa: E731
        examples.append(RawExample(image_id, image_path, label_path, read_image_fn, read_label_fn))
    return SplitListing(str(image_dir), examples)


class FolderBuilder(SegmentationBuilder):
    """A folder dataset; `builder_class(name)` gives the builder of the dataset NAME."""

    name = "folder"
    IMAGE_FORMAT = "png"
    EXPECTED_COUNTS = None
    DESCRIPTION = "A user's own images and annotations (fcn_tf folder dataset)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the images, annotations and classes.txt in this layout: {LAYOUT}"

    def __init__(self, **kwargs):
        self.class_list: folder_info.ClassList | None = None
        self.pixel_counts: dict[str, np.ndarray] = {}
        super().__init__(**kwargs)

    def _list_splits(self, manual_dir: Path) -> dict[str, SplitListing]:
        classes_path = manual_dir / folder_info.CLASSES_FILE
        if not classes_path.is_file():
            raise raw_examples.DatasetLayoutError(f"{classes_path} is missing. Expected layout: {LAYOUT}")
        try:
            self.class_list = folder_info.parse_classes(classes_path.read_text(), str(classes_path))
        except folder_info.ClassFileError as e:
            raise raw_examples.DatasetLayoutError(str(e)) from None
        self.NUM_CLASSES = len(self.class_list.names)
        self.LABEL_TABLE = raw_examples.lookup_table(
            {**{k: k for k in range(self.NUM_CLASSES)}, raw_examples.IGNORE_LABEL: raw_examples.IGNORE_LABEL}
        )
        image_root = manual_dir / "images"
        splits = sorted(p.name for p in image_root.iterdir() if p.is_dir()) if image_root.is_dir() else []
        missing = [s for s in REQUIRED_SPLITS if s not in splits]
        if missing:
            raise raw_examples.DatasetLayoutError(
                f"{image_root}: no split folder {', '.join(missing)}. Expected layout: {LAYOUT}"
            )
        for split in splits:
            if not folder_info.NAME_PATTERN.match(split):
                raise raw_examples.DatasetLayoutError(
                    f"{image_root / split}: split folder names must be lower case letters, digits and _"
                )
        return {split: folder_split(manual_dir, split, self.class_list) for split in splits}

    def _generate_examples(self, split: str, listing: SplitListing):
        counts = self.pixel_counts.setdefault(split, np.zeros(self.NUM_CLASSES, np.int64))
        for key, example in super()._generate_examples(split, listing):
            label = example["label"].ravel()
            counts += np.bincount(label[label < self.NUM_CLASSES], minlength=self.NUM_CLASSES)
            yield key, example

    def finish(self, path: str) -> None:
        """Writes the class info beside the prepared files (`folder_info.CLASS_INFO`)."""
        names = list(self.class_list.names)
        if self.class_list.colours:
            palette = [list(c) for c in self.class_list.colours]
        else:
            palette = classes.voc_colormap(len(names)).tolist()
        info = {
            "class_names": names,
            "palette": palette,
            "coloured_annotations": bool(self.class_list.colours),
            "ignore_colours": [list(c) for c in self.class_list.ignore_colours],
            "pixels": {split: counts.tolist() for split, counts in self.pixel_counts.items()},
        }
        with tf.io.gfile.GFile(posixpath.join(path, folder_info.CLASS_INFO), "w") as f:
            json.dump(info, f, indent=2)


def builder_class(name: str) -> type[FolderBuilder]:
    """The builder of the folder dataset NAME (prepared in DATA_DIR/NAME/1.0.0).

    Raises:
      ValueError: NAME is not a valid dataset name.
    """
    folder_info.check_name(name)
    return type(f"Folder_{name}", (FolderBuilder,), {"name": name}, skip_registration=True)


def class_shares(info: dict, split: str) -> list[str]:
    """Lines of per-class pixel shares of `split`, and the classes that never occur.

    Args:
      info: the class info (`folder_info.read_class_info`).
      split: a split of the prepared dataset.
    """
    counts = np.asarray(info["pixels"][split], np.float64)
    total = counts.sum() or 1.0
    names = info["class_names"]
    lines = [f"  {i:3d} {name:<24s} {100 * n / total:6.2f}%" for i, (name, n) in enumerate(zip(names, counts))]
    never = [name for name, n in zip(names, counts) if n == 0]
    if never:
        lines.append(f"  never occur in {split}: {', '.join(never)}")
    return lines
