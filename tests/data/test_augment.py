"""Tests of the augmentation ops, each run eagerly and inside tf.data (the fused ones against reference_ops)."""

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.config import DataConfig
from fcn_tf.data import augment, photometric
from tests.data import reference_ops

IGNORE = 255


class Runner:
    """Runs ops eagerly or as the map function of a tf.data pipeline."""

    def __init__(self, in_dataset: bool):
        self.in_dataset = in_dataset

    def __call__(self, fn, *args):
        """`fn(*args)` as numpy."""
        if not self.in_dataset:
            return tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
        # A leading dummy component lets argument-less functions run too.
        ds = tf.data.Dataset.from_tensors((0, *args)).map(lambda _, *a: fn(*a))
        return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds)))

    def many(self, fn, seeds, *args):
        """[fn(*args, seed) for seed in seeds] as numpy, one pipeline for all seeds."""
        if not self.in_dataset:
            return [self(fn, *args, s) for s in seeds]
        ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(lambda s: fn(*args, s))
        return [tf.nest.map_structure(lambda t: t.numpy(), x) for x in ds]


@pytest.fixture(params=["eager", "tf_data"])
def run(request):
    return Runner(request.param == "tf_data")


def seed(i):
    return tf.constant([i, 7], tf.int64)


def make_example(h, w, num_classes=5, rs_seed=0, ignore_share=0.1):
    rs = np.random.RandomState(rs_seed)
    image = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
    # Blocky labels (so crops see several classes) with some ignore pixels.
    blocks = rs.randint(0, num_classes, (h // 8 + 1, w // 8 + 1))
    label = np.kron(blocks, np.ones((8, 8), int))[:h, :w].astype(np.uint8)
    label[rs.uniform(size=(h, w)) < ignore_share] = IGNORE
    return tf.constant(image), tf.constant(label)


def assert_label_values(label, allowed):
    assert set(np.unique(label).tolist()) <= set(allowed), np.unique(label)


def py_keep_ratio_size(h, w, target):
    # The reference (mmcv.rescale_size) in plain Python.
    scale = min(max(target) / max(h, w), min(target) / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def cv2_nearest(label, size):
    # OpenCV INTER_NEAREST: src = min(floor(dst * src / dst_size), src - 1).
    h, w = label.shape
    rows = np.minimum(np.floor(np.arange(size[0]) * (1.0 / (size[0] / h))).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * (1.0 / (size[1] / w))).astype(int), w - 1)
    return label[rows][:, cols]


# ---------------------------------------------------------------- resize ---


@pytest.mark.parametrize(
    "hw, target, expected",
    [
        ((375, 500), (2048, 512), (512, 683)),  # VOC landscape: 512/375 rules
        ((500, 375), (2048, 512), (683, 512)),  # VOC portrait
        ((1024, 2048), (2048, 1024), (1024, 2048)),  # Cityscapes at ratio 1
        ((1024, 2048), (1024, 512), (512, 1024)),  # Cityscapes at ratio 0.5
        ((1024, 2048), (4096, 2048), (2048, 4096)),  # Cityscapes at ratio 2
        ((100, 1000), (2048, 512), (205, 2048)),  # very wide: the long side rules
        ((10, 5), (7, 7), (7, 4)),  # w * scale = 3.5 rounds half up
    ],
)
def test_keep_ratio_size(run, hw, target, expected):
    got = run(lambda: augment.keep_ratio_size(hw[0], hw[1], target))
    assert tuple(int(x) for x in got) == expected
    assert py_keep_ratio_size(*hw, target) == expected


@pytest.mark.parametrize("h, w", [(375, 500), (500, 333), (1024, 2048)])
def test_sample_resize_size_matches_reference_formula(run, h, w):
    seeds = [seed(i) for i in range(10)]
    config = DataConfig(scale_target=(2048, 512), ratio_range=(0.5, 2.0))
    sizes = run.many(lambda s: tf.stack(augment.sample_resize_size(h, w, s, config)), seeds)
    for s, got in zip(seeds, sizes):
        r = tf.random.stateless_uniform([], s, 0.5, 2.0, dtype=tf.float64).numpy()
        assert tuple(int(x) for x in got) == py_keep_ratio_size(h, w, (int(2048 * r), int(512 * r)))


def test_resize_label_is_opencv_nearest(run):
    _, label = make_example(37, 53)
    for size in [(74, 106), (20, 31), (37, 53), (100, 41)]:
        got = run(lambda lab, size=size: reference_ops.resize_label(lab, size), label)
        np.testing.assert_array_equal(got, cv2_nearest(label.numpy(), size))
        assert got.dtype == np.uint8


def test_resize_image_is_half_pixel_bilinear(run):
    image = tf.constant(np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10)
    got = run(lambda im: augment.resize_image(im, (8, 8)), image)
    assert got.dtype == np.float32 and got.shape == (8, 8, 1)
    # Half-pixel centres: output pixel 1 samples source x = 0.25 -> 0.75*a + 0.25*b.
    np.testing.assert_allclose(got[0, 1, 0], 0.75 * 0 + 0.25 * 10, atol=1e-5)
    np.testing.assert_allclose(got[0, 0, 0], 0.0, atol=1e-5)  # clamped at the border


def test_random_resize_sizes_and_labels(run):
    image, label = make_example(60, 80)
    outputs = run.many(
        lambda im, lab, s: reference_ops.random_resize(
            im, lab, s, DataConfig(scale_target=(160, 40), ratio_range=(0.5, 2.0))
        ),
        [seed(i) for i in range(5)],
        image,
        label,
    )
    for out_image, out_label in outputs:
        assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
        assert out_image.shape[:2] == out_label.shape
        assert_label_values(out_label, [0, 1, 2, 3, 4, IGNORE])


# ------------------------------------------------------------------ crop ---


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 0, 1, 1], True),
        ([0, 0, 0, 1], False),  # 0.75 is not < 0.75
        ([0, 0, 0, 0], False),  # a single class
        ([0, 1, IGNORE, IGNORE, IGNORE, IGNORE], True),  # ignore is not counted
        ([0, IGNORE, IGNORE, IGNORE], False),
        ([IGNORE] * 4, False),
        ([0, 1, 2, 0, 0, 1, 2, 3], True),
    ],
)
def test_crop_is_acceptable(run, values, expected):
    label = tf.constant(np.array(values, np.uint8).reshape(1, -1))
    got = run(lambda lab: augment.crop_is_acceptable(lab, 0.75, IGNORE), label)
    assert bool(got) is expected


