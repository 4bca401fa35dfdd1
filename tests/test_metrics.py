"""ConfusionMatrix and confusion_matrix_update against a plain numpy reference."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.metrics import ConfusionMatrix, confusion_matrix_update, format_table

IGNORE = 255


def numpy_confusion(labels, predictions, num_classes, ignore=IGNORE):
    """The obvious double loop: the independent reference."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for label, pred in zip(labels.reshape(-1), predictions.reshape(-1), strict=True):
        if label != ignore:
            cm[label, pred] += 1
    return cm


def random_batch(rng, shape, num_classes, ignore_share=0.2):
    labels = rng.integers(0, num_classes, shape)
    labels[rng.random(shape) < ignore_share] = IGNORE
    predictions = rng.integers(0, num_classes, shape)
    return labels, predictions


def test_matches_numpy_reference_with_ignore_pixels():
    rng = np.random.default_rng(0)
    labels, predictions = random_batch(rng, (3, 17, 23), 6)
    expected = numpy_confusion(labels, predictions, 6)
    assert expected.sum() < labels.size  # ignore pixels were really dropped

    cm = ConfusionMatrix(6).update(labels, predictions)
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64

    tf_cm = confusion_matrix_update(tf.constant(labels, tf.int32), tf.constant(predictions), 6, IGNORE)
    assert tf_cm.dtype == tf.int64
    np.testing.assert_array_equal(tf_cm.numpy(), expected)

    graph_cm = tf.function(lambda lab, pred: confusion_matrix_update(lab, pred, 6, IGNORE))(
        tf.constant(labels, tf.uint8), tf.constant(predictions, tf.int64)
    )
    np.testing.assert_array_equal(graph_cm.numpy(), expected)

    # The metrics, recomputed by hand from the reference matrix.
    result = cm.result()
    tp = np.diag(expected)
    iou = tp / (expected.sum(0) + expected.sum(1) - tp)
    np.testing.assert_allclose(result["iou"], iou)
    np.testing.assert_allclose(result["miou"], iou.mean())
    np.testing.assert_allclose(result["acc"], tp / expected.sum(1))
    np.testing.assert_allclose(result["aacc"], tp.sum() / expected.sum())
    np.testing.assert_allclose(result["dice"], 2 * tp / (expected.sum(0) + expected.sum(1)))
    assert result["num_pixels"] == expected.sum()


def test_streaming_equals_one_pass_and_merge():
    rng = np.random.default_rng(1)
    labels, predictions = random_batch(rng, (8, 9, 11), 5)
    one_pass = ConfusionMatrix(5).update(labels, predictions)
    streamed = ConfusionMatrix(5)
    for i in range(0, 8, 3):  # uneven batches, tensors and arrays mixed
        streamed.update(tf.constant(labels[i : i + 3]), predictions[i : i + 3])
    np.testing.assert_array_equal(streamed.matrix, one_pass.matrix)

    first = ConfusionMatrix(5).update(labels[:5], predictions[:5])
    second = ConfusionMatrix(5).add_counts(confusion_matrix_update(labels[5:], predictions[5:], 5))
    np.testing.assert_array_equal((first + second).matrix, one_pass.matrix)
    np.testing.assert_array_equal(first.merge(second).matrix, one_pass.matrix)
    assert one_pass.result()["miou"] == streamed.result()["miou"]

    streamed.reset()
    assert streamed.matrix.sum() == 0
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(ConfusionMatrix(4))


def test_absent_class_rule():
    # Class 0: labelled and predicted. Class 1: labelled, never predicted (IoU 0).
    # Class 2: predicted, never labelled (IoU 0). Class 3: absent from both (nan, skipped).
    # The prediction 3 sits on an ignore pixel, so it must not make class 3 present.
    labels = np.array([0, 0, 1, 1, 0, IGNORE])
    predictions = np.array([0, 0, 0, 0, 2, 3])
    result = ConfusionMatrix(4).update(labels, predictions).result()
    np.testing.assert_allclose(result["iou"][:3], [2 / 5, 0.0, 0.0])
    assert np.isnan(result["iou"][3])
    np.testing.assert_allclose(result["miou"], (2 / 5 + 0 + 0) / 3)
    # Accuracy: over labelled classes only (class 2 and 3 never labelled).
    np.testing.assert_allclose(result["acc"][:2], [2 / 3, 0.0])
    assert np.isnan(result["acc"][2]) and np.isnan(result["acc"][3])
    np.testing.assert_allclose(result["macc"], (2 / 3) / 2)
    np.testing.assert_allclose(result["aacc"], 2 / 5)

    empty = ConfusionMatrix(3).result()
    assert np.isnan(empty["miou"]) and np.isnan(empty["aacc"]) and empty["num_pixels"] == 0


