"""Inference modes: whole image, sliding window, multi-scale + flip.

Every function works on a `logits_fn(images float32 (N, h, w, 3)) -> logits
(N, h, w, C)` that returns logits at its input resolution, e.g.
`model_logits_fn(model)` (`model(x, training=False)["logits"]`). They are
pure TensorFlow with dynamic shapes, so they run eagerly and inside a
`tf.function` (one trace for images of every size), e.g. in a replica step.

The input `image` is the evaluation image as the pipeline gives it: already
keep-ratio resized to the experiment's eval size and normalized. `out_size`
is the original label size; every mode resizes its scores to it bilinearly
(half-pixel centres, PyTorch's `align_corners=False`) before the argmax, as
the reference scores against the untouched label.

What is returned (only the argmax matters for the metric):
  `predict_whole`, `predict_slide`: logits at `out_size`.
  `predict_multiscale`: softmax probabilities averaged over scales and flips.
  `predict`: logits for the plain single-scale, unflipped mode; otherwise
    the averaged probabilities. The argmax of both agree for scales=(1.0,),
    flip=False (softmax is monotonic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from fcn_tf import devices
from fcn_tf.config import EvalConfig

LogitsFn = Callable[[tf.Tensor], tf.Tensor]


def model_logits_fn(model) -> LogitsFn:
    """`logits_fn` of a segmenter returning `{"logits": ...}` (or a tensor), in inference mode.

    Logits are cast to float32 so that the averaging and argmax run in full
    precision under mixed precision.
    """

    def logits_fn(images):
        outputs = model(images, training=False)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs
        return tf.cast(logits, tf.float32)

    return logits_fn


def _resize(x, size):
    # Bilinear with half-pixel centres and no antialiasing: PyTorch's
    # interpolate(mode="bilinear", align_corners=False) and OpenCV's resize.
    return tf.image.resize(x, size, method="bilinear")


def _check_image(image):
    image = tf.convert_to_tensor(image, tf.float32)
    if image.shape.rank != 4:
        raise ValueError(f"image must be (N, h, w, 3), got shape {image.shape}")
    return image


def predict_whole(logits_fn: LogitsFn, image, out_size) -> tf.Tensor:
    """Runs the whole image at once and resizes the logits to `out_size`.

    Args:
      logits_fn: images (N, h, w, 3) -> logits (N, h, w, C).
      image: float32 (N, h, w, 3), the resized, normalized image.
      out_size: (H, W) of the original label.

    Returns:
      float32 logits (N, H, W, C).
    """
    image = _check_image(image)
    logits = tf.cast(logits_fn(image), tf.float32)
    return _resize(logits, out_size)


def window_starts(size, crop: int, stride: int) -> tf.Tensor:
    """Start offsets of sliding windows along one axis, as mmsegmentation's `slide_inference`.

    `grids = max(size - crop + stride - 1, 0) // stride + 1`; window i starts
    at `max(min(i * stride + crop, size) - crop, 0)`, so the last window is
    shifted back to end at the border instead of running past it.

    Args:
      size: image size along the axis (int or scalar int32 tensor).
      crop: window size.
      stride: step between windows.

    Returns:
      int32 (grids,) start offsets.
    """
    size = tf.cast(size, tf.int32)
    grids = tf.maximum(size - crop + stride - 1, 0) // stride + 1
    starts = tf.range(grids) * stride
    return tf.maximum(tf.minimum(starts + crop, size) - crop, 0)


def predict_slide(
    logits_fn: LogitsFn,
    image,
    out_size,
    crop_size: Sequence[int],
    stride: Sequence[int],
    window_batch: int,
    num_classes: int,
) -> tf.Tensor:
    """Sliding-window inference with overlapping logits averaged (mmsegmentation semantics).

    Windows follow `window_starts` on each axis. An image smaller than the
    crop along an axis is first padded bottom/right with 0 (the mean colour
    after normalization) up to the crop, so every window has the crop's
    shape; the scores of the padding are cut off again before the resize.
    Overlapping window logits are summed and divided by how many windows
    covered each pixel. Windows run `window_batch` at a time, so memory is
    bounded by that many crops plus one (h, w, C) accumulator. Under op
    determinism on a GPU or TPU the windows are accumulated by deterministic
    ops (`_add_windows_in_order`), with the same results.

    Args:
      logits_fn: images (n, ch, cw, 3) -> logits (n, ch, cw, C).
      image: float32 (N, h, w, 3).
      out_size: (H, W) of the original label.
      crop_size: (ch, cw) window size.
      stride: (sh, sw) step between windows.
      window_batch: windows per call of `logits_fn` (times N images).
      num_classes: C, the logits' channels.

    Returns:
      float32 logits (N, H, W, C).
    """
    image = _check_image(image)
    (ch, cw), (sh, sw) = (int(c) for c in crop_size), (int(s) for s in stride)
    if not (0 < sh <= ch and 0 < sw <= cw):
        raise ValueError(f"stride {tuple(stride)} must be in (0, crop_size {tuple(crop_size)}]")
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    shape = tf.shape(image)
    n, h, w = shape[0], shape[1], shape[2]
    ph, pw = tf.maximum(h, ch), tf.maximum(w, cw)
    padded = tf.pad(image, [[0, 0], [0, ph - h], [0, pw - w], [0, 0]])
    # Pixels first, batch last: windows are then gathered and scattered with
    # (y, x) indices alone.
    pixels = tf.transpose(padded, [1, 2, 0, 3])  # (ph, pw, N, 3)

    starts = _window_grid(ph, pw, (ch, cw), (sh, sw))
    num_windows = tf.shape(starts)[0]
    # A scatter-add of overlapping windows is not deterministic on a GPU
    # (op determinism rejects it there); the CPU's is, and is the fastest.
    deterministic = devices.deterministic_accelerator()

    def body(i, sums, counts):
        chunk = starts[i : i + window_batch]  # (k, 2); the last chunk may be shorter
        k = tf.shape(chunk)[0]
        rows = chunk[:, :1] + tf.range(ch)[None]  # (k, ch)
        cols = chunk[:, 1:] + tf.range(cw)[None]  # (k, cw)
        crops = tf.gather(tf.gather(pixels, rows), cols, axis=2, batch_dims=1)  # (k, ch, cw, N, 3)
        crops = tf.reshape(tf.transpose(crops, [0, 3, 1, 2, 4]), [k * n, ch, cw, 3])
        logits = tf.cast(logits_fn(crops), tf.float32)
        logits = tf.transpose(tf.reshape(logits, [k, n, ch, cw, num_classes]), [0, 2, 3, 1, 4])
        if deterministic:
            return i + window_batch, *_add_windows_in_order(sums, counts, chunk, logits)
        sums, counts = _add_windows_at_once(sums, counts, k, rows, cols, logits)
        return i + window_batch, sums, counts

    sums = tf.zeros(tf.stack([ph, pw, n, num_classes]), tf.float32)
    counts = tf.zeros(tf.stack([ph, pw]), tf.float32)
    _, sums, counts = tf.while_loop(
        lambda i, *_: i < num_windows, body, (tf.constant(0), sums, counts), parallel_iterations=1
    )
    logits = sums[:h, :w] / counts[:h, :w, None, None]  # every pixel is covered at least once
    logits = tf.transpose(logits, [2, 0, 1, 3])  # (N, h, w, C)
    return _resize(logits, out_size)


def _window_grid(height, width, crop_size, stride) -> tf.Tensor:
    """int32 (windows, 2) start offsets (y, x) of every window, row by row (`window_starts` per axis)."""
    ys, xs = window_starts(height, crop_size[0], stride[0]), window_starts(width, crop_size[1], stride[1])
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    return tf.stack([tf.reshape(grid_y, [-1]), tf.reshape(grid_x, [-1])], axis=1)


def _add_windows_at_once(sums, counts, k, rows, cols, logits):
    """`predict_slide`'s accumulation of k windows by one scatter-add (the CPU's, deterministic there).

    Args:
      sums: float32 (ph, pw, N, C) running sums of logits.
      counts: float32 (ph, pw) windows covering each pixel so far.
      k: int32 scalar, the number of windows.
      rows: int32 (k, ch) the windows' rows, ch known statically.
      cols: int32 (k, cw) the windows' columns, cw known statically.
      logits: float32 (k, ch, cw, N, C) the windows' logits.
    """
    ch, cw = rows.shape[1], cols.shape[1]
    indices = tf.stack(
        [
            tf.broadcast_to(rows[:, :, None], [k, ch, cw]),
            tf.broadcast_to(cols[:, None, :], [k, ch, cw]),
        ],
        axis=-1,
    )  # (k, ch, cw, 2)
    # Overlapping windows (also inside one chunk) add up: scatter-add sums duplicates.
    sums = tf.tensor_scatter_nd_add(sums, indices, logits)
    counts = tf.tensor_scatter_nd_add(counts, indices, tf.ones([k, ch, cw], tf.float32))
    return sums, counts


def _update_slice(tensor, begin, value):
    # `tensor` with the block at `begin` replaced by `value` (XLA's dynamic_update_slice).
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=tensor, begin=begin, end=begin + tf.shape(value), strides=tf.ones_like(begin), value=value
    )


def _add_windows_in_order(sums, counts, starts, logits):
    """`predict_slide`'s accumulation by deterministic ops: one window at a time, in order.

    Each window's slice of the sums is read, added to and written back: the
    same additions in the same order as the scatter-add (identical results),
    without atomic adds. Slower on a CPU (each write copies the sums), hence
    only where op determinism is on and an accelerator runs it.

    Args:
      sums: float32 (ph, pw, N, C) running sums of logits.
      counts: float32 (ph, pw) windows covering each pixel so far.
      starts: int32 (k, 2) window offsets (y, x).
      logits: float32 (k, ch, cw, N, C) the windows' logits.
    """
    window_shape = tf.shape(logits)[1:]

    def add(j, sums, counts):
        begin = tf.concat([starts[j], [0, 0]], 0)
        sums = _update_slice(sums, begin, tf.slice(sums, begin, window_shape) + logits[j])
        covered = tf.slice(counts, starts[j], window_shape[:2]) + 1.0
        return j + 1, sums, _update_slice(counts, starts[j], covered)

    _, sums, counts = tf.while_loop(
        lambda j, *_: j < tf.shape(starts)[0], add, (tf.constant(0), sums, counts), parallel_iterations=1
    )
    return sums, counts


def scaled_size(size, scale: float) -> tf.Tensor:
    """`int(size * scale + 0.5)` per axis (mmcv's `rescale_size`), at least 1."""
    size = tf.cast(size, tf.float64)
    return tf.maximum(tf.cast(tf.floor(size * scale + 0.5), tf.int32), 1)


def predict_multiscale(
    logits_fn: LogitsFn,
    image,
    out_size,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: str = "whole",
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
    window_batch: int = 4,
    num_classes: int | None = None,
) -> tf.Tensor:
    """Test-time augmentation: softmax probabilities averaged over scales and flips.

    For each scale the image is resized bilinearly, keeping its ratio, to
    `int(h * s + 0.5) x int(w * s + 0.5)`; with `flip` also its horizontal
    mirror is run and the result mirrored back. Each pass runs `mode`
    ("whole" or "slide", with the same window size at every scale), has its
    logits resized to `out_size`, and is turned into probabilities; the
    probabilities are averaged (as mmsegmentation's `aug_test`).

    The scale applies to the image as given (already resized to the eval
    size); the reference rescales the original image instead, which differs
    only by the interpolation of an interpolated image.

    Args:
      logits_fn: images (N, h, w, 3) -> logits (N, h, w, C).
      image: float32 (N, h, w, 3).
      out_size: (H, W) of the original label.
      scales: relative scales; 1.0 runs the image unresized.
      flip: also average horizontally flipped passes.
      mode: "whole" or "slide".
      crop_size, stride, window_batch: sliding-window settings ("slide").
      num_classes: C; required by "slide".

    Returns:
      float32 probabilities (N, H, W, C), summing to 1 over C.
    """
    image = _check_image(image)
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and num_classes is None:
        raise ValueError("mode='slide' needs num_classes")
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {tuple(scales)}")

    def run(x):
        if mode == "whole":
            return predict_whole(logits_fn, x, out_size)
        return predict_slide(logits_fn, x, out_size, crop_size, stride, window_batch, num_classes)

    size = tf.shape(image)[1:3]
    total, passes = None, 0
    for scale in scales:
        scaled = image if scale == 1.0 else _resize(image, scaled_size(size, scale))
        for flipped in (False, True) if flip else (False,):
            x = tf.reverse(scaled, axis=[2]) if flipped else scaled
            probs = tf.nn.softmax(run(x), axis=-1)
            if flipped:
                probs = tf.reverse(probs, axis=[2])
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


def predict(logits_fn: LogitsFn, image, out_size, eval_config: EvalConfig, num_classes: int) -> tf.Tensor:
    """Scores of `image` at `out_size` as the experiment's `EvalConfig` says; take the argmax.

    Args:
      logits_fn: images (N, h, w, 3) -> logits (N, h, w, C).
      image: float32 (N, h, w, 3), resized and normalized.
      out_size: (H, W) of the original label.
      eval_config: mode, crop_size, stride, scales, flip, window_batch.
      num_classes: C.

    Returns:
      float32 (N, H, W, C): logits when `scales == (1.0,)` and not `flip`,
      else averaged probabilities (see `predict_multiscale`).
    """
    e = eval_config
    if tuple(e.scales) == (1.0,) and not e.flip:
        if e.mode == "whole":
            return predict_whole(logits_fn, image, out_size)
        if e.mode == "slide":
            return predict_slide(
                logits_fn, image, out_size, e.crop_size, e.stride, e.window_batch, num_classes
            )
        raise ValueError(f"eval mode must be 'whole' or 'slide', got {e.mode!r}")
    return predict_multiscale(
        logits_fn,
        image,
        out_size,
        e.scales,
        e.flip,
        e.mode,
        e.crop_size,
        e.stride,
        e.window_batch,
        num_classes,
    )
