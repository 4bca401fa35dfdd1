"""The recipe's resize and crop step by step, as the reference runs them: what the fused ops are tested against.

Training uses the fused `augment.random_resize_crop`, which resizes only the
part of the image a crop reads; these resize the whole image and label,
then crop, with the same seeds and parameters (a `fcn_tf.config.DataConfig`).
"""

import tensorflow as tf

from fcn_tf.data import augment


def resize_label(label: tf.Tensor, size) -> tf.Tensor:
    """Nearest-neighbour resize of a label map, exactly as OpenCV's `INTER_NEAREST`.

    A gather, so label values and dtype are unchanged.

    Args:
      label: (H, W) integer label.
      size: (new_h, new_w).

    Returns:
      (new_h, new_w) label of the same dtype.
    """
    shape = tf.shape(label)
    rows = augment.nearest_indices(shape[0], size[0])
    return augment.gather_2d(label, rows, augment.nearest_indices(shape[1], size[1]))


def random_resize(image, label, seed, data_config):
    """Random keep-ratio resize of the whole image and label (step 1 of the recipe).

    Args:
      image: (H, W, 3) uint8 or float32.
      label: (H, W) integer label.
      seed: stateless seed, shape [2].
      data_config: its `scale_target` and `ratio_range` are read.

    Returns:
      (image float32, label) resized.
    """
    shape = tf.shape(label)
    size = augment.sample_resize_size(shape[0], shape[1], seed, data_config)
    return augment.resize_image(image, size), resize_label(label, size)


def random_crop(image, label, seed, data_config):
    """Random crop with the single-class rule (step 2 of the recipe).

    Args:
      image: (H, W, C) image.
      label: (H, W) label.
      seed: stateless seed, shape [2].
      data_config: its `crop_size`, `cat_max_ratio`, `crop_tries` and
        `ignore_label` are read; smaller images are kept whole along that
        axis (and padded later by `augment.pad_to_size`).

    Returns:
      (image, label) crops of size min(crop, size).
    """
    shape = tf.shape(label)

    def label_crop(oy, ox, ch, cw):
        return label[oy : oy + ch, ox : ox + cw]

    oy, ox, ch, cw = augment.choose_crop(shape[0], shape[1], seed, label_crop, data_config)
    return image[oy : oy + ch, ox : ox + cw], label[oy : oy + ch, ox : ox + cw]