def np_acceptable(crop):
    labels, counts = np.unique(crop, return_counts=True)
    counts = counts[labels != IGNORE]
    return len(counts) > 1 and counts.max() / counts.sum() < 0.75


def crop_offsets(run, label, crop, seeds, tries, ratio=0.75):
    """[(offset_h, offset_w, crop_h, crop_w) chosen by `choose_crop` for each seed]."""
    h, w = label.shape
    config = DataConfig(crop_size=crop, cat_max_ratio=ratio, crop_tries=tries, ignore_label=IGNORE)

    def fn(lab, s):
        oy, ox, ch, cw = augment.choose_crop(
            h, w, s, lambda oy, ox, ch, cw: lab[oy : oy + ch, ox : ox + cw], config
        )
        return tf.stack([oy, ox, ch, cw])

    return [tuple(int(x) for x in out) for out in run.many(fn, seeds, tf.constant(label))]


def test_crop_rule_keeps_first_acceptable_draw_else_last(run):
    # Left 50 columns class 0, right 30 columns class 1: a 40-wide crop is
    # acceptable for about half the offsets, so some seeds accept at the first
    # draw, some later, and the rule is checked against numpy for each.
    label = np.zeros((40, 80), np.uint8)
    label[:, 50:] = 1
    seeds = [seed(i) for i in range(12)]
    # With a ratio nothing can satisfy, `tries=k` returns the k-th draw.
    draws_by_k = [crop_offsets(run, label, (40, 40), seeds, k, ratio=1e-9) for k in range(1, 11)]
    chosen = crop_offsets(run, label, (40, 40), seeds, 10)
    accepted_late = 0
    for i in range(len(seeds)):
        draws = [d[i] for d in draws_by_k]
        ok = [np_acceptable(label[oy : oy + ch, ox : ox + cw]) for oy, ox, ch, cw in draws]
        expected = draws[ok.index(True)] if any(ok) else draws[-1]
        assert chosen[i] == expected
        accepted_late += any(ok) and not ok[0]
    assert accepted_late > 0  # the retry path is exercised


def test_crop_rule_makes_crops_acceptable(run):
    # Most crops of this label are a single class; with the rule nearly all
    # chosen crops satisfy it, without it (1 try) most do not.
    label = np.zeros((100, 100), np.uint8)
    label[40:70, 40:70] = 1
    label[:, :5] = IGNORE
    seeds = [seed(i) for i in range(30)]
    with_rule = [
        np_acceptable(label[a : a + c, b : b + d])
        for a, b, c, d in crop_offsets(run, label, (30, 30), seeds, 10)
    ]
    without = [
        np_acceptable(label[a : a + c, b : b + d])
        for a, b, c, d in crop_offsets(run, label, (30, 30), seeds, 1)
    ]
    assert sum(with_rule) > 20 and sum(without) < 15, (sum(with_rule), sum(without))


