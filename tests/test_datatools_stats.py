"""imgcls-data stats: per-channel mean/std of the pixels training reads, as TOML lines, checked against numpy on
images with known pixels (and against the published MNIST values on the real data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, needs_real_data
from imgcls.data.loaders import build_splits
from imgcls.data.tools.cli import main
from imgcls.data.tools.stats import channel_stats
from imgcls.recipe import DataConfig
from imgcls.data.store import Framer
from imgcls.data.transforms import Preprocess

SIZE = 8  # the working size: constant images of any size resize to exactly their colour, noise is made at it


def write_images(root: Path, channels: int, seed: int = 0, noise: bool = True) -> dict[str, list[np.ndarray]]:
    """root/{train,val}/{a,b}/: constant-colour images of several sizes plus, per class, one noise image already
    SIZE x SIZE (with `noise`; else one more constant one). Returns split -> the [SIZE, SIZE, channels] pixels
    training must read for each image."""
    rng = np.random.default_rng(seed)
    mode = "L" if channels == 1 else "RGB"
    shapes = [(5, 7), (16, 12), (SIZE, SIZE), (31, 3)]  # (height, width)
    expected: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for n in range(per_class):
                if noise and n == per_class - 1:  # at the working size: stored as it is
                    pixels = rng.integers(0, 256, (SIZE, SIZE, channels), dtype=np.uint8)
                    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
                else:
                    colour = rng.integers(0, 256, channels, dtype=np.uint8)
                    h, w = shapes[n]
                    image = Image.new(mode, (w, h), int(colour[0]) if channels == 1 else tuple(map(int, colour)))
                    pixels = np.broadcast_to(colour, (SIZE, SIZE, channels))
                image.save(root / split / cls / f"{n}.png")
                expected[split].append(pixels)
    return expected


def numpy_stats(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    values = np.stack(images).astype(np.float64) / 255  # [N, H, W, C]
    return values.mean(axis=(0, 1, 2)), values.std(axis=(0, 1, 2))


def toml(split: str, n: int, size: int, mean, std) -> str:
    def listed(values) -> str:
        return ", ".join(f"{v:.4f}" for v in values)
    return (f"# imgcls-data stats: {split} split, {n:,} images at {size}x{size}, {len(mean)} channel(s)\n"
            f"[data]\nmean = [{listed(mean)}]\nstd = [{listed(std)}]\n")


def stats(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["stats", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_stats_equal_numpy(tmp_path, capsys, channels):
    expected = write_images(tmp_path / "imgs", channels)
    mean, std = numpy_stats(expected["train"])
    code, out, _ = stats(capsys, tmp_path / "imgs", "--image-size", SIZE, SIZE, "--channels", channels)
    assert code == 0
    assert out == toml("train", 8, SIZE, mean, std)
    # beyond the 4 printed decimals: the float64 values themselves
    cfg = DataConfig(source="folder", root=str(tmp_path / "imgs"), image_size=(SIZE, SIZE), channels=channels,
                     mean=[0.5] * channels, std=[0.25] * channels)
    split = build_splits(cfg).train
    got_mean, got_std = channel_stats(Framer(split, Preprocess.from_data(cfg), "train"), show=False)
    np.testing.assert_allclose(got_mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_std, std, rtol=0, atol=1e-12)


def test_val_split(tmp_path, capsys):
    expected = write_images(tmp_path / "imgs", 3, seed=1)
    code, out, _ = stats(capsys, tmp_path / "imgs", "--image-size", SIZE, SIZE, "--split", "val")
    assert code == 0 and out == toml("val", 4, SIZE, *numpy_stats(expected["val"]))


def test_rgb_stats_of_gray_files_repeat_the_gray_channel(tmp_path, capsys):
    expected = write_images(tmp_path / "imgs", 1, seed=2)
    mean, std = numpy_stats(expected["train"])
    code, out, _ = stats(capsys, tmp_path / "imgs", "--image-size", SIZE, SIZE, "--channels", 3)
    assert code == 0 and out == toml("train", 8, SIZE, [mean[0]] * 3, [std[0]] * 3)


def test_recipe_with_override(tmp_path, capsys):
    expected = write_images(tmp_path / "imgs", 1, seed=3)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "r"\n[data]\nsource = "folder"\nroot = "{tmp_path / "imgs"}"\n'
                      f'image_size = [{SIZE}, {SIZE}]\nchannels = 3\nmean = [0.5, 0.5, 0.5]\nstd = [0.2, 0.2, 0.2]\n')
    mean, std = numpy_stats(expected["train"])
    code, out, _ = stats(capsys, recipe, "data.channels=1", "data.mean=[0.1]", "data.std=[0.3]")
    assert code == 0 and out == toml("train", 8, SIZE, mean, std)


def test_recipe_working_size(tmp_path, capsys):
    """The train frame is the working size: constant-colour images only, so a resize to 4x4 is exact (and each
    image still weighs the same)."""
    expected = write_images(tmp_path / "imgs", 1, seed=4, noise=False)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "r"\n[data]\nsource = "folder"\nroot = "{tmp_path / "imgs"}"\nimage_size = [8, 8]\n'
                      f'channels = 1\nmean = [0.5]\nstd = [0.2]\nworking_size = [4, 4]\n')
    mean, std = numpy_stats([pixels[:4, :4] for pixels in expected["train"]])
    code, out, _ = stats(capsys, recipe)
    assert code == 0 and out == toml("train", 8, 4, mean, std)


def test_errors(tmp_path, capsys):
    code, out, err = stats(capsys, tmp_path / "nope")
    assert (code, out, err) == (2, "", f"error: {tmp_path / 'nope'}: no such recipe file or folder\n")
    write_images(tmp_path / "imgs", 1)
    code, out, err = stats(capsys, tmp_path / "imgs", "--split", "test")
    assert (code, out, err) == (2, "", f"error: {tmp_path / 'imgs'}: no test split (set data.test_split, or add "
                                       f"a test/ folder)\n")


@needs_real_data
def test_real_mnist_gives_the_published_values(tmp_path, capsys):
    recipe = tmp_path / "mnist.toml"
    recipe.write_text(f'name = "mnist"\n[data]\nsource = "hub"\ndataset = "{SHARED_DATA / "mnist"}"\n'
                      f'val_split = "test"\nimage_size = [28, 28]\nchannels = 1\nmean = [0.5]\nstd = [0.5]\n')
    code, out, _ = stats(capsys, recipe)
    assert code == 0
    header, table, mean, std = out.splitlines()
    assert (header, table) == ("# imgcls-data stats: train split, 60,000 images at 28x28, 1 channel(s)", "[data]")
    assert mean.startswith("mean = [") and abs(float(mean[8:-1]) - 0.1307) <= 1e-4
    assert std.startswith("std = [") and abs(float(std[7:-1]) - 0.3081) <= 1e-4
