"""Every PIL mode becomes the model's channels with its meaning kept (#20 item 16), in training's decode
(`Preprocess.convert`) and imgcls-predict's (`predict.to_mode`, then `prepare`) alike.

    .venv/bin/python -m pytest -q tests/test_image_modes.py
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgcls.data.images import open_image
from imgcls.data.transforms import Preprocess
from imgcls.inference.preprocess import prepare, to_mode


def _two(mode: str, values: list) -> Image.Image:
    """A 2x1 image of `mode` holding two pixel values."""
    im = Image.new(mode, (2, 1))
    for x, v in enumerate(values):
        im.putpixel((x, 0), v)
    return im


def _sixteen(mode: str, values: list[int]) -> Image.Image:
    dtype = {"I;16B": ">u2", "I;16": "<u2", "I;16L": "<u2", "I": "<i4"}[mode]
    return Image.frombytes(mode, (len(values), 1), np.asarray(values, dtype=dtype).tobytes())


def _palette(alpha: bool) -> Image.Image:
    im = Image.new("PA" if alpha else "P", (2, 1))
    im.putpalette([10, 200, 30, 90, 60, 250] + [0] * 762)
    im.putpixel((0, 0), (0, 255) if alpha else 0)
    im.putpixel((1, 0), (1, 0) if alpha else 1)
    return im


WHITE = (255, 255, 255)
# mode -> (image, its two pixels as RGB)
CASES = {
    "1": (_two("1", [1, 0]), [WHITE, (0, 0, 0)]),
    "L": (_two("L", [100, 7]), [(100,) * 3, (7,) * 3]),
    "P": (_palette(False), [(10, 200, 30), (90, 60, 250)]),
    "PA": (_palette(True), [(10, 200, 30), WHITE]),  # transparent: composited on white
    "LA": (_two("LA", [(100, 255), (100, 0)]), [(100,) * 3, WHITE]),
    "RGB": (_two("RGB", [(10, 200, 30), (1, 2, 3)]), [(10, 200, 30), (1, 2, 3)]),
    "RGBA": (_two("RGBA", [(10, 200, 30, 255), (10, 200, 30, 0)]), [(10, 200, 30), WHITE]),
    "CMYK": (_two("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0)]), [WHITE, (0, 255, 255)]),
    "YCbCr": (_two("YCbCr", [(100, 128, 128), (200, 128, 128)]), [(100,) * 3, (200,) * 3]),
    "LAB": (_two("LAB", [(255, 128, 128), (0, 128, 128)]), [WHITE, (0, 0, 0)]),
    "HSV": (_two("HSV", [(0, 255, 255), (85, 255, 255)]), [(255, 0, 0), (0, 255, 0)]),
    # 16 bits to 8: v / 257 rounded (65535 -> 255, 40000 -> 156); I is taken as 16-bit and clipped
    "I": (_sixteen("I", [40000, 70000]), [(156,) * 3, WHITE]),
    "I;16": (_sixteen("I;16", [40000, 65535]), [(156,) * 3, WHITE]),
    "I;16B": (_sixteen("I;16B", [40000, 257]), [(156,) * 3, (1,) * 3]),
    "I;16L": (_sixteen("I;16L", [40000, 0]), [(156,) * 3, (0,) * 3]),
    # float: 0..1 when no value exceeds 1 (as float TIFFs hold), else 0..255 as Pillow reads it
    "F": (Image.frombytes("F", (2, 1), np.asarray([0.25, 1.0], "<f4").tobytes()), [(64,) * 3, WHITE]),
}


def _gray(rgb: tuple[int, int, int]) -> int:
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))  # ITU-R 601 luma, as Pillow's L


def _converters():
    yield "training", lambda im, channels: Preprocess((1, 2), channels, (0.0,) * channels, (1.0,) * channels,
                                                    "nearest").convert(im)
    yield "predict", to_mode


@pytest.mark.parametrize("path", ["training", "predict"])
@pytest.mark.parametrize("mode", list(CASES))
def test_every_pil_mode_becomes_rgb_and_gray_with_its_meaning(mode, path):
    image, rgb = CASES[mode]
    assert image.mode == mode
    convert = dict(_converters())[path]
    tolerance = 2 if mode == "LAB" else 0  # LittleCMS's Lab -> sRGB lands white at (254, 255, 254)
    got = np.asarray(convert(image, 3), dtype=int)
    assert got.shape == (1, 2, 3)
    assert np.abs(got[0] - np.asarray(rgb)).max() <= tolerance, (mode, got.tolist())
    gray = np.asarray(convert(image, 1), dtype=int)
    assert gray.shape == (1, 2)
    assert np.abs(gray[0] - [_gray(c) for c in rgb]).max() <= tolerance, (mode, gray.tolist())


def test_float_values_above_one_are_read_as_0_to_255():
    image = Image.frombytes("F", (2, 1), np.asarray([200.0, 300.0], "<f4").tobytes())
    assert np.asarray(to_mode(image, 1)).tolist() == [[200, 255]]


@pytest.mark.parametrize("mode, values, expected", [("I;16B", [40000, 65535, 0], [156, 255, 0]),
                                                    ("F", [0.25, 1.0, 0.0], [64, 255, 0])])
def test_16_bit_big_endian_and_float_tiffs_read_from_disk_in_training_and_predict(tmp_path, mode, values, expected):
    """The files of the report: a big-endian 16-bit TIFF came out white, a float TIFF black."""
    dtype = {"I;16B": ">u2", "F": "<f4"}[mode]
    Image.frombytes(mode, (3, 1), np.asarray(values, dtype=dtype).tobytes()).save(tmp_path / "x.tif")
    image = open_image(str(tmp_path / "x.tif"))
    pre = Preprocess((1, 3), 1, (0.0,), (1.0,), "nearest")
    assert np.asarray(pre.convert(image)).tolist() == [expected]
    x = prepare(image, pre.to_dict())  # predict's whole preprocessing: (pixel / 255 - 0) / 1
    assert np.array_equal(np.rint(x[0, 0] * 255).astype(int), expected)
