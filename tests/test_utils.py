"""Shared helpers: the one image-grid function (training validation grids, the toy world's figures)."""

import numpy as np
import pytest
from PIL import Image

from psa_adapter.utils import image_grid


def _solid(value, size=(5, 4)):
    return Image.new("RGB", size, (value, 255 - value, 7))


def test_image_grid_without_border_equals_diffusers_make_image_grid():
    from diffusers.utils import make_image_grid

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)) for _ in range(6)]
    ours = np.asarray(image_grid(images, cols=3))
    assert ours.shape == (2 * 4, 3 * 6, 3)
    assert np.array_equal(ours, np.asarray(make_image_grid(images, rows=2, cols=3)))


def test_image_grid_border_short_row_and_scale():
    images = [_solid(10), np.asarray(_solid(20)), _solid(30)]  # PIL images and uint8 arrays mix
    grid = np.asarray(image_grid(images, cols=2, border=1))
    assert grid.shape == (2 * (4 + 2), 2 * (5 + 2), 3)
    assert (grid[0, :] == 255).all() and (grid[:, 0] == 255).all()  # the border is the background
    assert tuple(grid[1, 1]) == (10, 245, 7) and tuple(grid[1, 5 + 2 + 1]) == (20, 235, 7)
    assert tuple(grid[6 + 1, 1]) == (30, 225, 7)
    assert (grid[6:, 7:] == 255).all()  # the short last row leaves its cell empty
    scaled = np.asarray(image_grid(images, cols=2, border=1, scale=3))
    assert np.array_equal(scaled, grid.repeat(3, 0).repeat(3, 1))  # nearest neighbour: each pixel a 3x3 block


def test_image_grid_rejects_mixed_sizes_and_nothing():
    with pytest.raises(ValueError, match="one size"):
        image_grid([_solid(1), _solid(2, size=(4, 4))], cols=2)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([], cols=2)
