"""The one shape of an example as every reader yields it, still encoded, and its decoder.

Every source of examples (a prepared split read in stored order for
evaluation or by position for the training order, `fcn_tf.data.sources`;
a `tf.data` source given to `build_dataset`) yields dicts of

  "image_strips"  tf.string (n,): the image as n encoded horizontal strips,
                  top to bottom (`fcn_tf.data.strips`): PNG strips, or the
                  image's original JPEG or PNG bytes as a single strip
  "strip_height"  int32 scalar: rows per strip, the last strip holding the
                  rest; for a single strip, any height not below the image's
  "label_png"     tf.string scalar: a single-channel PNG of class ids in
                  model space (0..C-1 and the ignore value)
  "image_id"      tf.string scalar: the dataset's id, "" when there is none

and only this module decodes them: `decode` the whole example (evaluation),
`decode_label` and `read_window` the label and the part of the image a
training crop reads (only the strips it meets; a JPEG only in that window).
The examples of a source of decoded arrays are brought into this shape as
the pipelines read them, by `adapt` (lossless PNG), so that every reader
shares one decoder.
"""

from __future__ import annotations

import tensorflow as tf

from fcn_tf.data import strips

# The strip height given to an image stored whole, whose own height is not
# known without decoding it: any height not below the image's will do.
WHOLE = 2**31 - 1


def from_strips(image_strips, strip_height, label_png, image_id) -> dict:
    """An example from its encoded image strips and label (see the module docstring).

    The shapes are those of one example; `from_files` also passes n at once.

    Args:
      image_strips: tf.string (n,), the strips top to bottom.
      strip_height: int32 scalar, rows per strip.
      label_png: tf.string scalar, single-channel PNG of class ids.
      image_id: tf.string scalar.
    """
    return {
        "image_strips": image_strips,
        "strip_height": tf.cast(strip_height, tf.int32),
        "label_png": label_png,
        "image_id": tf.convert_to_tensor(image_id, tf.string),
    }


def from_files(image, label_png, image_id=None) -> dict:
    """An example from an image file's bytes (JPEG or PNG), stored whole as one strip.

    Also for n examples at once, e.g. `tf.data.Dataset.from_tensor_slices(
    from_files(images, labels))`: a source `tf.data.experimental.at` reads
    directly, with no `map` (see `fcn_tf.data.pipeline`).

    Args:
      image: tf.string scalar (or (n,)), the encoded image.
      label_png: tf.string scalar (or (n,)), single-channel PNG of class ids.
      image_id: tf.string scalar (or (n,)); default "".
    """
    image = tf.convert_to_tensor(image, tf.string)
    if image_id is None:
        image_id = tf.fill(tf.shape(image), "")
    return from_strips(image[..., tf.newaxis], tf.fill(tf.shape(image), WHOLE), label_png, image_id)


def from_arrays(image, label, image_id=None) -> dict:
    """An example from decoded arrays, encoded losslessly as PNG.

    Args:
      image: uint8 (H, W, 3).
      label: uint8 (H, W) class ids.
      image_id: tf.string scalar; default "".
    """
    return from_files(tf.io.encode_png(image), tf.io.encode_png(label[..., tf.newaxis]), image_id)


def adapt(example: dict) -> dict:
    """`example` in the encoded shape: decoded arrays are PNG-encoded, an encoded example is returned as it is.

    Args:
      example: an encoded example, or a decoded one: {"image": uint8 (H, W,
        3), "label": uint8 (H, W), optional "image_id"}.
    """
    if "image" not in example:
        return example
    return from_arrays(example["image"], example["label"], example.get("image_id"))


def decode_label(example: dict) -> tf.Tensor:
    """The uint8 (H, W) label of an example.

    Args:
      example: an encoded example.
    """
    return tf.ensure_shape(tf.io.decode_png(example["label_png"], channels=1)[..., 0], [None, None])


def read_window(example: dict, start, size) -> tf.Tensor:
    """`image[start[0]:start[0]+size[0], start[1]:start[1]+size[1]]`, decoding only what it reads.

    The same pixels as decoding the whole image and slicing
    (`strips.read_window`). A JPEG stored whole is decoded in the window
    only where its strips are known to be one as the graph is traced
    (shape (1,), as `from_files` gives).

    Args:
      example: an encoded example.
      start: int32 [2], the window's first row and column (inside the image).
      size: int32 [2], the window's rows and columns (> 0, inside the image).

    Returns:
      uint8 (size[0], size[1], 3).
    """
    return strips.read_window(example["image_strips"], example["strip_height"], start, size)


def decode(example: dict) -> dict:
    """The whole example decoded: {"image": uint8 (H, W, 3), "label": uint8 (H, W), "image_id"}.

    Args:
      example: an encoded example.
    """
    return {
        "image": strips.decode_strips(example["image_strips"]),
        "label": decode_label(example),
        "image_id": example["image_id"],
    }