def test_crop_falls_back_after_crop_tries(run):
    label = np.full((50, 60), 3, np.uint8)  # one class: nothing is acceptable
    seeds = [seed(i) for i in range(3)]
    last = crop_offsets(run, label, (20, 20), seeds, 10, ratio=1e-9)
    assert crop_offsets(run, label, (20, 20), seeds, 10) == last
    assert crop_offsets(run, label, (20, 20), seeds, 1) != last  # the 1st and 10th draws differ


def test_crop_ratio_one_keeps_first_draw(run):
    label = np.full((50, 60), 3, np.uint8)
    seeds = [seed(0), seed(1)]
    assert crop_offsets(run, label, (20, 20), seeds, 10, ratio=1.0) == crop_offsets(
        run, label, (20, 20), seeds, 1, ratio=1e-9
    )


def crop_config(crop, target=(2048, 512)):
    return DataConfig(
        crop_size=crop,
        scale_target=target,
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        crop_tries=10,
        ignore_label=IGNORE,
    )


def test_random_crop_sizes_offsets_and_labels(run):
    image, label = make_example(30, 70)
    outputs = run.many(
        lambda im, lab, s: reference_ops.random_crop(im, lab, s, crop_config((48, 48))),
        [seed(i) for i in range(5)],
        image,
        label,
    )
    for out_image, out_label in outputs:
        # Crop size is min(crop, size): 30 rows kept whole, 48 of 70 columns.
        assert out_image.shape == (30, 48, 3) and out_label.shape == (30, 48)
        assert out_label.dtype == np.uint8
        assert_label_values(out_label, [0, 1, 2, 3, 4, IGNORE])
        # The crop is a window of the input at a column offset in [0, 22].
        matches = [ox for ox in range(23) if np.array_equal(label.numpy()[:, ox : ox + 48], out_label)]
        assert any(np.array_equal(image.numpy()[:, ox : ox + 48], out_image) for ox in matches)


@pytest.mark.parametrize(
    "hw, target, crop",
    [
        ((60, 80), (160, 40), (48, 48)),
        ((33, 90), (200, 100), (64, 32)),
        ((100, 120), (600, 500), (48, 40)),  # 5x upscale: the source window is a small part
    ],
)
def test_fused_resize_crop_equals_resize_then_crop(run, hw, target, crop):
    image, label = make_example(*hw)
    config = crop_config(crop, target)

    def separate(im, lab, s):
        im, lab = reference_ops.random_resize(im, lab, s[0], config)
        return reference_ops.random_crop(im, lab, s[1], config)

    def fused(im, lab, s):
        return augment.random_resize_crop(im, lab, s[0], s[1], config)

    seeds = [tf.stack([seed(i), seed(100 + i)]) for i in range(8)]
    for (ref_image, ref_label), (got_image, got_label) in zip(
        run.many(separate, seeds, image, label), run.many(fused, seeds, image, label)
    ):
        np.testing.assert_array_equal(got_label, ref_label)
        assert got_image.shape == ref_image.shape
        np.testing.assert_allclose(got_image, ref_image, atol=0.02)


def test_source_window_covers_the_taps(run):
    # 100x120 -> about 500x600: a 48x40 crop reads ~10x8 source pixels.
    _, label = make_example(100, 120)

    def fn(lab, s):
        config = DataConfig(crop_size=(48, 40), scale_target=(600, 500), ratio_range=(1.0, 1.0))
        plan = augment.plan_resize_crop(lab, s, s + 1, config)
        start, size = augment.source_window(plan)
        return tf.concat([start, size, plan["offset"], plan["resized_size"]], 0)

    for out in run.many(fn, [seed(i) for i in range(5)], label):
        y0, x0, wh, ww, oy, ox, nh, nw = (int(v) for v in out)
        assert wh < 20 and ww < 20
        # Every sample position and its bottom/right neighbour is inside.
        fy = (oy + np.arange(48) + 0.5) * 100 / nh - 0.5
        fx = (ox + np.arange(40) + 0.5) * 120 / nw - 0.5
        assert y0 <= max(np.floor(fy.min()), 0) and min(np.floor(fy.max()) + 1, 99) < y0 + wh
        assert x0 <= max(np.floor(fx.min()), 0) and min(np.floor(fx.max()) + 1, 119) < x0 + ww


# ------------------------------------------------------------------ flip ---


