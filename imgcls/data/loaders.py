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

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from imgcls.data.augment import BatchAugment, normalize
from imgcls.data.classnames import check_class_names
from imgcls.errors import ClassNameError, DataError
from imgcls.data.gpu_decode import EncodedBatch, EncodedImages, decode_batch
from imgcls.data.hub import streaming_refusal
from imgcls.data.imbalance import BalancedSampler, split_labels
from imgcls.data.images import BAD_IMAGE_ERRORS
from imgcls.data.labels import check_classes
from imgcls.recipe import DataConfig
from imgcls.data.scan import check_images
from imgcls.data.shard_order import ShardOrderSampler
from imgcls.data.shards import shard_counts
from imgcls.data.sources import SOURCES, TEST_NAMES, VAL_NAMES, Split
from imgcls.data.store import keep_batch
from imgcls.data.store_disk import open_store
from imgcls.data.transforms import Preprocess


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split | None
    class_names: list[str]

    def sizes(self) -> str:
        return f"train {len(self.train)} / val {len(self.val)} / test {len(self.test) if self.test else 0}"


def pick_split(splits: dict, wanted: str, synonyms: tuple[str, ...], key: str) -> Split | None:
    """The split `data.<key>` names, else the first of `synonyms` the source has (None: none of them)."""
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


def build_splits(cfg: DataConfig) -> DataSplits:
    if cfg.streaming:
        raise streaming_refusal(cfg)
    found = SOURCES[cfg.source](cfg)
    splits = found.splits
    if cfg.train_split not in splits:
        raise DataError(f"data.train_split = {cfg.train_split!r}: no such split; available: {sorted(splits)}")
    try:
        check_class_names(found.class_names, f"data.source = {cfg.source!r}")
    except ClassNameError as e:
        raise DataError(str(e)) from None
    if found.first_seen is not None:  # classes from the user's labels or folders: each must be a real one
        check_classes(found.class_names, splits, found.first_seen, cfg.allow_rare_classes)
    train = splits[cfg.train_split]
    val = pick_split(splits, cfg.val_split, VAL_NAMES, "val_split")
    test = pick_split(splits, cfg.test_split, TEST_NAMES, "test_split")
    if val is None:
        train, val = carve_val(train, cfg)
    named = {"train": train, "val": val, **({"test": test} if test else {})}
    # shards hold images `imgcls-data shard` checked when it wrote them, each shard verified by its sha256 when
    # read: decoding them all again here would download every remote shard before the first step
    checked = named if cfg.source == "shards" else check_images(named, found.empty_folders, cfg.on_bad_image,
                                                                 cfg.cache_dir, cfg.max_image_pixels)
    return DataSplits(checked["train"], checked["val"], checked.get("test"), found.class_names)


class ImageDataset(Dataset):
    """Split + a per-image transform (imgcls-eval's predict-equivalent path)."""

    def __init__(self, split: Split, preprocess: Preprocess, transform):
        self.split, self.preprocess, self.transform = split, preprocess, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, k: int):
        i = self.split.indices[k]
        return self.transform(read_image(self.split, i, self.preprocess)), self.split.labels[i]


