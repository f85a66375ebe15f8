"""resize_bilinear_tf1 against TF1's legacy ResizeBilinear (align_corners=False, half_pixel_centers=False).

That is the resize of tf.image.resize_bilinear / tf.compat.v1.image.resize_bilinear, the `ResizeBilinear` node of
the FID Inception graph that ADM's evaluator runs. The reference below is written from TF1's definition: for
output index i the source coordinate is i * in / out (computed in float32, as TF does), its lower neighbour
floor(src), its upper neighbour ceil(src) clamped to the last row/column, and the weight of the upper one
src - floor(src); the interpolation itself is done in float64.
When TensorFlow is importable, the last test also compares with TF itself (it is not a requirement).
"""
import numpy as np
import pytest
import torch

from evaluations.inception import FIDInceptionV3, resize_bilinear_tf1
from evaluations.vgg import VGG16

CASES = [
    ((37, 53), (299, 299)),  # upsample, non-square input (the FID Inception input size)
    ((64, 48), (23, 35)),  # downsample, non-square both ways
    ((17, 9), (40, 31)),  # non-square upsample
    ((50, 20), (30, 45)),  # down in height, up in width
    ((256, 256), (224, 224)),  # the VGG16 input
]


def tf1_resize_reference(images, out_h, out_w):
    """(N, H, W, C) -> (N, out_h, out_w, C) float64, TF1's legacy bilinear resize."""
    images = np.asarray(images, dtype=np.float64)
    in_h, in_w = images.shape[1:3]

    def sampling(in_size, out_size):
        # TF1 computes the scale and the source coordinate in float32 (a float `scale` in its kernel); done in
        # float64 the coordinate of a 256 -> 224 resize moves by up to 2.5e-5 pixels, more than the tolerance.
        scale = np.float32(in_size) / np.float32(out_size)
        src = (np.arange(out_size, dtype=np.float32) * scale).astype(np.float64)
        lower = np.floor(src).astype(np.int64)
        upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
        return lower, upper, src - lower

    y_lo, y_hi, wy = sampling(in_h, out_h)
    x_lo, x_hi, wx = sampling(in_w, out_w)
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]
    rows_lo, rows_hi = images[:, y_lo], images[:, y_hi]
    return ((1 - wy) * (1 - wx) * rows_lo[:, :, x_lo] + (1 - wy) * wx * rows_lo[:, :, x_hi]
            + wy * (1 - wx) * rows_hi[:, :, x_lo] + wy * wx * rows_hi[:, :, x_hi])


def ours(images, out_h, out_w):
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    return resize_bilinear_tf1(x, (out_h, out_w)).permute(0, 2, 3, 1).double().numpy()


def test_reference_on_hand_computed_values():
    row = np.array([0.0, 10.0, 20.0]).reshape(1, 1, 3, 1)
    np.testing.assert_allclose(tf1_resize_reference(row, 1, 5)[0, 0, :, 0], [0, 6, 12, 18, 20])
    np.testing.assert_allclose(tf1_resize_reference(row, 1, 2)[0, 0, :, 0], [0, 15])
    grid = np.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_allclose(tf1_resize_reference(grid, 2, 2)[0, ..., 0], [[0, 2], [8, 10]])


@pytest.mark.parametrize("in_size, out_size", CASES)
def test_matches_tf1_reference_on_random_images(in_size, out_size):
    rng = np.random.default_rng(sum(in_size) + sum(out_size))
    unit = rng.random((2, *in_size, 3))
    got, expected = ours(unit, *out_size), tf1_resize_reference(unit, *out_size)
    assert got.shape == expected.shape == (2, *out_size, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # On [0, 255] pixels the same bound holds relative to the range (float32 itself has 255 * 6e-8 steps there).
    pixels = rng.integers(0, 256, (1, *in_size, 3)).astype(np.float64)
    np.testing.assert_allclose(ours(pixels, *out_size), tf1_resize_reference(pixels, *out_size), rtol=0,
                               atol=255 * 1e-5)


def test_half_pixel_resize_is_not_tf1():
    """The reference tells the rules apart: torch's bilinear (half-pixel centres) is far from it."""
    rng = np.random.default_rng(5)
    unit = rng.random((1, 37, 53, 3))
    half_pixel = torch.nn.functional.interpolate(torch.from_numpy(unit).permute(0, 3, 1, 2), size=(299, 299),
                                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    assert np.abs(half_pixel - tf1_resize_reference(unit, 299, 299)).max() > 0.05


def test_network_inputs_use_the_tf1_resize():
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (2, 45, 70, 3), dtype=np.uint8)
    inception_input = FIDInceptionV3.preprocess(torch.from_numpy(pixels)).permute(0, 2, 3, 1).double().numpy()
    np.testing.assert_allclose(inception_input, (tf1_resize_reference(pixels, 299, 299) - 128) / 128, rtol=0,
                               atol=2e-5)
    vgg_input = VGG16.preprocess(torch.from_numpy(pixels)).permute(0, 2, 3, 1).double().numpy()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(vgg_input, (tf1_resize_reference(pixels, 224, 224) / 255 - mean) / std, rtol=0,
                               atol=1e-4)


@pytest.mark.parametrize("in_size, out_size", CASES)
def test_matches_tensorflow_when_installed(in_size, out_size):
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (optional; the float64 reference "
                                                  "above is the check that always runs)")
    rng = np.random.default_rng(7)
    unit = rng.random((2, *in_size, 3)).astype(np.float32)
    expected = tf.compat.v1.image.resize_bilinear(unit, out_size, align_corners=False,
                                                  half_pixel_centers=False).numpy()
    np.testing.assert_allclose(ours(unit, *out_size), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(tf1_resize_reference(unit, *out_size), expected, rtol=0, atol=1e-5)
