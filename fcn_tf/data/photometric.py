"""mmsegmentation's `PhotoMetricDistortion` as one stateless-seeded TF op (step 4 of the recipe).

The reference works on uint8 images with OpenCV: brightness and contrast
clip to 0..255 and truncate (`astype(uint8)`); saturation and hue go
through OpenCV's uint8 HSV, whose HSV -> RGB conversion rounds and
saturates. Here the image is float32 on the 0..255 scale: brightness and
contrast clip and truncate as the reference does; saturation and hue use
TensorFlow's fused float ops (`adjust_saturation`, `adjust_hue`) and then
round and clip as OpenCV's conversion does, so they differ from the
reference by at most the uint8 HSV quantization.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf


def _convert(image, alpha=1.0, beta=0.0):
    # The reference's `convert`: float * alpha + beta, clip to 0..255, then
    # `astype(uint8)`, which truncates; floor is the same on 0..255.
    return tf.floor(tf.clip_by_value(image * alpha + beta, 0.0, 255.0))


def _from_hsv_round(image):
    # OpenCV's HSV -> RGB conversion of uint8 images rounds and saturates.
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def photometric_distortion(
    image,
    seed,
    brightness_delta: float = 32.0,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
):
    """mmsegmentation's `PhotoMetricDistortion`.

    In order: brightness (`beta ~ U(-32, 32)`), p=0.5; contrast
    (`alpha ~ U(0.5, 1.5)`), p=0.5, either here or last (a fair coin);
    saturation (`S *= U(0.5, 1.5)`, clipped), p=0.5; hue
    (`H += randint(-18, 18)` in OpenCV units of 2 degrees, i.e. at most
    +-36 degrees, wrapping around), p=0.5. See the module docstring for
    how each step matches the reference.

    Args:
      image: (H, W, 3) RGB, float32 (or uint8) on the 0..255 scale.
      seed: stateless seed, shape [2].
      brightness_delta: maximum brightness shift.
      contrast_range: range of the contrast factor.
      saturation_range: range of the saturation factor.
      hue_delta: maximum hue shift in OpenCV units (180 per turn).

    Returns:
      float32 image, same shape, integer values in 0..255.
    """
    image = tf.cast(image, tf.float32)
    s = tf.random.experimental.stateless_split(seed, 9)

    def coin(i):
        return tf.random.stateless_uniform([], s[i]) < 0.5

    beta = tf.random.stateless_uniform([], s[1], -brightness_delta, brightness_delta)
    contrast_last = coin(2)
    apply_contrast = coin(3)
    alpha = tf.random.stateless_uniform([], s[4], contrast_range[0], contrast_range[1])
    sat = tf.random.stateless_uniform([], s[6], saturation_range[0], saturation_range[1])
    # numpy's randint(-d, d) excludes d.
    hue = tf.random.stateless_uniform([], s[8], -hue_delta, hue_delta, dtype=tf.int32)

    image = tf.cond(coin(0), lambda: _convert(image, beta=beta), lambda: image)
    image = tf.cond(
        tf.logical_and(apply_contrast, tf.logical_not(contrast_last)),
        lambda: _convert(image, alpha=alpha),
        lambda: image,
    )
    image = tf.cond(coin(5), lambda: _from_hsv_round(tf.image.adjust_saturation(image, sat)), lambda: image)
    image = tf.cond(
        coin(7),
        lambda: _from_hsv_round(tf.image.adjust_hue(image, tf.cast(hue, tf.float32) / 180.0)),
        lambda: image,
    )
    image = tf.cond(
        tf.logical_and(apply_contrast, contrast_last), lambda: _convert(image, alpha=alpha), lambda: image
    )
    return image
