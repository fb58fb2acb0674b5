"""Preprocessing the model owns (size, channels, mean/std, interpolation) and train-time augmentation.

`Preprocess` is stored in every artifact; predict/export/eval rebuild the eval transform from it, never from
defaults. Transforms are torchvision v2. Training does not run `train_transform` image by image any more: it
is the per-image definition that `augment.BatchAugment` reproduces on whole uint8 batches (tests hold the two
together); the image store frames its eval pixels with `eval_transform`'s own ops.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from imgcls.data.autoaugment import geometric_mode
from imgcls.data.framing import cover_size
from imgcls.data.images import to_channels
from imgcls.recipe import AugmentConfig, DataConfig

_MODES = {"L": 1, "RGB": 3}


@dataclass(frozen=True)
class Preprocess:
    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float = 1.0

    @classmethod
    def from_data(cls, data: DataConfig) -> "Preprocess":
        return cls(tuple(data.image_size), data.channels, tuple(data.mean), tuple(data.std),
                   data.interpolation, data.crop_pct)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(tuple(d["image_size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]),
                   d["interpolation"], float(d.get("crop_pct", 1.0)))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def interp(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def convert(self, image: Image.Image) -> Image.Image:
        """Any PIL mode (P, RGBA, I;16B, F, CMYK, LAB, ...) to the model's channels (`images.to_channels`)."""
        return to_channels(image, self.channels)

    def _tail(self) -> list:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def _resize(self) -> v2.Resize:
        """To image_size / crop_pct: the frame that the (center or random) crop of image_size is taken from."""
        h, w = self.image_size
        size = (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)) if self.crop_pct < 1.0 else (h, w)
        return v2.Resize(size, interpolation=self.interp, antialias=True)

    def frame_size(self) -> tuple[int, int]:
        """image_size / crop_pct (floored): the frame the eval crop is cut from."""
        h, w = self.image_size
        return (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)) if self.crop_pct < 1.0 else (h, w)

    def eval_transform(self) -> v2.Compose:
        """Resize keeping the aspect ratio to cover the frame, then the centre image_size (framing.py), on the
        PIL image, as predict/export do without torch: the same pixels on every path."""
        return v2.Compose([*self._frame(), *self._center(), *self._tail()])

    def _frame(self) -> list:
        """Resize with the aspect ratio kept to cover the frame, then its centre: the stored train frame too."""
        return [ResizeCover(self.frame_size(), self.interp), v2.CenterCrop(self.frame_size())]

    def _center(self) -> list:
        """image_size from the frame's centre (crop_pct < 1): the same two cuts as train's frame, then crop."""
        return [v2.CenterCrop(self.image_size)] if self.frame_size() != tuple(self.image_size) else []

    def train_transform(self, aug: AugmentConfig) -> v2.Compose:
        """Without random_resized_crop the image is framed as eval frames it (resized with its aspect ratio kept
        to cover image_size / crop_pct, the centre of that, on the PIL image), then cropped to image_size: at
        random from the padded frame with crop_padding, else in the center. With augmentation off, train pixels
        are eval pixels."""
        h, w = self.image_size
        if aug.random_resized_crop:
            ops: list = [v2.RandomResizedCrop((h, w), scale=aug.scale, interpolation=self.interp, antialias=True),
                         v2.ToImage()]
        else:
            ops = [*self._frame(), v2.ToImage()]
            if aug.crop_padding:
                ops.append(v2.RandomCrop((h, w), padding=aug.crop_padding))
            else:
                ops += self._center()
        if aug.rotation:
            ops.append(v2.RandomRotation(aug.rotation, interpolation=self.interp))
        if aug.hflip:
            ops.append(v2.RandomHorizontalFlip(aug.hflip))
        mode = InterpolationMode(geometric_mode(self.interpolation))  # tensor affine: nearest or bilinear only
        if aug.auto_augment == "randaugment":
            ops.append(v2.RandAugment(aug.randaugment_ops, aug.randaugment_magnitude, interpolation=mode))
        elif aug.auto_augment == "trivialaugment":
            ops.append(v2.TrivialAugmentWide(interpolation=mode))
        elif aug.auto_augment == "autoaugment":
            ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=mode))
        if aug.color_jitter:
            j = aug.color_jitter
            ops.append(v2.ColorJitter(j, j, j if self.channels == 3 else 0))
        erasing = [v2.RandomErasing(aug.random_erasing)] if aug.random_erasing else []
        return v2.Compose([*ops, *self._tail()[1:], *erasing])


class ResizeCover:
    """`v2.functional.resize` to the size that covers `frame` with the input's aspect ratio
    (`framing.cover_size`); a PIL image or a tensor, as the v2 ops around it."""

    def __init__(self, frame: tuple[int, int], interpolation: InterpolationMode):
        self.frame, self.interpolation = tuple(frame), interpolation

    def __call__(self, image):
        h, w = v2.functional.get_size(image)
        return v2.functional.resize(image, list(cover_size(h, w, *self.frame)), interpolation=self.interpolation,
                                    antialias=True)

    def __repr__(self) -> str:
        return f"ResizeCover(frame={self.frame}, interpolation={self.interpolation.value})"


def batch_mix(aug: AugmentConfig, num_classes: int) -> v2.Transform | None:
    """MixUp / CutMix on whole batches (targets become soft), as in torchvision's reference scripts."""
    ops = []
    if aug.mixup_alpha:
        ops.append(v2.MixUp(alpha=aug.mixup_alpha, num_classes=num_classes))
    if aug.cutmix_alpha:
        ops.append(v2.CutMix(alpha=aug.cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
