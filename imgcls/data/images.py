"""Opening image files and bytes: the one place that does it, so every path sees the same pixels.

Training (folder, list file, hub rows), evaluation, `imgcls-predict` (also the torch-free ONNX path) and the
export parity check all open images here. The image is decoded and turned upright by its EXIF orientation
(`PIL.ImageOps.exif_transpose`): a phone photo tagged "rotate 90" is stored sideways, and a model trained or
run on the stored pixels would see it sideways. Imports PIL only.

    image = open_image("photo.jpg")              # or open_image(png_bytes)
    check_image("photo.jpg")                     # decode cheaply; raises one of BAD_IMAGE_ERRORS if broken
    rgb = to_channels(image, 3)                  # any PIL mode -> "RGB" (3) or "L" (1), its meaning kept

An image of more than `max_image_pixels()` pixels (`data.max_image_pixels`, set for the process by
`set_max_image_pixels`) is refused from its header, before anything is decoded: a small PNG can hold a
decompression bomb of 169 Mpx, below Pillow's own limit, that costs almost 1 GB per decoder to decode.
"""
from __future__ import annotations

import errno
import io
import os
import stat
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes]

# What PIL raises for a file that is not a readable image (measured by fuzzing truncated and corrupted PNG,
# JPEG, BMP, TIFF, GIF and WebP files with Pillow 13: OSError, UnidentifiedImageError and
# DecompressionBombError; SyntaxError, ValueError and EOFError come from older plugins and header parsers).
# Anything else is a bug, not a bad image, and is not caught.
BAD_IMAGE_ERRORS = (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError,
                    EOFError)


MAX_IMAGE_PIXELS = 64 * 2**20  # data.max_image_pixels' default: 64 Mpx, a 9,500 x 7,000 photo; 200 MB as RGB
_limit = {"pixels": MAX_IMAGE_PIXELS}


def set_max_image_pixels(pixels: int) -> None:
    """The most pixels an image may have in this process (forked decoders inherit it), as Pillow's own
    `Image.MAX_IMAGE_PIXELS` is set for the process."""
    _limit["pixels"] = int(pixels)


def max_image_pixels() -> int:
    return _limit["pixels"]


class NotAnImageFile(OSError):
    """A symlink that leads to no image (dangling, or a loop): a bad image, not a
    passing read error (its errno is None)."""


def _open(source: ImageSource) -> Image.Image:
    name = "<bytes>" if isinstance(source, bytes) else os.fsdecode(source)
    try:
        im = Image.open(io.BytesIO(source if isinstance(source, bytes) else _read_regular_file(source)))
    except UnidentifiedImageError:  # PIL's own words, naming the file rather than the buffer
        raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
    width, height = im.size
    if width * height > _limit["pixels"]:
        im.close()
        raise Image.DecompressionBombError(
            f"{name}: {width}x{height} = {width * height:,} pixels, more than data.max_image_pixels = "
            f"{_limit['pixels']:,} (a decompression bomb, or far more detail than a classifier uses); shrink it, "
            f"or raise data.max_image_pixels if such images are meant")
    return im


def _read_regular_file(path: Union[str, os.PathLike]) -> bytes:
    """The bytes of `path`, if it is a regular file. Opened non-blocking and checked on the open descriptor (no
    window for a swap between a check and the open): a FIFO named x.png would otherwise wait for a writer
    forever, a device would be read without end. Read whole, so no descriptor outlives the call."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        _name_link_problem(path, e)
        raise
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


def _name_link_problem(path: Union[str, os.PathLike], e: OSError) -> None:
    """Say what is wrong with a symlink that cannot be opened (ELOOP, or ENOENT for a dangling one)."""
    if e.errno == errno.ELOOP:
        raise NotAnImageFile(f"{os.fsdecode(path)}: a symbolic link loop (the link leads back to itself); "
                             f"remove it or point it at an image") from None
    if e.errno == errno.ENOENT and os.path.islink(path):
        raise NotAnImageFile(f"{os.fsdecode(path)}: a dangling symbolic link (its target "
                             f"{os.fsdecode(os.readlink(path))!r} does not exist); remove it or restore the "
                             f"target") from None


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


# ---------------------------------------------------------------- modes
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _gray8(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float gray image as 8-bit L. Integers are 16-bit values (what 16-bit PNGs
    and TIFFs hold): v / 257 rounded, so 65535 is 255 (Pillow's own conversion clips everything above 255 to
    white); I is clipped to 0..65535. Floats are 0..1 when no value exceeds 1 (float TIFFs), else 0..255 as
    Pillow reads them (Pillow's own conversion makes 0..1 black)."""
    a = np.asarray(image)
    if image.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scaled = a * 255.0 if a.size and a.max() <= 1.0 else a
    else:
        scaled = np.clip(a.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Any mode PIL gives (1, L, P, PA, LA, RGB, RGBA, CMYK, YCbCr, LAB, HSV, I, I;16, I;16B, I;16L, F) as "L"
    (channels 1) or "RGB" (3): transparency composited on white, 16-bit and float gray scaled (`_gray8`),
    colour spaces through RGB, gray from RGB by ITU-R 601 luma (Pillow's L). Training and predict both use it."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode == mode:
        return image
    if image.mode in _SIXTEEN or image.mode == "F":
        gray = _gray8(image)
        return gray if mode == "L" else gray.convert(mode)
    if image.mode in _ALPHA or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    elif image.mode not in ("1", "L", "P", "RGB"):  # CMYK, YCbCr, LAB, HSV: to gray through RGB
        image = image.convert("RGB")
    return image.convert(mode)
