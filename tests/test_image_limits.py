"""Images that are not what they claim (#20 items 13 and 15): decompression bombs below Pillow's own threshold,
and symlinks that loop or dangle, go through data.on_bad_image with a message that says what is wrong.

    .venv/bin/python -m pytest -q tests/test_image_limits.py
"""
from __future__ import annotations

import logging
import os

import pytest
from PIL import Image, ImageFile

from conftest import write_class_folders
from imgcls.data import images
from imgcls.data.images import MAX_IMAGE_PIXELS, check_image, open_image
from imgcls.data.loaders import build_splits
from imgcls.errors import DataError
from imgcls.recipe import DataConfig

GRAY = dict(image_size=(16, 16), channels=1, mean=[0.5], std=[0.25])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b"], 6)
    write_class_folders(root / "val", ["a", "b"], 2, seed=1)
    return root


@pytest.fixture(autouse=True)
def _default_limit():
    yield
    images.set_max_image_pixels(MAX_IMAGE_PIXELS)  # the limit is the process's: put it back


def test_the_default_limit_is_64_mpx_and_documented():
    assert MAX_IMAGE_PIXELS == 64 * 2**20 == DataConfig(source="hub", dataset="a").max_image_pixels


def test_an_image_over_the_limit_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    """A 73 Mpx all-black PNG is 71 KB on disk: below Pillow's 89 Mpx warning, decoded in full today."""
    Image.new("L", (8550, 8550)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    for read in (open_image, check_image):
        with pytest.raises(Image.DecompressionBombError) as e:
            read(str(tmp_path / "bomb.png"))
        assert str(e.value) == (f"{tmp_path / 'bomb.png'}: 8550x8550 = 73,102,500 pixels, more than "
                                f"data.max_image_pixels = 67,108,864 (a decompression bomb, or far more detail than "
                                f"a classifier uses); shrink it, or raise data.max_image_pixels if such images are "
                                f"meant")
    assert loads == []


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_data_max_image_pixels_counts_as_a_bad_image(folder, mode, caplog):
    Image.new("L", (3000, 2000)).save(folder / "train" / "a" / "big.png")
    cfg = DataConfig(source="folder", root=str(folder), on_bad_image=mode, max_image_pixels=5_000_000, **GRAY)
    if mode == "error":
        with pytest.raises(DataError, match=r"big.png: DecompressionBombError: .*3000x2000 = 6,000,000 pixels, "
                                            r"more than data.max_image_pixels = 5,000,000"):
            build_splits(cfg)
        return
    with caplog.at_level(logging.WARNING):
        splits = build_splits(cfg)
    assert len(splits.train) == 12 and "big.png: DecompressionBombError" in caplog.text
    # a raised limit is another check: the image is read this time
    splits = build_splits(cfg.model_copy(update={"max_image_pixels": 6_000_000}))
    assert len(splits.train) == 13


def test_the_recipe_refuses_a_limit_below_one_pixel():
    with pytest.raises(ValueError, match="max_image_pixels"):
        DataConfig(source="hub", dataset="a", max_image_pixels=0)


# ---------------------------------------------------------------- symlinks
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_symlink_loop_and_a_dangling_symlink_go_through_on_bad_image(folder, mode, caplog):
    loop = folder / "train" / "a" / "loop.png"
    os.symlink(loop.name, loop)  # points at itself
    dangling = folder / "train" / "b" / "gone.png"
    os.symlink("moved-away.png", dangling)
    cfg = DataConfig(source="folder", root=str(folder), on_bad_image=mode, **GRAY)
    loop_line = f"{loop}: NotAnImageFile: {loop}: a symbolic link loop (the link leads back to itself); remove it " \
                f"or point it at an image"
    dangling_line = f"{dangling}: NotAnImageFile: {dangling}: a dangling symbolic link (its target " \
                    f"'moved-away.png' does not exist); remove it or restore the target"
    if mode == "error":
        with pytest.raises(DataError) as e:
            build_splits(cfg)
        assert f"  {loop_line}" in str(e.value).splitlines()
        assert f"  {dangling_line}" in str(e.value).splitlines()
        return
    with caplog.at_level(logging.WARNING):
        splits = build_splits(cfg)
    assert len(splits.train) == 12
    assert loop_line in caplog.text and dangling_line in caplog.text


def test_the_limit_travels_with_the_framer_to_a_spawned_worker(folder):
    """A spawned DataLoader worker (macOS's default) starts with the default limit: the framer carries the run's."""
    import pickle

    from imgcls.data.store import Framer
    from imgcls.data.transforms import Preprocess

    cfg = DataConfig(source="folder", root=str(folder), max_image_pixels=100_000_000, **GRAY)
    splits = build_splits(cfg)
    framer = Framer(splits.train, Preprocess.from_data(cfg), "eval")
    state = pickle.dumps(framer)
    images.set_max_image_pixels(MAX_IMAGE_PIXELS)  # as in a fresh process
    pickle.loads(state)
    assert images.max_image_pixels() == 100_000_000
