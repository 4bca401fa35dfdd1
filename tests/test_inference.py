"""Whole, sliding-window and multi-scale + flip inference on tiny fake models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.config import EvalConfig
from fcn_tf.inference import (
    model_logits_fn,
    predict,
    predict_multiscale,
    predict_slide,
    predict_whole,
    scaled_size,
    window_starts,
)

C = 4
rng = np.random.default_rng(0)
_KERNEL = tf.constant(rng.normal(size=(3, C)), tf.float32)


def per_pixel(x):
    """A 1x1 convolution: each pixel's logits depend on that pixel only."""
    return tf.einsum("nhwc,ck->nhwk", x, _KERNEL)


def contextual(x):
    """Per-pixel logits plus the window's mean: the result depends on the window."""
    logits = per_pixel(x)
    return logits + tf.reduce_mean(logits, axis=[1, 2], keepdims=True) * 3.0


def symmetric(x):
    """Flip-symmetric and not per-pixel: a 3x3 box blur of per-pixel logits."""
    logits = per_pixel(x)
    return tf.nn.avg_pool2d(logits, 3, 1, "SAME") + tf.reduce_mean(logits, axis=[1, 2], keepdims=True)


def position(x):
    """Not flip-symmetric: adds a left-to-right ramp to class 0."""
    logits = per_pixel(x)
    w = tf.shape(x)[2]
    ramp = tf.cast(tf.range(w), tf.float32)[None, None, :, None] * tf.one_hot(0, C)
    return logits + ramp


def image(h, w, n=1, seed=1):
    return tf.constant(np.random.default_rng(seed).normal(size=(n, h, w, 3)), tf.float32)


def mmseg_slide_reference(logits_fn, img, crop, stride):
    """mmsegmentation's slide_inference loops in numpy, with padding of small images to the crop."""
    img = img.numpy()
    n, h, w, _ = img.shape
    (ch, cw), (sh, sw) = crop, stride
    ph, pw = max(h, ch), max(w, cw)
    padded = np.zeros((n, ph, pw, 3), np.float32)
    padded[:, :h, :w] = img
    preds = np.zeros((n, ph, pw, C), np.float64)
    count = np.zeros((ph, pw))
    h_grids = max(ph - ch + sh - 1, 0) // sh + 1
    w_grids = max(pw - cw + sw - 1, 0) // sw + 1
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * sh, wi * sw
            y2, x2 = min(y1 + ch, ph), min(x1 + cw, pw)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            preds[:, y1:y2, x1:x2] += logits_fn(tf.constant(padded[:, y1:y2, x1:x2])).numpy()
            count[y1:y2, x1:x2] += 1
    assert (count > 0).all()
    return (preds / count[None, :, :, None])[:, :h, :w]


def test_window_starts_match_mmseg_rule():
    for size, crop, stride in [(100, 32, 21), (32, 32, 21), (33, 32, 21), (512, 512, 341), (1024, 512, 341)]:
        grids = max(size - crop + stride - 1, 0) // stride + 1
        expected = [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]
        assert window_starts(size, crop, stride).numpy().tolist() == expected
    assert window_starts(100, 32, 21).numpy().tolist() == [0, 21, 42, 63, 68]


