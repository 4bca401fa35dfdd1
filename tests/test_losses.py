"""Pixel cross-entropy: ignore pixels, per-pixel (not per-image) mean, aux weight, float32."""

import numpy as np
import tensorflow as tf

from fcn_tf.losses import cross_entropy_sum, global_valid_pixel_count, segmentation_losses


def reference_mean_ce(logits, labels, ignore=255):
    """Numpy per-pixel mean over valid pixels, as PyTorch's CrossEntropyLoss(ignore_index=255)."""
    logits = logits.astype(np.float64)
    log_probs = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    valid = labels != ignore
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return -(picked[valid]).sum() / valid.sum()


def make(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 5, 6, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, size=(2, 5, 6)).astype(np.int32)
    labels[0, :4] = 255  # image 0 mostly ignored: per-image mean != per-pixel mean
    return logits, labels


def test_main_loss_is_per_pixel_mean_over_valid_pixels():
    logits, labels = make()
    count = global_valid_pixel_count(tf.constant(labels), 255)
    assert float(count) == (labels != 255).sum()
    out = segmentation_losses({"logits": tf.constant(logits)}, tf.constant(labels), count, 255, 0.4)
    np.testing.assert_allclose(float(out["main"]), reference_mean_ce(logits, labels), rtol=1e-5)
    per_image = np.mean([reference_mean_ce(logits[i : i + 1], labels[i : i + 1]) for i in range(2)])
    assert abs(float(out["main"]) - per_image) > 1e-3


def test_aux_weight_and_total():
    logits, labels = make(1)
    aux = logits[..., ::-1].copy()
    count = global_valid_pixel_count(tf.constant(labels), 255)
    out = segmentation_losses(
        {"logits": tf.constant(logits), "aux_logits": tf.constant(aux)}, tf.constant(labels), count, 255, 0.4
    )
    np.testing.assert_allclose(float(out["aux"]), reference_mean_ce(aux, labels), rtol=1e-5)
    np.testing.assert_allclose(float(out["total"]), float(out["main"]) + 0.4 * float(out["aux"]), rtol=1e-6)


def test_ignored_pixels_have_no_gradient_and_all_ignored_is_zero():
    logits, labels = make(2)
    x = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = cross_entropy_sum(x, tf.constant(labels), 255)
    grad = tape.gradient(loss, x).numpy()
    assert np.all(grad[labels == 255] == 0)
    assert np.any(grad[labels != 255] != 0)
    ignored = np.full_like(labels, 255)
    out = segmentation_losses(
        {"logits": tf.constant(logits)}, tf.constant(ignored), tf.constant(0.0), 255, 0.4
    )
    assert float(out["total"]) == 0.0


def test_loss_is_float32_under_low_precision_logits():
    logits, labels = make(3)
    out = segmentation_losses(
        {"logits": tf.constant(logits, tf.bfloat16)}, tf.constant(labels), tf.constant(10.0), 255, 0.4
    )
    assert out["main"].dtype == tf.float32


def test_shares_sum_to_global_mean():
    """Each shard divides its sum by the global count: the shards add up to the whole-batch mean."""
    logits, labels = make(4)
    total_count = tf.constant(float((labels != 255).sum()))
    shares = [
        segmentation_losses(
            {"logits": tf.constant(logits[i : i + 1])}, tf.constant(labels[i : i + 1]), total_count, 255, 0
        )["main"]
        for i in range(2)
    ]
    np.testing.assert_allclose(float(sum(shares)), reference_mean_ce(logits, labels), rtol=1e-5)
