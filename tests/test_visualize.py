"""Colourized label maps and overlays."""

import numpy as np
import pytest

from fcn_tf import visualize

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)


def test_colorize_maps_classes_and_marks_non_classes():
    labels = np.array([[0, 1, 2], [-1, 255, 3]], np.int32)
    out = visualize.colorize(labels, PALETTE, unknown_color=(9, 8, 7))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0], PALETTE)
    np.testing.assert_array_equal(out[1], [[9, 8, 7]] * 3)


def test_colorize_accepts_uint8_labels_and_list_palette():
    out = visualize.colorize(np.array([[2, 0]], np.uint8), PALETTE.tolist())
    np.testing.assert_array_equal(out, [[[0, 255, 0], [0, 0, 0]]])


@pytest.mark.parametrize(
    "labels, palette, message",
    [
        (np.zeros((2, 2), np.float32), PALETTE, "integers"),
        (np.zeros((2, 2), np.int32), np.zeros((3, 4)), r"\(num_classes, 3\)"),
        (np.zeros((2, 2), np.int32), np.full((3, 3), 300), "0..255"),
    ],
)
def test_colorize_rejects_bad_input(labels, palette, message):
    with pytest.raises(ValueError, match=message):
        visualize.colorize(labels, palette)


def test_overlay_blends_with_alpha():
    image = np.full((1, 2, 3), 100, np.uint8)
    labels = np.array([[1, 2]])
    np.testing.assert_array_equal(visualize.overlay(image, labels, PALETTE, alpha=0.0), image)
    np.testing.assert_array_equal(visualize.overlay(image, labels, PALETTE, alpha=1.0)[0], PALETTE[1:])
    half = visualize.overlay(image, labels, PALETTE, alpha=0.5)
    # (100 + 255) / 2 = 177.5 rounds to the even 178; (100 + 0) / 2 = 50.
    np.testing.assert_array_equal(half[0], [[178, 50, 50], [50, 178, 50]])


def test_overlay_keeps_image_where_no_class():
    image = np.full((1, 2, 3), 100, np.uint8)
    out = visualize.overlay(image, np.array([[-1, 0]]), PALETTE, alpha=0.5)
    np.testing.assert_array_equal(out[0], [[100, 100, 100], [50, 50, 50]])
    painted = visualize.overlay(image, np.array([[-1, 0]]), PALETTE, alpha=0.5, unknown_color=(200, 200, 200))
    np.testing.assert_array_equal(painted[0, 0], [150, 150, 150])


def test_overlay_grayscale_and_rgba_images():
    gray = np.full((2, 2), 60, np.uint8)
    rgba = np.concatenate([np.full((2, 2, 3), 60, np.uint8), np.full((2, 2, 1), 7, np.uint8)], -1)
    labels = np.zeros((2, 2), np.int32)
    expected = np.full((2, 2, 3), 30, np.uint8)
    np.testing.assert_array_equal(visualize.overlay(gray, labels, PALETTE), expected)
    np.testing.assert_array_equal(visualize.overlay(rgba, labels, PALETTE), expected)


def test_overlay_rejects_mismatched_sizes_and_alpha():
    with pytest.raises(ValueError, match="differs"):
        visualize.overlay(np.zeros((2, 3, 3), np.uint8), np.zeros((3, 2), np.int32), PALETTE)
    with pytest.raises(ValueError, match="alpha"):
        visualize.overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.int32), PALETTE, alpha=1.5)


def test_default_colour_of_non_classes_is_white_as_in_tensorboard_and_predict():
    # One colorize for every picture: ignore (255) and out-of-palette values are white.
    palette = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    colours = visualize.colorize(np.array([[[0, 1], [255, 7]]]), palette)
    assert colours.dtype == np.uint8 and colours.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(colours[0, 0], [[10, 20, 30], [40, 50, 60]])
    np.testing.assert_array_equal(colours[0, 1], [[255, 255, 255], [255, 255, 255]])
