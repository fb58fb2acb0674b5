"""A split's images as one contiguous uint8 tensor [N, C, H, W] plus int64 labels [N], read a batch at a time.

    store = open_store(split, pre, cache="disk", frame="eval")        # store_disk.py; data.cache: none|memory|disk
    images, labels = store.batch(torch.tensor([3, 1, 4]))             # uint8 [3, C, H, W], int64 [3]
    loader = DataLoader(store, batch_size=64, collate_fn=keep_batch)  # batches (images, labels, positions)

Frames: what a stored image holds.
- "eval": exactly the uint8 pixels `Preprocess.eval_transform` hands to ToDtype/Normalize: converted to the
  model's channels, resized on the PIL image with the aspect ratio kept to cover image_size / crop_pct and
  centre-cut to image_size (framing.py) by that transform's own ops. Normalizing a batch of them
  (`augment.normalize`) is today's eval input, bit for bit.
- "train": converted, resized on the PIL image with the aspect ratio kept to cover a working size and
  centre-cut to it: image_size, or floor(image_size / crop_pct) when crop_pct < 1, so that `BatchAugment`
  (whose no-crop path centre-crops image_size from it) frames it as eval does, decoded as eval decodes it. The
  size is a parameter: a random-resized-crop recipe wants a larger working size to zoom into, and a JPEG of at
  least twice that size is then decoded at a reduced scale (libjpeg's draft mode), which eval never is.

Caches: "none" decodes the files of each batch (`DecodingImages`: the same pixels, no store); "memory" fills
a tensor in shared memory (DataLoader workers, forked or started by spawn/forkserver, map it instead of
copying it; each training process fills its own); "disk" maps a store file (`store_disk.py`, which also has
`open_store`, the choice among the three).
Fills decode in forked processes (`pool.map_chunks`), chunk by chunk, straight into the shared or mapped
store: memory stays flat.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm.auto import tqdm

from imgcls.data.fingerprint import FORMAT_VERSION
from imgcls.data.images import BAD_IMAGE_ERRORS, max_image_pixels, set_max_image_pixels
from imgcls.data.pool import local_processes, map_chunks
from imgcls.data.split import Split
from imgcls.errors import DataError
from imgcls.data.transforms import Preprocess, ResizeCover

log = logging.getLogger(__name__)

FRAMES = ("eval", "train")
CACHES = ("none", "memory", "disk")
CHUNK = 256  # images per pool task: little pool overhead, and the workers stay balanced
PIXELS, LABELS, MANIFEST, COMPLETE = "pixels.u8", "labels.npy", "manifest.json", "COMPLETE"


def working_size(pre: Preprocess, frame: str, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) of the stored images."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}; got {frame!r}")
    if frame == "eval":
        if size is not None and tuple(size) != tuple(pre.image_size):
            raise ValueError(f"the eval frame is image_size {tuple(pre.image_size)}; got size={tuple(size)}")
        return int(pre.image_size[0]), int(pre.image_size[1])
    if size is None:
        size = [math.floor(s / pre.crop_pct) for s in pre.image_size] if pre.crop_pct < 1 else pre.image_size
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) >= 1; got {size!r}")
    return int(size[0]), int(size[1])


def frame_ops(pre: Preprocess, frame: str, size: tuple[int, int] | None = None) -> v2.Compose:
    """The PIL ops of a frame: PIL image in the model's mode -> PIL image at the working size."""
    if frame == "eval":
        ops = pre.eval_transform().transforms  # its own ops, so the two can never drift apart
        if [type(op) for op in ops[-3:]] != [v2.ToImage, v2.ToDtype, v2.Normalize]:
            raise RuntimeError(f"Preprocess.eval_transform no longer ends with ToImage, ToDtype, Normalize: {ops}; "
                               f"update imgcls.data.store.frame_ops")
        return v2.Compose(ops[:-3])
    target = working_size(pre, frame, size)  # covered with the aspect ratio kept, then the centre, as eval does
    return v2.Compose([ResizeCover(target, pre.interp), v2.CenterCrop(target)])


