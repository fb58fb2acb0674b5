"""Per-channel mean and std of a split as the model sees it, printed as TOML lines to paste into a recipe.

    imgcls-data stats recipes/mnist.toml >> mnist-stats.toml
    imgcls-data stats photos/ --image-size 224 224 --channels 3 [--split train]

The pixels are those training reads before normalization: each image converted to the recipe's channels and
resized to its working size (the "train" frame of `imgcls.data.store`; val and test in their "eval" frame), in
[0, 1]. The std is the population std over every pixel of every image of the split. Only the TOML lines go
to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

import numpy as np

from imgcls.errors import DataError
from imgcls.data.tools.target import add_target_arguments, data_config_of

if TYPE_CHECKING:
    from imgcls.data.store import Framer

CHUNK = 256  # images per pool task


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_arguments(p)
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="the split to measure (default train, after val is carved from it)")


def _chunk_sums(framer: Framer, start: int) -> tuple[int, list[int], list[int]]:
    """The number of images in the chunk from `start`, and the per-channel sum and sum of squares of their
    uint8 pixels: integers, so combining chunks is exact."""
    stop = min(start + CHUNK, len(framer.split))
    pixels = np.stack([framer(k).numpy() for k in range(start, stop)]).astype(np.int64)  # [B, C, H, W]
    per_channel = pixels.transpose(1, 0, 2, 3).reshape(pixels.shape[1], -1)
    return stop - start, per_channel.sum(1).tolist(), (per_channel * per_channel).sum(1).tolist()


def channel_stats(framer: Framer, show: bool = True) -> tuple[list[float], list[float]]:
    """Mean and population std per channel, in [0, 1], of every image of `framer`'s split in its frame."""
    from tqdm.auto import tqdm

    from imgcls.data.pool import map_chunks

    channels, n = framer.shape[0], len(framer.split)
    if n == 0:
        raise DataError(f"the {framer.split.name} split has no images")
    sums, squares = [0] * channels, [0] * channels
    with tqdm(total=n, desc=f"reading {framer.split.name}", unit="img", disable=None if show else True) as bar:
        for images, s, q in map_chunks(_chunk_sums, framer, range(0, n, CHUNK)):
            sums = [a + b for a, b in zip(sums, s)]
            squares = [a + b for a, b in zip(squares, q)]
            bar.update(images)
    count = n * framer.shape[1] * framer.shape[2]  # pixels per channel
    # exact integer sums: the variance n*sum(x^2) - sum(x)^2 has no cancellation error before the division
    mean = [float(s / count / 255) for s in sums]
    std = [math.sqrt((count * q - s * s) / count**2) / 255 for s, q in zip(sums, squares)]
    return mean, std


def toml_lines(split: str, n: int, size: tuple[int, int], mean: list[float], std: list[float]) -> str:
    def listed(values: list[float]) -> str:
        return ", ".join(f"{v:.4f}" for v in values)
    return (f"# imgcls-data stats: {split} split, {n:,} images at {size[0]}x{size[1]}, {len(mean)} channel(s)\n"
            f"[data]\nmean = [{listed(mean)}]\nstd = [{listed(std)}]")


def run(args: argparse.Namespace) -> int:
    from imgcls.data.loaders import build_splits
    from imgcls.data.store import Framer
    from imgcls.data.transforms import Preprocess

    cfg = data_config_of(args)
    splits = build_splits(cfg)
    split = getattr(splits, args.split)
    if split is None:
        raise DataError(f"{args.target}: no test split (set data.test_split, or add a test/ folder)")
    pre = Preprocess.from_data(cfg)
    if args.split == "train":
        framer = Framer(split, pre, "train", tuple(cfg.working_size) if cfg.working_size else None)
    else:
        framer = Framer(split, pre, "eval")
    mean, std = channel_stats(framer)
    print(toml_lines(args.split, len(split), framer.shape[1:], mean, std))
    return 0
