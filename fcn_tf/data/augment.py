"""The reference train augmentation as pure TensorFlow ops on (image, label).

Every op takes an explicit stateless seed (an int32/int64 tensor of shape
[2]), so a result depends only on its inputs and the seed: runs are
reproducible, and a `tf.data` iterator that derives the seeds from the
element index can be checkpointed and restored exactly.

Conventions: images are (H, W, 3) RGB, uint8 or float32 on the 0..255
scale; labels are (H, W) integers (uint8 or int32), classes 0..C-1 and the
ignore value. Labels are only ever resized with nearest neighbour and
padded with the ignore value; their dtype is preserved. The resize and
crop ops read their parameters (scale_target, ratio_range, crop_size,
cat_max_ratio, crop_tries, ignore_label) from the experiment's
`fcn_tf.config.DataConfig`, which documents them.

The reference is sssegmentation / mmsegmentation (OpenCV + numpy):
keep-ratio resize to (2048, 512) x U(0.5, 2), random crop with the 0.75
single-class rule, flip 0.5, photometric distortion
(`fcn_tf.data.photometric`), normalize, pad. Followed exactly: the resize
target truncated to integers and mmcv's `int(x * scale + 0.5)` size
rounding; labels resized with OpenCV's `INTER_NEAREST` index formula (no
half-pixel offset, unlike `tf.image.resize(..., "nearest")`); the crop
retry rule with sssegmentation's fallback (the last crop tried). The
resize and the crop are fused (`random_resize_crop`): the crop is drawn on
the label, and only the part of the image it reads is resampled.
Differences, where TensorFlow cannot reproduce it bit for bit:
- the resized image stays float32 (OpenCV rounds it to uint8);
- the photometric HSV steps work in float HSV (see `fcn_tf.data.photometric`);
- padding is bottom/right (mmsegmentation's `Pad`; sssegmentation centres).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from fcn_tf.data import photometric

Size = Sequence[int]


# ---------------------------------------------------------------- resize ---


def keep_ratio_size(height, width, target: Size) -> tuple[tf.Tensor, tf.Tensor]:
    """Size of an image resized keeping its aspect ratio to fit `target`.

    mmcv's `rescale_size`: `scale = min(max(target) / max(h, w),
    min(target) / min(h, w))`, new size `int(h * scale + 0.5)`,
    `int(w * scale + 0.5)`. Computed in float64 as the reference (Python
    floats) does, so the rounding matches.

    Args:
      height: image height (int or scalar tensor).
      width: image width (int or scalar tensor).
      target: (long, short) sizes to fit, ints or float tensors.

    Returns:
      (new_height, new_width) as int32 scalar tensors.
    """
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    t0 = tf.cast(target[0], tf.float64)
    t1 = tf.cast(target[1], tf.float64)
    scale = tf.minimum(tf.maximum(t0, t1) / tf.maximum(h, w), tf.minimum(t0, t1) / tf.minimum(h, w))
    new_h = tf.cast(tf.floor(h * scale + 0.5), tf.int32)
    new_w = tf.cast(tf.floor(w * scale + 0.5), tf.int32)
    return new_h, new_w


def sample_resize_size(height, width, seed, data_config):
    """Draws the reference's random keep-ratio size (step 1 of the recipe).

    `r ~ U(ratio_range)`, target `(int(scale_target[0] * r),
    int(scale_target[1] * r))` (the reference truncates the target to
    integers), then `keep_ratio_size`.

    Args:
      height: image height.
      width: image width.
      seed: stateless seed, shape [2].
      data_config: a `fcn_tf.config.DataConfig`; its `scale_target` (long,
        short) and `ratio_range` (low, high) are read.

    Returns:
      (new_height, new_width) int32 scalar tensors.
    """
    low, high = data_config.ratio_range
    r = tf.random.stateless_uniform([], seed, minval=float(low), maxval=float(high), dtype=tf.float64)
    target = tuple(tf.floor(float(t) * r) for t in data_config.scale_target)
    return keep_ratio_size(height, width, target)


def resize_image(image: tf.Tensor, size) -> tf.Tensor:
    """Bilinear resize with half-pixel centres and no antialiasing.

    This is OpenCV's `INTER_LINEAR` (and PyTorch's `align_corners=False`);
    the result stays float32 on the 0..255 scale instead of being rounded.

    Args:
      image: (H, W, C) uint8 or float32.
      size: (new_h, new_w).

    Returns:
      float32 (new_h, new_w, C).
    """
    return tf.image.resize(image, size, method="bilinear", antialias=False)


def nearest_indices(src_size, dst_size, start=0, length=None) -> tf.Tensor:
    """Source indices of OpenCV's `INTER_NEAREST` along one axis.

    OpenCV maps destination pixel x to `min(floor(x * src / dst), src - 1)`
    (no half-pixel offset, unlike `tf.image.resize(..., "nearest")`).

    Args:
      src_size: source length.
      dst_size: destination length.
      start: first destination index wanted.
      length: how many destination indices (default: all from `start`).

    Returns:
      int32 vector of source indices.
    """
    if length is None:
        length = dst_size - start
    x = tf.cast(tf.range(length) + start, tf.float64)
    # OpenCV computes the step as 1 / (dst / src) in double; so do we, to
    # round exactly as it does.
    ratio = 1.0 / (tf.cast(dst_size, tf.float64) / tf.cast(src_size, tf.float64))
    idx = tf.cast(tf.floor(x * ratio), tf.int32)
    return tf.minimum(idx, tf.cast(src_size, tf.int32) - 1)


def gather_2d(label, rows, cols, transposed=False):
    """`label[rows][:, cols]`, fast: both gathers pick whole rows.

    A gather along axis 1 copies one element at a time; transposing in
    between makes both gathers row copies (~4x faster for 512x512 uint8).

    Args:
      label: (H, W) tensor.
      rows: int32 row indices.
      cols: int32 column indices.
      transposed: return the result transposed (saves the last transpose
        when only label statistics are needed).
    """
    picked = tf.gather(tf.transpose(tf.gather(label, rows)), cols)
    return picked if transposed else tf.transpose(picked)


# ------------------------------------------------------------------ crop ---


def crop_is_acceptable(label_crop, cat_max_ratio: float, ignore_label: int) -> tf.Tensor:
    """The reference's crop rule: more than one class and none too frequent.

    Accepts when the crop holds more than one non-ignored class and the most
    frequent one covers less than `cat_max_ratio` of the labelled pixels.

    Args:
      label_crop: (h, w) integer label with values in 0..255.
      cat_max_ratio: maximum share of the most frequent class.
      ignore_label: label value that is not counted.

    Returns:
      bool scalar tensor.
    """
    counts = tf.math.bincount(tf.reshape(tf.cast(label_crop, tf.int32), [-1]), minlength=256, maxlength=256)
    counts = tf.where(tf.range(256) == ignore_label, 0, counts)
    present = tf.math.count_nonzero(counts)
    total = tf.reduce_sum(counts)
    largest = tf.reduce_max(counts)
    # max / total < ratio, written without a division (total may be 0).
    return tf.logical_and(
        present > 1, tf.cast(largest, tf.float64) < cat_max_ratio * tf.cast(total, tf.float64)
    )


def choose_crop(height, width, seed, label_crop_fn, data_config):
    """Draws crop offsets with the reference's retry rule (step 2 of the recipe), in a `tf.while_loop`.

    Try `i` draws `offset_h ~ U{0..max(height - crop_h, 0)}` and likewise for
    the width from `stateless_fold_in(seed, i)`; the first acceptable crop
    (`crop_is_acceptable`) is kept, otherwise the last one tried
    (sssegmentation's rule; mmsegmentation instead keeps an 11th, unchecked
    draw). With `cat_max_ratio >= 1` the first draw is kept, as in
    mmsegmentation.

    Args:
      height: image height (after resizing).
      width: image width.
      seed: stateless seed, shape [2].
      label_crop_fn: `(offset_h, offset_w, h, w) -> label crop`.
      data_config: a `fcn_tf.config.DataConfig`; read: `crop_size` (crop_h,
        crop_w; larger than the image means the whole image along that
        axis), `crop_tries` (maximum number of draws), and `cat_max_ratio`
        and `ignore_label` (see `crop_is_acceptable`).

    Returns:
      (offset_h, offset_w, crop_h, crop_w) int32 scalar tensors.
    """
    crop_size, cat_max_ratio = data_config.crop_size, data_config.cat_max_ratio
    ch = tf.minimum(tf.cast(crop_size[0], tf.int32), height)
    cw = tf.minimum(tf.cast(crop_size[1], tf.int32), width)
    margin_h = tf.maximum(height - ch, 0)
    margin_w = tf.maximum(width - cw, 0)
    tries = data_config.crop_tries if cat_max_ratio < 1.0 else 1

    def draw(i):
        s = tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, i), 2)
        oy = tf.random.stateless_uniform([], s[0], minval=0, maxval=margin_h + 1, dtype=tf.int32)
        ox = tf.random.stateless_uniform([], s[1], minval=0, maxval=margin_w + 1, dtype=tf.int32)
        return oy, ox

    def cond(i, oy, ox, accepted):
        return tf.logical_and(i < tries, tf.logical_not(accepted))

    def body(i, oy, ox, accepted):
        oy, ox = draw(i)
        if cat_max_ratio < 1.0:
            crop = label_crop_fn(oy, ox, ch, cw)
            accepted = crop_is_acceptable(crop, cat_max_ratio, data_config.ignore_label)
        else:
            accepted = tf.constant(True)
        return i + 1, oy, ox, accepted

    _, oy, ox, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), tf.constant(0), tf.constant(0), tf.constant(False)),
        maximum_iterations=tries,
    )
    return oy, ox, ch, cw


def plan_resize_crop(label, resize_seed, crop_seed, data_config) -> dict:
    """Draws the random resize and crop from the label alone.

    The size from `sample_resize_size(resize_seed)`, the crop from
    `choose_crop(crop_seed)` on the resized label, as the reference resizes
    then crops; the label crop is gathered through OpenCV's
    nearest-neighbour index maps (`nearest_indices`) for the crop window
    only, bit for bit what cropping the fully resized label gives.

    Args:
      label: (H, W) integer label (the image has the same size).
      resize_seed: stateless seed of the resize, shape [2].
      crop_seed: stateless seed of the crop, shape [2].
      data_config: a `fcn_tf.config.DataConfig` (see `sample_resize_size`
        and `choose_crop`).

    Returns:
      dict with int32 "source_size" (H, W), "resized_size", "offset" and
      "crop_size" (each shape [2]) and "label" (the label crop).
    """
    shape = tf.shape(label)
    h, w = shape[0], shape[1]
    new_h, new_w = sample_resize_size(h, w, resize_seed, data_config)

    def label_crop(oy, ox, ch, cw, transposed=False):
        rows = nearest_indices(h, new_h, oy, ch)
        cols = nearest_indices(w, new_w, ox, cw)
        return gather_2d(label, rows, cols, transposed)

    # The crop rule only counts pixels: the transposed crop will do.
    oy, ox, ch, cw = choose_crop(
        new_h, new_w, crop_seed, lambda *a: label_crop(*a, transposed=True), data_config
    )
    return {
        "source_size": tf.stack([h, w]),
        "resized_size": tf.stack([new_h, new_w]),
        "offset": tf.stack([oy, ox]),
        "crop_size": tf.stack([ch, cw]),
        "label": label_crop(oy, ox, ch, cw),
    }


def source_window(plan: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """The part of the source image that the planned image crop reads.

    Output pixel x of the crop samples the source at
    `(offset + x + 0.5) * src / resized - 0.5` and reads its two neighbours;
    the window keeps one spare pixel each side, so resampling the window
    gives the same crop as resampling the whole image.

    Args:
      plan: from `plan_resize_crop`.

    Returns:
      (start, size): int32 [2] tensors (rows, columns) of the window.
    """
    src = tf.cast(plan["source_size"], tf.float64)
    step = src / tf.cast(plan["resized_size"], tf.float64)
    offset = tf.cast(plan["offset"], tf.float64)
    first = (offset + 0.5) * step - 0.5
    last = (offset + tf.cast(plan["crop_size"], tf.float64) - 0.5) * step - 0.5
    start = tf.cast(tf.maximum(tf.floor(first) - 1.0, 0.0), tf.int32)
    stop = tf.cast(tf.minimum(tf.floor(last) + 3.0, src), tf.int32)
    return start, stop - start


def resample_crop(window, window_start, plan: dict) -> tf.Tensor:
    """The planned bilinear image crop, computed from a source window.

    `ScaleAndTranslate` with a triangle (bilinear) kernel and no
    antialiasing samples the window directly at the crop's pixels: the same
    values as resizing the whole image with `resize_image` and cropping, up
    to float rounding (< 0.02 on the 0..255 scale), without materializing
    the resized image (up to 4096x2048x3 floats for Cityscapes).

    Args:
      window: (h, w, 3) uint8 or float32 part of the source image, e.g.
        `image[start[0]:start[0]+size[0], start[1]:start[1]+size[1]]` with
        `start, size = source_window(plan)`.
      window_start: int32 [2], the window's first row and column.
      plan: from `plan_resize_crop`.

    Returns:
      float32 (crop_h, crop_w, 3).
    """
    scale = tf.cast(plan["resized_size"], tf.float32) / tf.cast(plan["source_size"], tf.float32)
    # ScaleAndTranslate samples its input at (x + 0.5 - translation) / scale - 0.5.
    # We want source position (offset + x + 0.5) / scale - 0.5, i.e. window
    # position that minus window_start.
    translation = tf.cast(window_start, tf.float32) * scale - tf.cast(plan["offset"], tf.float32)
    return tf.raw_ops.ScaleAndTranslate(
        images=window[tf.newaxis],
        size=plan["crop_size"],
        scale=scale,
        translation=translation,
        kernel_type="triangle",
        antialias=False,
    )[0]


def random_resize_crop(image, label, resize_seed, crop_seed, data_config, read_window=None):
    """The random keep-ratio resize then the random crop, without resizing the whole image.

    The reference resizes the whole image (bilinear, `resize_image`) and
    label (OpenCV's nearest neighbour), then crops both. Here the same
    random draws give the same label crop bit for bit, and the same image
    crop up to float rounding: see `plan_resize_crop`, `source_window` and
    `resample_crop`, which this chains. The crop is planned on the label,
    then only the source window it reads is resampled.

    Args:
      image: (H, W, 3) uint8 or float32; unused (may be None) when
        `read_window` is given.
      label: (H, W) integer label.
      resize_seed: stateless seed of the resize, shape [2].
      crop_seed: stateless seed of the crop, shape [2].
      data_config: a `fcn_tf.config.DataConfig` (see `plan_resize_crop`).
      read_window: optional `(start, size) -> (size[0], size[1], 3) image
        window` used instead of slicing `image`, e.g. a JPEG decoder that
        decodes only that window.

    Returns:
      (image float32, label) crops of size min(crop_size, resized size).
    """
    plan = plan_resize_crop(label, resize_seed, crop_seed, data_config)
    start, size = source_window(plan)
    if read_window is None:
        window = tf.slice(image, tf.concat([start, [0]], 0), tf.concat([size, [-1]], 0))
    else:
        window = read_window(start, size)
    return resample_crop(window, start, plan), plan["label"]


# ------------------------------------------------------------------ flip ---


def random_flip(image, label, seed, prob: float):
    """Flips image and label left-right together with probability `prob`.

    Args:
      image: (H, W, C) image.
      label: (H, W) label.
      seed: stateless seed, shape [2].
      prob: flip probability.

    Returns:
      (image, label), both flipped or neither.
    """
    flip = tf.random.stateless_uniform([], seed) < prob
    return tf.cond(
        flip,
        lambda: (tf.reverse(image, axis=[1]), tf.reverse(label, axis=[1])),
        lambda: (image, label),
    )


# ------------------------------------------------------ normalize + pad ---


def normalize(image, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(image - mean) / std per RGB channel, float32.

    Args:
      image: (..., 3) on the 0..255 scale.
      mean: three channel means.
      std: three channel standard deviations.
    """
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    # Broadcasting along a last axis of size 3 is ~10x slower in Eigen than
    # along rows: normalize (..., w * 3) rows with the statistics tiled w times.
    mean_row = tf.tile(tf.constant(mean, tf.float32), shape[-2:-1])
    scale_row = tf.tile(1.0 / tf.constant(std, tf.float32), shape[-2:-1])
    rows = tf.reshape(image, tf.concat([shape[:-2], [-1]], 0))
    return tf.reshape((rows - mean_row) * scale_row, shape)


def pad_to_size(image, label, size: Size, ignore_label: int):
    """Pads bottom/right to `size`: image with 0, label with `ignore_label`.

    Called after `normalize`, so the padded pixels are 0 in normalized
    space, as the reference's `Pad` after `Normalize`.

    Args:
      image: (h, w, C) with h <= size[0] and w <= size[1].
      label: (h, w) label.
      size: (H, W) output size.
      ignore_label: label padding value.

    Returns:
      (image, label) of spatial size `size` (static shape set).
    """
    shape = tf.shape(label)
    pad_h = size[0] - shape[0]
    pad_w = size[1] - shape[1]

    def pad():
        return (
            tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=0),
            tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=tf.cast(ignore_label, label.dtype)),
        )

    # Most crops are full size: skip the copy then.
    image, label = tf.cond(tf.logical_or(pad_h > 0, pad_w > 0), pad, lambda: (image, label))
    image = tf.ensure_shape(image, [size[0], size[1], image.shape[-1]])
    label = tf.ensure_shape(label, [size[0], size[1]])
    return image, label


# ------------------------------------------------------------ composites ---


def train_transform(image, label, seed, data_config, read_window=None):
    """The whole reference train augmentation for one example.

    `random_resize_crop`, `random_flip`,
    `photometric.photometric_distortion` (if `data_config.photometric`),
    `normalize`, `pad_to_size`, each with its own part of the seed.

    Args:
      image: (H, W, 3) uint8 (or float32 0..255) RGB; unused (may be None)
        when `read_window` is given.
      label: (H, W) integer label.
      seed: stateless seed of this example, shape [2].
      data_config: a `fcn_tf.config.DataConfig`.
      read_window: optional `(start, size) -> (size[0], size[1], 3) image
        window`, e.g. a JPEG decoder that decodes only that window.

    Returns:
      (image float32 (crop_h, crop_w, 3) normalized, label int32 (crop_h, crop_w)).
    """
    c = data_config
    s = tf.random.experimental.stateless_split(seed, 4)
    image, label = random_resize_crop(image, label, s[0], s[1], c, read_window=read_window)
    image, label = random_flip(image, label, s[2], c.flip_prob)
    if c.photometric:
        image = photometric.photometric_distortion(image, s[3])
    image = normalize(image, c.mean, c.std)
    image, label = pad_to_size(image, label, c.crop_size, c.ignore_label)
    return image, tf.cast(label, tf.int32)


def eval_transform(image, data_config):
    """Eval-time image transform: keep-ratio resize to `eval_target`, normalize.

    Args:
      image: (H, W, 3) uint8 (or float32 0..255) RGB.
      data_config: a `fcn_tf.config.DataConfig`.

    Returns:
      float32 (h', w', 3) normalized image.
    """
    shape = tf.shape(image)
    size = keep_ratio_size(shape[0], shape[1], data_config.eval_target)
    return normalize(resize_image(image, size), data_config.mean, data_config.std)
