"""Opening image files and bytes: the one place that does it, so every path sees the same pixels.

Training (folder, list file, hub rows), evaluation, `imgcls-predict` (also the torch-free ONNX path) and the
export parity check all open images here. The image is decoded and turned upright by its EXIF orientation
(`PIL.ImageOps.exif_transpose`): a phone photo tagged "rotate 90" is stored sideways, and a model trained or
run on the stored pixels would see it sideways. Imports PIL only.

    image = open_image("photo.jpg")              # or open_image(png_bytes)
    check_image("photo.jpg")                     # decode cheaply; raises one of BAD_IMAGE_ERRORS if broken
"""
from __future__ import annotations

import io
import os
import stat
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes]

# What PIL raises for a file that is not a readable image (measured by fuzzing truncated and corrupted PNG,
# JPEG, BMP, TIFF, GIF and WebP files with Pillow 13: OSError, UnidentifiedImageError and
# DecompressionBombError; SyntaxError, ValueError and EOFError come from older plugins and header parsers).
# Anything else is a bug, not a bad image, and is not caught.
BAD_IMAGE_ERRORS = (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError,
                    EOFError)


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    data = _read_regular_file(source)
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's own words, naming the file rather than the buffer
        raise UnidentifiedImageError(f"cannot identify image file {os.fspath(source)!r}") from None


def _read_regular_file(path: Union[str, os.PathLike]) -> bytes:
    """The bytes of `path`, if it is a regular file. Opened non-blocking and checked on the open descriptor (no
    window for a swap between a check and the open): a FIFO named x.png would otherwise wait for a writer
    forever, a device would be read without end. Read whole, so no descriptor outlives the call."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{os.fsdecode(path)}: not a regular file (a FIFO, device, socket or folder); images are "
                          "read from regular files only")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def open_image(source: ImageSource, draft: tuple[int, int] | None = None) -> Image.Image:
    """The decoded image of a path or of encoded bytes, upright by its EXIF orientation. `draft` (width,
    height): a JPEG much larger than that is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (never below `draft`),
    several times faster; for training images that are resized to a working size anyway, never for evaluation,
    whose pixels must equal imgcls-predict's."""
    with _open(source) as im:
        if draft is not None and im.format == "JPEG":
            w, h = draft
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # the stored image is turned by 90 degrees
            im.draft(im.mode, (h, w) if turned else (w, h))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when there is nothing to turn
        return im


def check_image(source: ImageSource) -> None:
    """Decode `source` as `open_image` would, cheaply: a JPEG is decoded at 1/8 scale (libjpeg still reads
    every byte of the entropy-coded data, so truncation and corruption are found, at about half the cost of a
    full decode); other formats are decoded fully. `Image.verify()` alone is cheaper but passes truncated
    JPEGs, the commonest broken file (a partial download)."""
    with _open(source) as im:
        if im.format == "JPEG":
            im.draft(im.mode, (1, 1))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