def test_whole_output_has_original_label_size_for_non_square_inputs():
    x = image(6, 10)
    out = predict_whole(per_pixel, x, (13, 21))
    assert out.shape == (1, 13, 21, C)
    # Half-pixel bilinear resize of the logits, nothing else.
    np.testing.assert_allclose(out, tf.image.resize(per_pixel(x), (13, 21)), rtol=1e-6)
    # Same size: the logits themselves.
    np.testing.assert_allclose(predict_whole(per_pixel, x, (6, 10)), per_pixel(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "size,crop,stride,window_batch",
    [((20, 37), (8, 12), (5, 7), 3), ((9, 9), (9, 9), (6, 6), 1), ((17, 30), (16, 16), (16, 16), 4)],
)
def test_slide_matches_mmseg_loops(size, crop, stride, window_batch):
    x = image(*size, n=2)
    out = predict_slide(contextual, x, size, crop, stride, window_batch, C)
    expected = mmseg_slide_reference(contextual, x, crop, stride)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    # The window context matters for this model: with several windows a whole-image run differs.
    several = size[0] > crop[0] or size[1] > crop[1]
    assert several != np.allclose(predict_whole(contextual, x, size).numpy(), expected, atol=1e-3)


def test_slide_on_image_smaller_than_crop():
    x = image(5, 7)
    out = predict_slide(contextual, x, (11, 13), (8, 12), (4, 6), 2, C)
    assert out.shape == (1, 11, 13, C)
    np.testing.assert_allclose(
        out,
        tf.image.resize(mmseg_slide_reference(contextual, x, (8, 12), (4, 6)), (11, 13)),
        rtol=1e-5,
        atol=1e-5,
    )
    # A per-pixel model cannot see the padding: slide == whole.
    np.testing.assert_allclose(
        predict_slide(per_pixel, x, (11, 13), (8, 12), (4, 6), 2, C),
        predict_whole(per_pixel, x, (11, 13)),
        rtol=1e-5,
        atol=1e-5,
    )
    # Smaller along one axis only.
    x = image(5, 30)
    np.testing.assert_allclose(
        predict_slide(per_pixel, x, (5, 30), (8, 12), (4, 6), 2, C), per_pixel(x), rtol=1e-5, atol=1e-5
    )


def test_slide_with_per_pixel_model_equals_whole():
    x = image(23, 41)
    whole = predict_whole(per_pixel, x, (30, 50))
    slide = predict_slide(per_pixel, x, (30, 50), (10, 16), (7, 9), 4, C)
    np.testing.assert_allclose(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_in_tf_function_traces_once_for_all_sizes():
    fn = tf.function(
        lambda x, size: predict_slide(contextual, x, size, (8, 12), (5, 7), 3, C),
        input_signature=[tf.TensorSpec((None, None, None, 3)), tf.TensorSpec((2,), tf.int32)],
    )
    for size in [(20, 37), (5, 7), (12, 12)]:
        x = image(*size)
        np.testing.assert_allclose(
            fn(x, tf.constant(size)), predict_slide(contextual, x, size, (8, 12), (5, 7), 3, C), rtol=1e-6
        )
    assert fn.experimental_get_tracing_count() == 1


def test_flip_averaging_of_symmetric_model_changes_nothing():
    x = image(9, 14)
    plain = tf.nn.softmax(predict_whole(symmetric, x, (12, 17)))
    flipped = predict_multiscale(symmetric, x, (12, 17), scales=(1.0,), flip=True)
    np.testing.assert_allclose(flipped, plain, rtol=1e-5, atol=1e-6)
    # ... whereas an asymmetric model does change: the flip is really applied.
    plain = tf.nn.softmax(predict_whole(position, x, (12, 17)))
    flipped = predict_multiscale(position, x, (12, 17), scales=(1.0,), flip=True)
    assert np.abs(flipped.numpy() - plain.numpy()).max() > 0.1
    # Slide mode with flips, symmetric model: unchanged too.
    slide = predict_multiscale(
        symmetric, x, (12, 17), flip=True, mode="slide", crop_size=(6, 6), stride=(4, 4), num_classes=C
    )
    plain = tf.nn.softmax(predict_slide(symmetric, x, (12, 17), (6, 6), (4, 4), 4, C))
    np.testing.assert_allclose(slide, plain, rtol=1e-5, atol=1e-6)


def test_multiscale_with_scale_one_equals_whole():
    x = image(9, 14)
    whole = predict_whole(contextual, x, (18, 20))
    multi = predict_multiscale(contextual, x, (18, 20), scales=(1.0,), flip=False)
    np.testing.assert_allclose(multi, tf.nn.softmax(whole), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(tf.argmax(multi, -1), tf.argmax(whole, -1))


def test_multiscale_averages_probabilities_of_each_scale():
    x = image(10, 15)
    out = predict_multiscale(contextual, x, (10, 15), scales=(0.5, 1.0, 1.5), flip=True)
    assert out.shape == (1, 10, 15, C)
    np.testing.assert_allclose(tf.reduce_sum(out, -1), 1.0, rtol=1e-5)
    expected = 0
    for s in (0.5, 1.0, 1.5):
        size = (int(10 * s + 0.5), int(15 * s + 0.5))
        scaled = tf.image.resize(x, size) if s != 1.0 else x
        expected += tf.nn.softmax(predict_whole(contextual, scaled, (10, 15)))
        expected += tf.reverse(
            tf.nn.softmax(predict_whole(contextual, tf.reverse(scaled, [2]), (10, 15))), [2]
        )
    np.testing.assert_allclose(out, expected / 6, rtol=1e-5, atol=1e-6)
    assert scaled_size(tf.constant([375, 500]), 0.75).numpy().tolist() == [281, 375]


def test_predict_dispatches_on_eval_config():
    x = image(11, 13)
    np.testing.assert_allclose(
        predict(contextual, x, (7, 9), EvalConfig(), C), predict_whole(contextual, x, (7, 9))
    )
    slide = EvalConfig(mode="slide", crop_size=(8, 8), stride=(5, 5), window_batch=2)
    np.testing.assert_allclose(
        predict(contextual, x, (7, 9), slide, C), predict_slide(contextual, x, (7, 9), (8, 8), (5, 5), 2, C)
    )
    tta = EvalConfig(mode="slide", crop_size=(8, 8), stride=(5, 5), scales=(0.75, 1.0), flip=True)
    np.testing.assert_allclose(
        predict(contextual, x, (7, 9), tta, C),
        predict_multiscale(contextual, x, (7, 9), (0.75, 1.0), True, "slide", (8, 8), (5, 5), 4, C),
    )
    with pytest.raises(ValueError, match="mode"):
        predict(contextual, x, (7, 9), EvalConfig(mode="tiles"), C)


def test_model_logits_fn_reads_dict_output_in_inference_mode():
    inputs = keras.Input((None, None, 3))
    dropped = keras.layers.Dropout(0.99)(keras.layers.Conv2D(C, 1)(inputs))
    model = keras.Model(inputs, {"logits": dropped})
    x = image(4, 6)
    fn = model_logits_fn(model)
    np.testing.assert_allclose(fn(x), fn(x))  # dropout off: deterministic
    assert fn(x).dtype == tf.float32 and fn(x).shape == (1, 4, 6, C)


@pytest.mark.parametrize(
    "size,crop,stride,window_batch",
    [((20, 37), (8, 12), (5, 7), 3), ((9, 9), (9, 9), (6, 6), 1), ((5, 7), (8, 12), (4, 6), 2)],
)
def test_slide_accumulation_for_op_determinism_on_accelerators_is_bit_identical(
    size, crop, stride, window_batch, monkeypatch
):
    from fcn_tf import devices

    x = image(*size, n=2)

    def run(x):
        return predict_slide(contextual, x, size, crop, stride, window_batch, C)

    scattered = tf.function(run)(x).numpy()
    monkeypatch.setattr(devices, "deterministic_accelerator", lambda: True)
    # A fresh trace (the decision is taken when tracing), and eagerly.
    for ordered in (tf.function(run)(x), run(x)):
        np.testing.assert_array_equal(ordered.numpy(), scattered)
    graph = tf.function(run).get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types |= {node.op for node in function.node_def}
    assert "TensorScatterAdd" not in types and "TensorStridedSliceUpdate" in types