def to_chw(image: Image.Image) -> torch.Tensor:
    """uint8 [C, H, W] of an L or RGB image: the pixels `v2.ToImage()` gives, without its ~60 us a call."""
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array).unsqueeze(0) if array.ndim == 2 else torch.from_numpy(array).permute(2, 0, 1)


class Framer:
    """Position k of a split -> its uint8 pixels [C, H, W] in a frame. Plain data: pickles to workers."""

    def __init__(self, split: Split, pre: Preprocess, frame: str, size: tuple[int, int] | None = None):
        self.split, self.pre, self.ops = split, pre, frame_ops(pre, frame, size)
        self.shape = (pre.channels, *working_size(pre, frame, size))
        # A frame with nothing to cut (train, or eval at crop_pct 1) leaves an image already at its size as it is,
        # so such images skip the ~80 us of the v2 calls: MNIST's 70,000 28x28 images
        nothing_to_cut = frame == "train" or pre.crop_pct >= 1.0
        self.unchanged_at = (self.shape[2], self.shape[1]) if nothing_to_cut else None
        # a train frame larger (or smaller) than the eval frame is resized anyway: a large JPEG may be decoded at
        # 1/2-1/8 scale first. At the eval frame's size it is decoded fully, as eval and predict decode it, so that
        # with augmentation off train pixels are eval pixels
        other_size = frame == "train" and tuple(self.shape[1:]) != tuple(pre.frame_size())
        self.draft = (self.shape[2], self.shape[1]) if other_size else None
        self.max_pixels = max_image_pixels()  # data.max_image_pixels, carried to spawned workers

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        set_max_image_pixels(self.max_pixels)  # a spawned worker starts with the default

    def __call__(self, k: int) -> torch.Tensor:
        i = self.split.indices[k]
        try:
            image = self.pre.convert(self.split.open(i, self.draft))
        except BAD_IMAGE_ERRORS as e:
            raise DataError(f"cannot read image {self.split.describe(i)}: {type(e).__name__}: {e}. Fix or remove "
                            f"the file, or set data.on_bad_image = \"skip\" to leave unreadable images out.") from None
        pixels = to_chw(image if image.size == self.unchanged_at else self.ops(image))
        if tuple(pixels.shape) != self.shape:  # copy_ would broadcast a wrong shape silently
            raise RuntimeError(f"{self.split.describe(i)}: framed to {tuple(pixels.shape)}, expected {self.shape}")
        return pixels

    def labels(self) -> torch.Tensor:
        return torch.tensor([self.split.label(k) for k in range(len(self.split))], dtype=torch.int64)


def keep_batch(batch):
    """collate_fn for loaders over a store: `__getitems__` already returns the whole batch."""
    return batch


