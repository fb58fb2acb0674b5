"""`[data]`: build the train / val / test datasets and loaders from any source.

`build_splits` indexes the source, checks its classes (`labels.check_classes`), picks or carves val, and
decodes every image once up front (`scan.check_images`), so that a broken file or an empty class folder is
named before training, not from inside a DataLoader worker.

Val drives model selection; test is evaluated once at the end. A source without a val split gets one carved
from train by a fixed rule (`val_size` or `val_fraction`, `val_pick` first/random with `split_seed`): for
MNIST the classic rule, the first 5,000 training images, gives the 55,000 / 5,000 / 10,000 table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .images import BAD_IMAGE_ERRORS
from .labels import check_classes
from .recipe import DataConfig
from .scan import check_images
from .sources import SOURCES, TEST_NAMES, VAL_NAMES, DataError, Split
from .transforms import Preprocess


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


def read_image(split: Split, i: int, preprocess: Preprocess) -> Image.Image:
    """Item i in the model's channels. A file that broke after the up-front check is named here."""
    try:
        return preprocess.convert(split.open(i))
    except BAD_IMAGE_ERRORS as e:
        raise DataError(f"cannot read image {split.describe(i)}: {type(e).__name__}: {e}. Fix or remove the file, "
                        f"or set data.on_bad_image = \"skip\" to leave unreadable images out.") from None


class DecodedImages:
    """Reader over pixels decoded once (`data.cache = "memory"`); names items as the source does."""

    def __init__(self, pixels: dict[int, np.ndarray], source):
        self.pixels, self.source = pixels, source

    def open(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i])

    def describe(self, i: int) -> str:
        return self.source.describe(i)

    def check(self, i: int) -> None:
        """Decoded already."""


def decode_once(split: Split, preprocess: Preprocess) -> Split:
    """`data.cache = "memory"`: decode every image once, in the model's channels, and keep the uint8 pixels;
    each later read is an array copy instead of a file read and decode."""
    pixels = {i: np.asarray(read_image(split, i, preprocess))
              for i in tqdm(split.indices, desc=f"decoding {split.name}", disable=None, leave=False)}
    return Split(split.name, split.labels, DecodedImages(pixels, split.reader), list(split.indices))


def build_splits(cfg: DataConfig) -> DataSplits:
    found = SOURCES[cfg.source](cfg)
    splits = found.splits
    if cfg.train_split not in splits:
        raise DataError(f"data.train_split = {cfg.train_split!r}: no such split; available: {sorted(splits)}")
    if found.first_seen is not None:  # classes from the user's labels or folders: each must be a real one
        check_classes(found.class_names, splits, found.first_seen, cfg.allow_rare_classes)
    train = splits[cfg.train_split]
    val = _pick(splits, cfg.val_split, VAL_NAMES, "val_split")
    test = _pick(splits, cfg.test_split, TEST_NAMES, "test_split")
    if val is None:
        train, val = carve_val(train, cfg)
    checked = check_images({"train": train, "val": val, **({"test": test} if test else {})}, found.empty_folders,
                           cfg.on_bad_image)
    return DataSplits(checked["train"], checked["val"], checked.get("test"), found.class_names)


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
