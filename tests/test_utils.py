"""The sample grid written by train.py and generate.py."""
import numpy as np

from utils import image_grid


def test_small_images_are_enlarged_by_a_whole_factor_and_captioned():
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    images = np.broadcast_to(colours[:, None, None], (3, 32, 32, 3))
    grid = np.asarray(image_grid(images, ["a red one", "a green one", "a blue one"], ncols=3))
    tile = 128
    assert grid.shape[1] == 3 * tile and grid.shape[0] > tile
    for i, colour in enumerate(colours):
        assert (grid[:tile, i * tile:(i + 1) * tile] == colour).all()
        caption_area = grid[tile:, i * tile:(i + 1) * tile]
        assert (caption_area < 128).any()  # dark text on the white band


def test_large_images_keep_their_size_and_no_caption_band_without_captions():
    images = np.zeros((4, 200, 150, 3), dtype=np.uint8)
    grid = image_grid(images)
    assert grid.size == (2 * 150, 2 * 200)