class _Batches:
    """What both kinds of store give a DataLoader: whole batches through `__getitems__`."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        images, labels = self.batch(torch.tensor([k]))
        return images[0], int(labels[0])

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(positions, dtype=torch.int64)
        images, labels = self.batch(index)
        return images, labels, index


class ImageStore(_Batches):
    """pixels uint8 [N, C, H, W] and labels int64 [N]; `path` is the folder of a disk store, else None."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, path: Path | None = None):
        self.pixels, self.labels, self.path = pixels, labels, path

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.pixels.shape[-2:])

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, C, H, W] and int64 [B] of the stored positions (an int64 tensor [B])."""
        return self.pixels.index_select(0, positions), self.labels.index_select(0, positions)

    @classmethod
    def open(cls, folder: Path) -> "ImageStore":
        """Map a complete disk store; DataError naming the file when it does not match its manifest."""
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        shape = tuple(manifest["shape"])
        if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != folder.name:
            raise DataError(f"{folder / MANIFEST}: written for another key or format")
        nbytes, found = math.prod(shape), (folder / PIXELS).stat().st_size
        if found != nbytes:
            raise DataError(f"{folder / PIXELS}: {found} bytes, its manifest says {shape} = {nbytes}")
        labels = torch.from_numpy(np.load(folder / LABELS))
        if labels.shape != shape[:1] or labels.dtype != torch.int64:
            raise DataError(f"{folder / LABELS}: {labels.dtype} {tuple(labels.shape)}, expected int64 {shape[:1]}")
        # shared=False maps the file privately: pages are the page cache's (one copy per node) until written,
        # and a write never reaches the file
        pixels = torch.from_file(str(folder / PIXELS), shared=False, size=nbytes, dtype=torch.uint8) \
            if nbytes else torch.empty(0, dtype=torch.uint8)
        return cls(pixels.view(shape), labels, folder)

    def __getstate__(self) -> dict:
        # a disk store travels to spawn/forkserver workers as its path and is mapped there again
        return {"path": self.path} if self.path is not None else self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(ImageStore.open(state["path"]).__dict__ if "pixels" not in state else state)


class DecodingImages(_Batches):
    """data.cache = "none": an ImageStore's interface and pixels, decoded from the source on every read."""

    def __init__(self, split: Split, pre: Preprocess, frame: str, size: tuple[int, int] | None = None):
        self.framer = Framer(split, pre, frame, size)
        self.labels = self.framer.labels()

    @property
    def size(self) -> tuple[int, int]:
        return self.framer.shape[1:]

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.labels.index_select(0, positions)
        images = torch.empty((len(positions), *self.framer.shape), dtype=torch.uint8)
        for b, k in enumerate(positions.tolist()):
            images[b] = self.framer(k)
        return images, labels


# ---------------------------------------------------------------- filling
def _fill_chunk(shared: tuple[torch.Tensor, "Framer"], start: int) -> int:
    pixels, framer = shared
    stop = min(start + CHUNK, pixels.shape[0])
    for k in range(start, stop):
        pixels[k].copy_(framer(k))
    return stop - start


def fill(pixels: torch.Tensor, framer: Framer, desc: str, show: bool = True, workers: int | None = None) -> None:
    """Write image k into pixels[k] for every k (a tensor in shared memory or a mapped file, which the forked
    pool's processes write in place); the first error stops the rest."""
    n = pixels.shape[0]
    started = time.perf_counter()
    with tqdm(total=n, desc=desc, unit="img", disable=None if show else True, leave=False) as bar:
        for done in map_chunks(_fill_chunk, (pixels, framer), range(0, n, CHUNK), workers):
            bar.update(done)
    seconds = time.perf_counter() - started
    log.info("%s: %d images in %.1f s (%.0f images/s)", desc, n, seconds, n / max(seconds, 1e-9))


def _shared_tensor(shape: tuple[int, ...], split: Split) -> torch.Tensor:
    nbytes, shm, copies = math.prod(shape), Path("/dev/shm"), local_processes()
    if shm.is_dir():  # where torch puts shared tensors on Linux; containers often give it 64 MB
        st = os.statvfs(shm)  # each process of the node fills its own copy
        if nbytes * copies > st.f_bavail * st.f_frsize:
            each = f" in each of the {copies} processes on this node ({nbytes * copies / 2**20:.0f} MiB in all)" \
                if copies > 1 else ""
            raise DataError(f'data.cache = "memory": the {split.name} images need {nbytes / 2**20:.0f} MiB of '
                            f'shared memory{each}, {shm} has {st.f_bavail * st.f_frsize / 2**20:.0f} MiB free; use '
                            f'data.cache = "disk", or give the container more (docker run --shm-size=...)')
    # an untouched torch.empty reads as the zero page: moving it to shared memory costs no second copy
    return torch.empty(shape, dtype=torch.uint8).share_memory_()


def fill_memory(split: Split, pre: Preprocess, frame: str, size: tuple[int, int] | None = None,
                show: bool = True, workers: int | None = None) -> ImageStore:
    """A store in shared memory, filled now from the split."""
    framer = Framer(split, pre, frame, size)
    pixels = _shared_tensor((len(split), *framer.shape), split)
    fill(pixels, framer, f"decoding {split.name}", show, workers)
    return ImageStore(pixels, framer.labels().share_memory_())
