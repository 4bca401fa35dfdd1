"""Images stored as horizontal PNG strips, so training decodes only the rows a crop reads.

A PNG cannot be decoded in part: reading one row means inflating every row
above it. A Cityscapes training crop reads on average under half of the
source rows (random scale 0.5..2 of 2048x1024, crop 512x1024), and the PNG
decode is most of the pipeline's time. The Cityscapes builder therefore
stores each training image as `ceil(H / strip_height)` PNGs of
`strip_height` rows (the last one shorter), top to bottom, and the training
pipeline decodes only the strips that intersect the crop's source window
(`read_window`). The strips hold exactly the image's pixels (PNG is
lossless; `decode_strips` reassembles the image bit for bit). They are
written with the Up filter and zlib's run-length strategy
(`png.encode_png`), which decode ~25% faster than libpng's defaults and
encode ~10x faster, for files ~9% larger on photos.

An image stored whole is a single strip holding its original bytes, JPEG
or PNG: every example is read through strips (`fcn_tf.data.encoded`), and
a JPEG stored whole is decoded only inside the window read
(`decode_and_crop_jpeg`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fcn_tf.data import png

# Rows per strip of the Cityscapes training images: 8 strips of a 1024-row
# image, of which a crop reads ~4.6 on average. Against one whole PNG with
# the same settings, 128-row strips cost ~2% more disk (each strip's first
# row has no row above to predict from) and ~5% more time to decode all of
# them; 64-row strips were ~3% faster in the pipeline for ~4% more disk
# (BENCHMARKS.md, "Input pipeline").
DEFAULT_STRIP_HEIGHT = 128


def encode_strips(image: np.ndarray, strip_height: int, **png_options) -> list[bytes]:
    """Splits an image into PNG strips of `strip_height` rows, top to bottom.

    Written by `png.encode_png` (by default the Up filter and zlib's
    run-length strategy, which decode faster than libpng's defaults).

    Args:
      image: uint8 (H, W, 3).
      strip_height: rows per strip (>= 1); the last strip holds the rest.
      **png_options: `png.encode_png` settings (filter_type, level, strategy).

    Returns:
      `ceil(H / strip_height)` PNG files' bytes.
    """
    if strip_height < 1:
        raise ValueError(f"strip_height must be >= 1, got {strip_height}")
    image = np.asarray(image)
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    return [
        png.encode_png(image[top : top + strip_height], **png_options)
        for top in range(0, image.shape[0], strip_height)
    ]


def _decode_png(strip) -> tf.Tensor:
    return tf.ensure_shape(tf.io.decode_png(strip, channels=3), [None, None, 3])


def _decode_whole(image) -> tf.Tensor:
    return tf.ensure_shape(tf.io.decode_image(image, channels=3, expand_animations=False), [None, None, 3])


def _read_whole(image, start, size) -> tf.Tensor:
    """A window of an image stored whole (JPEG or PNG bytes); a JPEG is decoded in the window only."""

    def jpeg():
        return tf.io.decode_and_crop_jpeg(image, tf.concat([start, size], 0), channels=3)

    def other():
        return tf.slice(_decode_whole(image), tf.concat([start, [0]], 0), tf.concat([size, [-1]], 0))

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image), jpeg, other), [None, None, 3])


def _stored_whole(strips: tf.Tensor) -> bool:
    """Whether `strips` is known, as the graph is traced, to be one strip: an image stored whole.

    Decided in Python rather than by a `tf.cond`: the loop over strips costs
    ~0.4 ms per example even in a branch not taken, a fifth of a VOC JPEG's
    crop-window decode. A single strip whose count is only known at run
    time (a prepared Cityscapes validation image) goes through the loop.
    """
    return strips.shape.rank == 1 and strips.shape[0] == 1


def decode_strips(strips: tf.Tensor) -> tf.Tensor:
    """The whole image, uint8 (H, W, 3): every strip decoded, stacked top to bottom.

    Args:
      strips: tf.string (n,), PNG strips top to bottom, or one strip holding
        the whole image's JPEG or PNG bytes.
    """
    if _stored_whole(strips):
        return _decode_whole(strips[0])
    n = tf.shape(strips)[0]
    rows = tf.TensorArray(tf.uint8, size=n, infer_shape=False, element_shape=tf.TensorShape([None, None, 3]))

    def body(i, rows):
        return i + 1, rows.write(i, _decode_png(strips[i]))

    _, rows = tf.while_loop(lambda i, _: i < n, body, (tf.constant(0), rows))
    return tf.ensure_shape(rows.concat(), [None, None, 3])


def read_window(strips: tf.Tensor, strip_height, start, size) -> tf.Tensor:
    """`image[start[0]:start[0]+size[0], start[1]:start[1]+size[1]]`, decoding only the strips it meets.

    Args:
      strips: tf.string (n,), PNG strips top to bottom, or one strip holding
        the whole image's JPEG or PNG bytes (of static shape (1,), a JPEG is
        decoded in the window only, `decode_and_crop_jpeg`).
      strip_height: int32 scalar, rows per strip (the last may be shorter;
        for a single strip, any height not below the image's).
      start: int32 [2], the window's first row and column (inside the image).
      size: int32 [2], the window's rows and columns (> 0, inside the image).

    Returns:
      uint8 (size[0], size[1], 3), the same pixels as decoding the whole
      image and slicing.
    """
    if _stored_whole(strips):
        return _read_whole(strips[0], start, size)
    strip_height = tf.cast(strip_height, tf.int32)
    top, bottom = start[0], start[0] + size[0]
    first = top // strip_height
    last = (bottom - 1) // strip_height
    rows = tf.TensorArray(
        tf.uint8, size=last - first + 1, infer_shape=False, element_shape=tf.TensorShape([None, None, 3])
    )

    def body(i, rows):
        strip_top = i * strip_height
        # The part of strip i inside the window, in the strip's own rows.
        lo = tf.maximum(top - strip_top, 0)
        hi = tf.minimum(bottom - strip_top, strip_height)
        part = _decode_png(strips[i])[lo:hi, start[1] : start[1] + size[1]]
        return i + 1, rows.write(i - first, part)

    _, rows = tf.while_loop(lambda i, _: i <= last, body, (first, rows))
    return tf.ensure_shape(rows.concat(), [None, None, 3])
