"""png.encode_png: every row filter decodes back to the exact pixels."""

import zlib

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.data import png

FILTERS = [png.FILTER_NONE, png.FILTER_SUB, png.FILTER_UP, png.FILTER_AVERAGE, png.FILTER_PAETH]


def _image(h, w, c, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    # Extremes and smooth runs: the filters' wrap-around and the Paeth ties.
    image[0] = 255
    image[:, 0] = 0
    image[h // 2 :, w // 2 :] = 128
    return image


@pytest.mark.parametrize("filter_type", FILTERS)
@pytest.mark.parametrize("channels", [3, 1])
def test_decodes_to_the_exact_pixels(filter_type, channels):
    image = _image(13, 17, channels)
    for strategy in (zlib.Z_RLE, zlib.Z_DEFAULT_STRATEGY):
        data = png.encode_png(image, filter_type=filter_type, strategy=strategy)
        head = png.header(data)
        assert (head["width"], head["height"], head["bit_depth"]) == (17, 13, 8)
        assert head["color_type"] == (png.RGB if channels == 3 else png.GRAY)
        np.testing.assert_array_equal(tf.io.decode_png(data, channels=channels).numpy(), image)


def test_gray_2d_input_and_a_single_row():
    image = _image(1, 5, 1)[..., 0]
    np.testing.assert_array_equal(tf.io.decode_png(png.encode_png(image)).numpy()[..., 0], image)


def test_filter_rows_matches_the_specification_on_one_pixel_row():
    # Two rows of one RGB pixel each: left is 0 (no pixel before), up is the row above.
    image = np.array([[[10, 20, 30]], [[15, 10, 200]]], np.uint8)
    up = png.filter_rows(image, png.FILTER_UP)
    np.testing.assert_array_equal(up, [[10, 20, 30], [5, (10 - 20) % 256, 170]])
    avg = png.filter_rows(image, png.FILTER_AVERAGE)
    np.testing.assert_array_equal(avg, [[10, 20, 30], [15 - 5, 10 - 10, 200 - 15]])
    # Paeth with left = up-left = 0 predicts "up" (|p - up| = 0 is the smallest).
    np.testing.assert_array_equal(png.filter_rows(image, png.FILTER_PAETH), up)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        png.encode_png(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        png.encode_png(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="filter type 7"):
        png.encode_png(np.zeros((2, 2, 3), np.uint8), filter_type=7)