def test_flip_flips_image_and_label_together(run):
    image, label = make_example(12, 17)
    flipped_image, flipped_label = run(
        lambda im, lab, s: augment.random_flip(im, lab, s, 1.0), image, label, seed(0)
    )
    np.testing.assert_array_equal(flipped_image, image.numpy()[:, ::-1])
    np.testing.assert_array_equal(flipped_label, label.numpy()[:, ::-1])
    same_image, same_label = run(
        lambda im, lab, s: augment.random_flip(im, lab, s, 0.0), image, label, seed(0)
    )
    np.testing.assert_array_equal(same_image, image.numpy())
    np.testing.assert_array_equal(same_label, label.numpy())
    flips = 0
    outputs = run.many(
        lambda im, lab, s: augment.random_flip(im, lab, s, 0.5), [seed(i) for i in range(40)], image, label
    )
    for im, lab in outputs:
        flipped = np.array_equal(lab, label.numpy()[:, ::-1])
        np.testing.assert_array_equal(im, image.numpy()[:, ::-1] if flipped else image.numpy())
        flips += flipped
    assert 8 < flips < 32


# ----------------------------------------------------------- photometric ---


def test_photometric_keeps_shape_dtype_range(run):
    image, _ = make_example(16, 24)
    outputs = run.many(
        lambda im, s: photometric.photometric_distortion(tf.cast(im, tf.float32) + 0.3, s),
        [seed(i) for i in range(12)],
        image,
    )
    for out in outputs:
        assert out.shape == (16, 24, 3) and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, np.round(out))  # integer values, as the uint8 reference
    # Different seeds distort differently.
    assert len({o.tobytes() for o in outputs}) > 6


def test_photometric_is_colour_consistent_on_gray(run):
    # Saturation and hue do not change a gray image; brightness/contrast act
    # on every channel alike, so gray stays gray.
    gray = tf.constant(np.repeat(np.linspace(0, 255, 48, dtype=np.float32).reshape(6, 8, 1), 3, axis=2))
    for out in run.many(photometric.photometric_distortion, [seed(i) for i in range(8)], gray):
        np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1)
        np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1)


def test_photometric_brightness_clips_and_truncates(run):
    # With every other step off: brightness only (coins come from fixed seeds,
    # so find a seed where the image changed by a uniform shift + clip).
    image = tf.constant(np.array([[[0.0, 100.0, 250.0]]], np.float32))
    out = run(lambda im, s: photometric._convert(im, beta=10.7), image, seed(0))
    np.testing.assert_array_equal(out, [[[10.0, 110.0, 255.0]]])
    out = run(lambda im, s: photometric._convert(im, alpha=1.5), image, seed(0))
    np.testing.assert_array_equal(out, [[[0.0, 150.0, 255.0]]])


def test_saturation_and_hue_work_on_0_255_scale(run):
    # The fused TF ops must not assume a 0..1 range.
    image = tf.constant(np.random.RandomState(1).uniform(0, 255, (8, 8, 3)).astype(np.float32))
    got = run(lambda im: tf.image.adjust_saturation(im, 1.4), image)
    ref = run(lambda im: 255 * tf.image.adjust_saturation(im / 255, 1.4), image)
    np.testing.assert_allclose(got, ref, atol=1e-3)
    got = run(lambda im: tf.image.adjust_hue(im, 10 / 180), image)
    ref = run(lambda im: 255 * tf.image.adjust_hue(im / 255, 10 / 180), image)
    np.testing.assert_allclose(got, ref, atol=1e-3)


# ------------------------------------------------------ normalize + pad ---


def test_normalize(run):
    image = tf.constant(np.array([[[123.675, 116.28, 103.53], [0, 0, 0]]], np.float32))
    out = run(lambda im: augment.normalize(im, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)), image)
    np.testing.assert_allclose(out[0, 0], 0, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375], rtol=1e-6)


def test_pad_values(run):
    image = tf.fill([3, 5, 3], 1.5)
    label = tf.fill([3, 5], tf.constant(2, tf.uint8))
    out_image, out_label = run(lambda im, lab: augment.pad_to_size(im, lab, (6, 7), IGNORE), image, label)
    assert out_image.shape == (6, 7, 3) and out_label.shape == (6, 7) and out_label.dtype == np.uint8
    np.testing.assert_array_equal(out_image[:3, :5], 1.5)
    np.testing.assert_array_equal(out_image[3:], 0)
    np.testing.assert_array_equal(out_image[:, 5:], 0)
    np.testing.assert_array_equal(out_label[:3, :5], 2)
    np.testing.assert_array_equal(out_label[3:], IGNORE)
    np.testing.assert_array_equal(out_label[:, 5:], IGNORE)