class Images(Dataset):
    """A split as uint8 pixels (an `ImageStore`, or `DecodingImages` for `cache = "none"`) plus the step that
    turns a uint8 batch into the model's input on the model's device: `BatchAugment` for train (per-sample random
    parameters from (seed, epoch, sample position)), `normalize` for evaluation.

    A DataLoader fetches whole batches (`__getitems__`): (uint8 images, labels, positions); the loop calls
    `model_input(images, positions)` on the device. `dataset[k]` gives one sample's model input, the same pixels."""

    def __init__(self, pixels, pre: Preprocess, augment: BatchAugment | None = None, seed: int = 0):
        self.pixels, self.pre, self.augment, self.seed = pixels, pre, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pixels)

    def set_augment_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation `model_input` applies. Not named `set_epoch`: accelerate's loaders call
        a dataset's `set_epoch` with their own iteration count."""
        self.epoch = epoch

    def __getitems__(self, keys: list[int]):
        """(uint8 images, labels, keys). A key is a position, or for a repeated draw of the balanced sampler
        position + N x repeat (`imbalance.BalancedSampler.keys`): the pixels are the position's, the augmentation
        is keyed on the key."""
        n = len(self.pixels)
        if max(keys, default=0) < n:
            return self.pixels.__getitems__(keys)
        images, labels, _ = self.pixels.__getitems__([k % n for k in keys])
        return images, labels, torch.as_tensor(keys, dtype=torch.int64)

    def model_input(self, images: torch.Tensor | EncodedBatch, positions: torch.Tensor) -> torch.Tensor:
        if isinstance(images, EncodedBatch):  # data.decode = "gpu": decoded where the positions are, the device
            images = decode_batch(images, positions.device, self.pixels.size, self.pre)
        if self.augment is None:
            return normalize(images, self.pre.mean, self.pre.std)
        return self.augment(images, positions, self.epoch, self.seed)

    def __getitem__(self, k: int):
        images, labels, positions = self.__getitems__([k])
        return self.model_input(images, positions)[0], int(labels[0])


def make_datasets(splits: DataSplits, cfg: DataConfig, seed: int) -> dict[str, Images]:
    """Train pixels at the working size (augmented on the device), val/test at the eval framing (normalized)."""
    pre = Preprocess.from_data(cfg)
    size = tuple(cfg.working_size) if cfg.working_size else None

    def pixels(split: Split, frame: str):
        if frame == "train" and cfg.decode == "gpu":
            return EncodedImages(split, pre, size)
        return open_store(split, pre, cfg.cache, frame, size if frame == "train" else None, cfg.cache_dir)
    out = {"train": Images(pixels(splits.train, "train"), pre, BatchAugment.from_preprocess(cfg.augment, pre), seed),
           "val": Images(pixels(splits.val, "eval"), pre)}
    if splits.test is not None:
        out["test"] = Images(pixels(splits.test, "eval"), pre)
    return out


def train_sampler(split: Split, cfg: DataConfig, seed: int, world_size: int, per_device_batch: int,
                  micro_batches_per_epoch: int) -> ShardOrderSampler | BalancedSampler | None:
    """data.source = "shards": the order in which each process reads its own run of shards (shard_order.py);
    data.sampler = "balanced": each class about equally often, a draw of (seed, epoch) (imbalance.py);
    otherwise None, the loader's own shuffle."""
    if cfg.sampler == "balanced":  # the recipe refuses it with shards
        return BalancedSampler(split_labels(split), seed)
    if cfg.source != "shards":
        return None
    return ShardOrderSampler(shard_counts(split), world_size, per_device_batch, micro_batches_per_epoch, seed,
                             cfg.shuffle)


def make_loader(ds: Images, batch_size: int, cfg: DataConfig, train: bool, seed: int,
                sampler: Sampler[int] | None = None) -> DataLoader:
    """Whole batches of uint8 (a quarter of float32's bytes) cross the worker and host-to-device boundaries.
    `sampler` (from `train_sampler`) replaces the loader's own shuffle; it is handed the epoch by `set_epoch`."""
    workers = cfg.workers
    shuffle = train and cfg.shuffle and sampler is None
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=train, num_workers=workers,
        # every loader has its own generator, also where nothing is shuffled: a DataLoader without one draws its
        # workers' base seed from the global RNG each time it starts an iterator (persistent workers: only the
        # first time), so a resumed run, whose val loader starts anew mid-run, shifted dropout's numbers
        generator=torch.Generator().manual_seed(seed), collate_fn=keep_batch,
        persistent_workers=workers > 0 and cfg.cache == "none", pin_memory=torch.cuda.is_available(),
    )
