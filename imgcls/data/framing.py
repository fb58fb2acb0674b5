"""The eval framing's geometry, without torch (predict's ONNX path imports it too).

An image is resized, keeping its aspect ratio, to the smallest size that covers the frame (image_size /
crop_pct), then the centre image_size is cut out: timm's and torchvision's eval transform (`Resize(short side)`
+ `CenterCrop`) for square frames, and the same rule for any frame. A photo is never squashed.
"""
from __future__ import annotations


def cover_size(height: int, width: int, frame_h: int, frame_w: int) -> tuple[int, int]:
    """(h, w) of an image of `height` x `width` resized to cover `frame_h` x `frame_w` with its aspect ratio: the
    tighter side matches the frame, the other is floored as torchvision's `Resize(int)` floors its long side."""
    if width * frame_h >= height * frame_w:  # relatively wider than the frame: the height fits
        return frame_h, max(frame_w, int(frame_h * width / height))
    return max(frame_h, int(frame_w * height / width)), frame_w


def center_box(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """(top, left) of torchvision's `CenterCrop`: round((size - crop) / 2)."""
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