# ------------------------------------------------------------ composites ---


def small_config(**kw):
    values = dict(crop_size=(48, 64), scale_target=(96, 48), ratio_range=(0.5, 2.0))
    values.update(kw)
    return DataConfig(**values)


def _train_outputs(run, config, image, label, count):
    # train_transform under `count` seeds, eagerly or in tf.data as `run` says.
    return run.many(
        lambda im, lab, s: augment.train_transform(im, lab, s, config),
        [seed(i) for i in range(count)],
        image,
        label,
    )


def test_train_transform_output_and_labels(run):
    image, label = make_example(50, 70)
    config = small_config()
    outputs = _train_outputs(run, config, image, label, 6)
    for out_image, out_label in outputs:
        assert out_image.shape == (48, 64, 3) and out_image.dtype == np.float32
        assert out_label.shape == (48, 64) and out_label.dtype == np.int32
        assert_label_values(out_label, [0, 1, 2, 3, 4, IGNORE])


def test_train_transform_is_the_composition_of_the_ops(run):
    # train_transform plans the crop and reads a source window; it must equal
    # chaining the separately tested ops with the same seeds.
    image, label = make_example(50, 70)
    config = small_config()

    def composed(im, lab, seed):
        s = tf.random.experimental.stateless_split(seed, 4)
        im, lab = reference_ops.random_resize(im, lab, s[0], config)
        im, lab = reference_ops.random_crop(im, lab, s[1], config)
        im, lab = augment.random_flip(im, lab, s[2], 0.5)
        im = photometric.photometric_distortion(im, s[3])
        im = augment.normalize(im, config.mean, config.std)
        return augment.pad_to_size(im, lab, config.crop_size, IGNORE)

    seeds = [seed(i) for i in range(8)]
    fast = run.many(lambda im, lab, s: augment.train_transform(im, lab, s, config), seeds, image, label)
    slow = run.many(composed, seeds, image, label)
    for (image_a, label_a), (image_b, label_b) in zip(fast, slow):
        np.testing.assert_array_equal(label_a, label_b)
        # Resampling differs by float rounding (< 0.02 of 255); the photometric
        # steps floor/round to integers, so a rare pixel lands one step apart,
        # which an HSV step can turn into two. A misplaced crop would differ
        # almost everywhere.
        diff = np.abs(image_a - image_b) * np.array(config.std)
        assert np.mean(diff < 0.05) > 0.99 and diff.max() <= 3.0


def test_train_transform_pads_small_images(run):
    # The resized image (at most 24x34 here) is smaller than the crop: padded
    # image pixels are exactly 0 after normalization, padded labels 255.
    image, label = make_example(50, 70, ignore_share=0.0)
    config = small_config(scale_target=(34, 24), ratio_range=(0.5, 1.0))
    outputs = _train_outputs(run, config, image, label, 4)
    for out_image, out_label in outputs:
        rows = np.flatnonzero((out_label != IGNORE).any(axis=1))
        cols = np.flatnonzero((out_label != IGNORE).any(axis=0))
        h, w = rows.max() + 1, cols.max() + 1
        assert h <= 24 and w <= 34
        assert (out_label[:h, :w] != IGNORE).all()
        np.testing.assert_array_equal(out_label[h:], IGNORE)
        np.testing.assert_array_equal(out_label[:, w:], IGNORE)
        np.testing.assert_array_equal(out_image[h:], 0.0)
        np.testing.assert_array_equal(out_image[:, w:], 0.0)
        assert np.abs(out_image[:h, :w]).min() >= 0.0 and (out_image[:h, :w] != 0).mean() > 0.9


def test_photometric_does_not_touch_labels(run):
    image, label = make_example(50, 70)
    seeds = [seed(i) for i in range(4)]
    with_photo = run.many(
        lambda im, lab, s: augment.train_transform(im, lab, s, small_config()), seeds, image, label
    )
    without = run.many(
        lambda im, lab, s: augment.train_transform(im, lab, s, small_config(photometric=False)),
        seeds,
        image,
        label,
    )
    for (image_a, label_a), (image_b, label_b) in zip(with_photo, without):
        np.testing.assert_array_equal(label_a, label_b)
        assert not np.array_equal(image_a, image_b)


def test_eval_transform_size(run):
    image, _ = make_example(375, 500)
    out = run(lambda im: augment.eval_transform(im, DataConfig()), image)
    assert out.shape == (512, 683, 3) and out.dtype == np.float32