def test_out_of_range_values_are_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label value 3 .* ignore label 255"):
        cm.update(np.array([0, 3]), np.array([0, 0]))
    with pytest.raises(ValueError, match="label value -1"):
        cm.update(np.array([0, -1]), np.array([0, 0]))
    with pytest.raises(ValueError, match="prediction value 5"):
        cm.update(np.array([0, 1]), np.array([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3)), np.zeros((3, 2)))
    assert cm.matrix.sum() == 0  # nothing half-counted
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes=3"):
        confusion_matrix_update(tf.constant([0, 4]), tf.constant([0, 0]), 3)

    @tf.function
    def graph(labels, predictions):
        return confusion_matrix_update(labels, predictions, 3)

    with pytest.raises(tf.errors.InvalidArgumentError, match="num_classes=3"):
        graph(tf.constant([1, 7]), tf.constant([0, 0]))
    # The ignore label is not out of range.
    np.testing.assert_array_equal(graph(tf.constant([1, IGNORE]), tf.constant([2, 2])).numpy()[1], [0, 0, 1])


def test_format_table_names_and_nan():
    result = ConfusionMatrix(3).update(np.array([0, 1]), np.array([0, 1])).result()
    table = format_table(result, ["sky", "road", "person"])
    assert "road" in table and "100.00" in table and "nan" in table and "mIoU 100.00" in table
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        format_table(result, ["a", "b"])


_TWO_REPLICAS = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from fcn_tf.metrics import confusion_matrix_update

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (6, 5, 7)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = 255
    predictions = rng.integers(0, 4, (6, 5, 7)).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((labels, predictions)).batch(3)

    def total(strategy):
        dist = strategy.experimental_distribute_dataset(data)

        @tf.function
        def step(batch):
            per_replica = strategy.run(lambda l, p: confusion_matrix_update(l, p, 4), args=batch)
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        return sum(step(b).numpy() for b in dist)

    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert two.num_replicas_in_sync == 2
    one = tf.distribute.get_strategy()
    a, b = total(two), total(one)
    assert a.dtype == np.int64, a.dtype
    np.testing.assert_array_equal(a, b)
    assert a.sum() == (labels != 255).sum()
    print("OK", a.sum())
    """
)


def test_two_logical_cpus_equal_one():
    # Logical devices must be configured before TensorFlow initializes: fresh process.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_REPLICAS], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_counts_for_op_determinism_on_accelerators_equal_bincount(monkeypatch):
    from fcn_tf import devices

    rng = np.random.default_rng(5)
    cases = [
        (rng.integers(0, 7, (3, 31, 17)), rng.integers(0, 7, (3, 31, 17)), 7),
        (np.full((2, 4), 255), np.zeros((2, 4)), 3),  # every pixel ignored
        (rng.integers(0, 150, (1, 64, 64)), rng.integers(0, 150, (1, 64, 64)), 150),
    ]
    for labels, predictions, num_classes in cases:
        labels[rng.random(labels.shape) < 0.1] = 255
        monkeypatch.setattr(devices, "deterministic_accelerator", lambda: False)
        want = confusion_matrix_update(labels, predictions, num_classes).numpy()
        monkeypatch.setattr(devices, "deterministic_accelerator", lambda: True)
        got = tf.function(lambda a, b, c=num_classes: confusion_matrix_update(a, b, c))(labels, predictions)
        assert got.dtype == tf.int64
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_array_equal(want, ConfusionMatrix(num_classes).update(labels, predictions).matrix)
