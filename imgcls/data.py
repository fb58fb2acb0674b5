"""`[data]`: build the train / val / test datasets and loaders from any source.

Val drives model selection; test is evaluated once at the end. A source without a val split gets one carved
from train by a fixed rule (`val_size` or `val_fraction`, `val_pick` first/random with `split_seed`): for
MNIST the classic rule, the first 5,000 training images, gives the 55,000 / 5,000 / 10,000 table.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .recipe import DataConfig
from .sources import LOADERS, TEST_NAMES, VAL_NAMES, DataError, Split
from .transforms import Preprocess

log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split | None
    class_names: list[str]

    def sizes(self) -> str:
        return f"train {len(self.train)} / val {len(self.val)} / test {len(self.test) if self.test else 0}"


def _pick(splits: dict, wanted: str, synonyms: tuple[str, ...], key: str) -> Split | None:
    if wanted:
        if wanted not in splits:
            raise DataError(f"data.{key} = {wanted!r}: no such split; available: {sorted(splits)}")
        return splits[wanted]
    return next((splits[n] for n in synonyms if n in splits), None)


def carve_val(train: Split, cfg: DataConfig) -> tuple[Split, Split]:
    n = cfg.val_size or round(len(train) * cfg.val_fraction)
    if not 0 < n < len(train):
        raise DataError(f"data.val_size/val_fraction: carving {n} of {len(train)} training images for val is "
                        f"impossible; give a val split or set data.val_fraction between 0 and 1")
    if cfg.val_pick == "first":
        order = list(range(len(train)))
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
    return train.subset("train", sorted(order[n:])), train.subset("val", sorted(order[:n]))


def _drop_unreadable(split: Split, preprocess: Preprocess) -> Split:
    """`on_bad_image = "skip"`: decode every image once up front and leave out those that fail."""
    keep, bad = [], []
    for k, i in enumerate(split.indices):
        try:
            preprocess.convert(split.open(i))
            keep.append(k)
        except Exception:  # PIL raises many types for broken files
            bad.append(split.describe(i))
    if bad:
        log.warning("%s: skipped %d unreadable image(s) (data.on_bad_image = 'skip'), e.g. %s",
                    split.name, len(bad), bad[:3])
    return split.subset(split.name, keep)


def read_image(split: Split, i: int, preprocess: Preprocess) -> Image.Image:
    try:
        return preprocess.convert(split.open(i))
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {split.describe(i)}: {e}. Fix or remove the file, or set "
                        f"data.on_bad_image = \"skip\" to leave unreadable images out.") from None


def decode_once(split: Split, preprocess: Preprocess) -> Split:
    """`data.cache = "memory"`: decode every image once, in the model's channels, and keep the uint8 pixels;
    each later read is an array copy instead of a file read and decode."""
    pixels = {i: np.asarray(read_image(split, i, preprocess))
              for i in tqdm(split.indices, desc=f"decoding {split.name}", disable=None, leave=False)}
    return Split(split.name, split.labels, lambda i: Image.fromarray(pixels[i]), split.describe,
                 list(split.indices))


def build_splits(cfg: DataConfig) -> DataSplits:
    splits, class_names = LOADERS[cfg.source](cfg)
    if cfg.train_split not in splits:
        raise DataError(f"data.train_split = {cfg.train_split!r}: no such split; available: {sorted(splits)}")
    train = splits[cfg.train_split]
    val = _pick(splits, cfg.val_split, VAL_NAMES, "val_split")
    test = _pick(splits, cfg.test_split, TEST_NAMES, "test_split")
    if val is None:
        train, val = carve_val(train, cfg)
    if cfg.on_bad_image == "skip":
        pre = Preprocess.from_data(cfg)
        train, val = _drop_unreadable(train, pre), _drop_unreadable(val, pre)
        test = _drop_unreadable(test, pre) if test else None
    return DataSplits(train, val, test, class_names)


class ImageDataset(Dataset):
    """Split + transform. Train augmentation is seeded per (seed, epoch, item), so the images a step sees do
    not depend on worker count, process count, or where a run was resumed."""

    def __init__(self, split: Split, preprocess: Preprocess, transform, seed: int | None = None):
        self.split, self.preprocess, self.transform, self.seed = split, preprocess, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, k: int):
        i = self.split.indices[k]
        image = read_image(self.split, i, self.preprocess)
        if self.seed is None:
            return self.transform(image), self.split.labels[i]
        # The CPU generator alone, saved and restored around the transform: the same numbers as
        # fork_rng + torch.manual_seed, which also visit every accelerator backend and cost ~170 us per image.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF)
        try:
            return self.transform(image), self.split.labels[i]
        finally:
            generator.set_state(state)


def make_datasets(splits: DataSplits, cfg: DataConfig, seed: int) -> dict[str, ImageDataset]:
    pre = Preprocess.from_data(cfg)
    ready = (lambda s: decode_once(s, pre)) if cfg.cache == "memory" else (lambda s: s)
    out = {"train": ImageDataset(ready(splits.train), pre, pre.train_transform(cfg.augment), seed),
           "val": ImageDataset(ready(splits.val), pre, pre.eval_transform())}
    if splits.test is not None:
        out["test"] = ImageDataset(ready(splits.test), pre, pre.eval_transform())
    return out


def make_loader(ds: ImageDataset, batch_size: int, cfg: DataConfig, train: bool, seed: int) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, shuffle=train and cfg.shuffle, drop_last=train, num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(seed) if train else None,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )
