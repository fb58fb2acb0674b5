"""The preprocessing that serving shares with training's eval frame, torch-free (PIL + numpy): the image to the
model's channels, resized to cover the frame with its aspect ratio kept (data.crop_pct's larger frame first),
centre-cut, scaled to 0..1 and normalised. Exactly torchvision's v2 Resize / CenterCrop / ToImage / ToDtype /
Normalize on a PIL image, as the trainer's eval transform does, so the trainer, the artifact and an ONNX file see
the same pixels. `read_views` adds the flip (and crop) views of `--tta`.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from imgcls.data.framing import center_box, cover_size
from imgcls.data.images import open_image, to_channels

PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC}


# ---------------------------------------------------------------- preprocessing (torch-free)
def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode to the model's channels: `imgcls.data.images.to_channels`, as training converts."""
    return to_channels(image, channels)


def _resize(image: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    h, w = size
    return image if image.size == (w, h) else image.resize((w, h), PIL_FILTERS[interpolation])


def prepare(image: Image.Image, pre: dict) -> np.ndarray:
    """A PIL image (any mode) -> normalised float32 (C, H, W), from an artifact's `preprocess` dict."""
    image = to_mode(image, int(pre["channels"]))
    h, w = pre["image_size"]
    crop_pct = float(pre.get("crop_pct", 1.0))
    frame = (math.floor(h / crop_pct), math.floor(w / crop_pct)) if crop_pct < 1.0 else (h, w)
    rh, rw = cover_size(image.height, image.width, *frame)  # the aspect ratio kept, as in training
    image = _resize(image, (rh, rw), pre["interpolation"])
    for ch, cw in (frame, (h, w)):  # the frame's centre, then image_size's centre of it: training's two cuts
        top, left = center_box(image.height, image.width, ch, cw)
        if (image.height, image.width) != (ch, cw):
            image = image.crop((left, top, left + cw, top + ch))
    a = np.asarray(image, dtype=np.float32).reshape(h, w, -1).transpose(2, 0, 1)
    a = a * np.float32(1.0 / 255)
    mean = np.asarray(pre["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(pre["std"], dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((a - mean) / std)


def center_crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def read_views(path: str, pre: dict, tta: bool = False, tta_crop: float = 0.0) -> np.ndarray:
    """The image and its test-time views (horizontal flip, center crop), preprocessed: (views, C, H, W)."""
    image = to_mode(open_image(path), int(pre["channels"]))  # upright by its EXIF orientation, as in training
    views = [image]
    if tta:
        views.append(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    if tta_crop:
        views.append(center_crop(image, tta_crop))
    return np.stack([prepare(v, pre) for v in views])

