"""One raw example, from the user's files to the stored features: read, decode, map, check.

Every raw example goes through `make_example` when a dataset is prepared:
the image is fully decoded (a truncated JPEG or PNG fails here, not in the
middle of training), the raw label is decoded and mapped to model space
with a 256-entry lookup table, and the two sizes are compared. A problem
raises `BadExampleError` naming the file; the builder either stops on it
or, when asked, skips and counts the example.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from fcn_tf.data import png, strips

IGNORE_LABEL = 255
# Marks raw label values that a dataset does not define.
INVALID = -1


class BadExampleError(ValueError):
    """One example that cannot be prepared; `path` names the file at fault."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class DatasetLayoutError(ValueError):
    """The manual directory does not hold the expected files or split lists."""


@dataclasses.dataclass(frozen=True)
class RawExample:
    """Where one example's files are and how to read them.

    Attributes:
      image_id: the id stored with the example (e.g. "2007_000032").
      image_path: shown in errors (a path, or "archive.zip:member").
      label_path: shown in errors.
      read_image: returns the encoded image bytes (JPEG or PNG).
      read_label: returns the raw label as a 2-D integer array.
    """

    image_id: str
    image_path: str
    label_path: str
    read_image: Callable[[], bytes]
    read_label: Callable[[], np.ndarray]


def _tf_message(error: tf.errors.OpError) -> str:
    """The decoder's own words, without TensorFlow's op-wrapping noise."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:\w+\]", "", text).strip()


def lookup_table(mapping: dict[int, int]) -> np.ndarray:
    """A raw value -> model class table: int16 (256,), INVALID where undefined.

    Args:
      mapping: raw label value -> model class (0..C-1 or IGNORE_LABEL).
    """
    table = np.full(256, INVALID, np.int16)
    for raw, mapped in mapping.items():
        table[raw] = mapped
    return table


def read_bytes(path: str) -> bytes:
    """Reads a file, turning a missing or unreadable file into a BadExampleError."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, tf.errors.NotFoundError):
        raise BadExampleError(path, "file is missing (it is listed in the split)") from None
    except (OSError, tf.errors.OpError) as e:
        raise BadExampleError(path, f"cannot read file: {e}") from None


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Fully decodes a JPEG/PNG image to uint8 (H, W, 3).

    Args:
      data: encoded image bytes.
      path: shown in the error.

    Raises:
      BadExampleError: empty, corrupt or truncated data, or not JPEG/PNG.
    """
    if not data:
        raise BadExampleError(path, "image file is empty")
    if not (data.startswith(b"\xff\xd8") or data.startswith(png.PNG_SIGNATURE)):
        raise BadExampleError(path, "image is neither JPEG nor PNG")
    try:
        # channels=3 also converts the few grayscale/CMYK JPEGs of ADE20k.
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise BadExampleError(path, f"corrupt or truncated image ({_tf_message(e)})") from None
    return image.numpy()


def decode_label_png(data: bytes, path: str) -> np.ndarray:
    """Decodes a label PNG to its raw values: uint8 (H, W).

    Palette PNGs (VOC) give their palette indices; 8-bit grayscale PNGs
    (SegmentationClassAug, ADE20k, Cityscapes) give their values.

    Raises:
      BadExampleError: unreadable PNG, or a colour/16-bit PNG whose values
        are not class indices.
    """
    if not data:
        raise BadExampleError(path, "label file is empty")
    try:
        head = png.header(data)
    except png.PngFormatError as e:
        raise BadExampleError(path, f"label is not a readable PNG ({e})") from None
    kind, depth = head["color_type"], head["bit_depth"]
    try:
        if kind == png.PALETTE:
            if head["palette"] is None:
                raise BadExampleError(path, "palette PNG without a PLTE chunk")
            rgb = tf.io.decode_png(data, channels=3).numpy()
            return png.palette_indices(rgb, head["palette"])
        # Only 8 bits: decoders scale 1-4 bit gray values up (1 -> 255).
        if kind in (png.GRAY, png.GRAY_ALPHA) and depth == 8:
            return tf.io.decode_png(data, channels=1).numpy()[..., 0]
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise BadExampleError(path, f"corrupt or truncated label PNG ({_tf_message(e)})") from None
    except png.PngFormatError as e:
        raise BadExampleError(path, str(e)) from None
    raise BadExampleError(
        path, f"label PNG has colour type {kind} at {depth} bits; expected 8-bit palette or grayscale indices"
    )


def map_label(raw: np.ndarray, table: np.ndarray, path: str, num_classes: int) -> np.ndarray:
    """Maps raw label values to model space with `table`.

    Args:
      raw: integer (H, W) raw label.
      table: int16 (256,) from `lookup_table`.
      path: shown in the error.
      num_classes: C; mapped values must be in 0..C-1 or IGNORE_LABEL.

    Returns:
      uint8 (H, W) labels in model space.

    Raises:
      BadExampleError: raw values the dataset does not define.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise BadExampleError(path, f"label must be 2-D, got shape {raw.shape}")
    in_range = (raw >= 0) & (raw < len(table))
    mapped = table[np.where(in_range, raw, 0)]
    bad = ~in_range | (mapped == INVALID)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise BadExampleError(path, f"label values not defined for this dataset: {shown}")
    # The table is built from the dataset's definition; this guards the table itself.
    assert ((mapped < num_classes) | (mapped == IGNORE_LABEL)).all(), "lookup table maps outside model space"
    return mapped.astype(np.uint8)


def make_example(
    raw: RawExample, table: np.ndarray, num_classes: int, strip_height: int | None = None
) -> dict:
    """Reads, checks and maps one example into the stored feature dict.

    Args:
      raw: the example's files.
      table: raw label value -> model class (`lookup_table`).
      num_classes: C of the dataset.
      strip_height: None: the image is stored as "image". Otherwise it is
        stored as "image_strips" (`fcn_tf.data.strips`): 0 or >= H, one
        strip, the original bytes; else PNG strips of that many rows.

    Returns:
      {"image": the original encoded bytes (or "image_strips" and
       "strip_height"), "label": uint8 (H, W, 1), "image_id": str}.

    Raises:
      BadExampleError: naming the file and the problem.
    """
    data = raw.read_image()
    image = decode_image(data, raw.image_path)
    label = map_label(raw.read_label(), table, raw.label_path, num_classes)
    if label.shape != image.shape[:2]:
        raise BadExampleError(
            raw.label_path,
            f"label size {label.shape[1]}x{label.shape[0]} differs from image size "
            f"{image.shape[1]}x{image.shape[0]} ({raw.image_path})",
        )
    example = {"label": label[..., None], "image_id": raw.image_id}
    height = image.shape[0]
    if strip_height is None:
        # The image keeps its original encoding (no JPEG re-compression).
        example["image"] = data
    elif strip_height == 0 or strip_height >= height:
        example.update(image_strips=[data], strip_height=height)
    else:
        example.update(image_strips=strips.encode_strips(image, strip_height), strip_height=strip_height)
    return example
