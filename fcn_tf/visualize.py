"""Pictures of label maps: colourize with a palette, blend over the image (numpy).

The one `colorize` of the project: TensorBoard's images, evaluation PNGs
and predict's pictures all use it. Label values that are not a class (the
ignore label 255, the export's padding -1) are drawn in `UNKNOWN_COLOR`,
white, so a picture never hides them under a class colour (class 0 of
VOC and the synthetic set is black).
"""

from __future__ import annotations

import numpy as np

UNKNOWN_COLOR = (255, 255, 255)


def colorize(labels, palette, unknown_color=UNKNOWN_COLOR) -> np.ndarray:
    """Maps class ids to colours.

    Args:
      labels: integer (H, W) (or any shape) class ids.
      palette: uint8-compatible (num_classes, 3) RGB colours; row i = class i.
      unknown_color: RGB for values outside 0..num_classes-1.

    Returns:
      uint8 (*labels.shape, 3).

    Raises:
      ValueError: labels are not integers or the palette is not (C, 3) in 0..255.
    """
    labels = np.asarray(labels)
    palette = np.asarray(palette)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) == 0:
        raise ValueError(f"palette must be (num_classes, 3), got shape {palette.shape}")
    if palette.min() < 0 or palette.max() > 255:
        raise ValueError("palette values must be in 0..255")
    # One extra row for everything that is not a class.
    table = np.concatenate([palette.astype(np.uint8), np.asarray([unknown_color], np.uint8)])
    index = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return table[index]


def overlay(image, labels, palette, alpha: float = 0.5, unknown_color=None) -> np.ndarray:
    """Blends the colourized labels over the image.

    Args:
      image: uint8 (H, W, 3) RGB (a (H, W) or (H, W, 1) grayscale image is
        replicated to RGB; a 4th alpha channel is dropped).
      labels: integer (H, W) class ids, same size as the image.
      palette: (num_classes, 3) RGB colours.
      alpha: weight of the label colours (0: image only, 1: labels only).
      unknown_color: RGB for non-class values; None keeps the image there.

    Returns:
      uint8 (H, W, 3): round((1 - alpha) * image + alpha * colour).

    Raises:
      ValueError: sizes differ or alpha is outside [0, 1].
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim == 2:
        image = image[..., np.newaxis]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W, 1|3|4), got shape {image.shape}")
    image = np.broadcast_to(image, (*image.shape[:2], 3)) if image.shape[-1] == 1 else image[..., :3]
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image size {image.shape[:2]} differs from labels size {labels.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    colours = colorize(labels, palette, UNKNOWN_COLOR if unknown_color is None else unknown_color)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    if unknown_color is None:
        is_class = (labels >= 0) & (labels < len(np.asarray(palette)))
        blended = np.where(is_class[..., np.newaxis], blended, image.astype(np.float32))
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
