"""Image grids and PNG writing, checked against Pillow as an independent decoder."""

import numpy as np
import pytest
import torch

from lipgan import image
from lipgan.errors import LipganError


def test_to_uint8_maps_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0]).view(5, 1, 1, 1)
    assert image.to_uint8(x).ravel().tolist() == [0, 128, 255, 255, 0]
    y = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1)
    assert image.to_uint8(y, (0.0, 1.0)).ravel().tolist() == [0, 128, 255]


def test_grid_layout_against_direct_placement():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 1, 4, 3), dtype=np.uint8)
    grid = image.make_grid(imgs, nrow=3, padding=1, pad_value=9)
    assert grid.shape == (3 * 5 + 1, 3 * 4 + 1)
    for i in range(7):
        r, c = divmod(i, 3)
        top, left = 1 + r * 5, 1 + c * 4
        assert np.array_equal(grid[top : top + 4, left : left + 3], imgs[i, 0])
    assert (grid[0] == 9).all() and (grid[:, 0] == 9).all()
    assert (grid[11:15, 5:8] == 9).all()  # empty slots 8 and 9 stay padding


@pytest.mark.parametrize("rgb", [False, True])
def test_png_roundtrip_with_pillow(tmp_path, rgb):
    from PIL import Image

    rng = np.random.default_rng(1)
    shape = (13, 17, 3) if rgb else (13, 17)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = image.write_png(tmp_path / "x.png", pixels)
    with Image.open(path) as im:
        im.load()  # verifies CRCs and the zlib stream
        assert im.mode == ("RGB" if rgb else "L")
        assert np.array_equal(np.asarray(im), pixels)
    assert np.array_equal(image.read_png(path), pixels)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left


def test_read_png_handles_pillow_filters(tmp_path):
    """Our reader decodes all five row filters (Pillow's encoder picks them adaptively)."""
    from PIL import Image

    rng = np.random.default_rng(2)
    smooth = np.cumsum(rng.integers(0, 3, size=(20, 30)), axis=1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "p.png", optimize=True)
    assert np.array_equal(image.read_png(tmp_path / "p.png"), smooth)


def test_save_grid_from_generator_output(tmp_path):
    x = torch.linspace(-1, 1, 4 * 28 * 28).view(4, 1, 28, 28)
    path = image.save_grid(tmp_path / "g.png", x, nrow=2)
    arr = image.read_png(path)
    assert arr.shape == (2 * 30 + 2, 2 * 30 + 2)
    assert arr[2, 2] == 0 and arr[2 + 30 + 27, 2 + 30 + 27] == 255


def test_bad_inputs_are_lipgan_errors(tmp_path):
    with pytest.raises(LipganError):
        image.make_grid(np.zeros((2, 2, 4, 4), np.uint8))
    with pytest.raises(LipganError):
        image.encode_png(np.zeros((4, 4), np.float32))
    (tmp_path / "no.png").write_bytes(b"not a png")
    with pytest.raises(LipganError):
        image.read_png(tmp_path / "no.png")
