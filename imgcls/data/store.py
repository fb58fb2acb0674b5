"""A split's images as one contiguous uint8 tensor [N, C, H, W] plus int64 labels [N], read a batch at a time.

    store = open_store(split, pre, cache="disk", frame="eval")        # data.cache: "none" | "memory" | "disk"
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
copying it; each training process fills its own); "disk" keeps the store under <cache_root>/<key>/ (see
`fingerprint.py` for the key) as a file that every process maps (the page cache holds one copy per node).
A disk store is written to .<key>.<random>.tmp/ (`atomic.tmp_dir`) with COMPLETE last, then renamed, under a file
lock (<key>.lock): a stopped fill is never used, and the next filler removes it. A store is mapped only when its
folder and files are this user's own regular files (not links) that match their manifest: a folder someone else
planted in a shared cache_dir is refused, a planted link refilled. With several processes on a node,
local rank 0 fills; the others wait for COMPLETE for as long as a filler holds the lock.
Fills decode in forked processes (`pool.map_chunks`), chunk by chunk, straight into the shared or mapped
store: memory stays flat.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm.auto import tqdm

from imgcls.atomic import tmp_dir
from imgcls.data.fingerprint import FORMAT_VERSION, cache_root, frame_inputs, source_fingerprint, store_key
from imgcls.data.images import BAD_IMAGE_ERRORS, max_image_pixels, set_max_image_pixels
from imgcls.data.pool import local_processes, map_chunks
from imgcls.data.split import Split
from imgcls.errors import DataError
from imgcls.data.storelock import START_WAIT_S, fill_lock, wait_for_filler
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


# ---------------------------------------------------------------- disk
def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_space(root: Path, nbytes: int) -> None:
    st = os.statvfs(root)
    if nbytes > st.f_bavail * st.f_frsize:
        raise DataError(f'data.cache = "disk": the store needs {nbytes / 2**20:.0f} MiB, {root} has '
                        f'{st.f_bavail * st.f_frsize / 2**20:.0f} MiB free; set data.cache_dir to a bigger disk '
                        f'(or $IMGCLS_CACHE), or use data.cache = "memory"')


def _fill_disk(framer: Framer, split: Split, folder: Path, inputs: dict, show: bool, workers: int | None) -> None:
    """Fill .<key>.<random>.tmp/, write COMPLETE last, rename it to <key>/."""
    shape = (len(split), *framer.shape)
    _check_space(folder.parent, math.prod(shape))
    tmp = tmp_dir(folder)
    try:
        if len(split):
            mapped = np.memmap(tmp / PIXELS, dtype=np.uint8, mode="w+", shape=shape)
            fill(torch.from_numpy(mapped), framer, f"caching {split.name}", show, workers)
            mapped.flush()  # msync: the pixels are on disk before COMPLETE is
            del mapped
        else:
            (tmp / PIXELS).touch()
        np.save(tmp / LABELS, framer.labels().numpy())
        manifest = {"format": FORMAT_VERSION, "key": folder.name, "split": split.name, "shape": list(shape),
                    "dtype": "uint8", "pixels": PIXELS, "labels": LABELS, "inputs": inputs,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _write_synced(tmp / COMPLETE, b"")
        _sync_dir(tmp)
        os.rename(tmp, folder)
        _sync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _not_ours(folder: Path) -> str:
    """Why a store's files are not this user's own regular files ("" when they are)."""
    for name in (PIXELS, LABELS, MANIFEST, COMPLETE):
        st = os.lstat(folder / name)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return f"{name} is not a regular file of this user"
    return ""


def _open_complete(folder: Path, repair: bool) -> ImageStore | None:
    """The store in `folder` if it is complete and sound; else None (with `repair`: removed, and said so).
    DataError for a folder that is not this user's: it is neither used nor removed."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None
    if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
        raise DataError(f"image cache {folder}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); a "
                        f"cache is used only when it is the user's own. Remove it, or set data.cache_dir to a "
                        f"folder of your own")
    problem = "" if (folder / COMPLETE).exists() else "no COMPLETE marker: its fill was stopped"
    if not problem:
        try:
            problem = _not_ours(folder)
            if not problem:
                return ImageStore.open(folder)
        except (DataError, OSError, ValueError, KeyError) as e:
            problem = str(e)
    if repair:
        log.warning("image cache %s is unusable (%s); removing it and filling it again", folder, problem)
        shutil.rmtree(folder)
    return None


def _remove_stopped_fills(folder: Path) -> None:
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        log.warning("removing %s: the fill that wrote it was stopped", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def open_disk(split: Split, pre: Preprocess, frame: str, size: tuple[int, int] | None = None,
              cache_dir: str = "", local_rank: int | None = None, workers: int | None = None,
              start_wait_s: float = START_WAIT_S) -> ImageStore:
    """The disk store of `split` in `frame`: mapped if complete, else filled first (by local rank 0; the
    other local ranks wait for it, see `storelock.wait_for_filler`)."""
    framer = Framer(split, pre, frame, size)
    inputs = {"source": source_fingerprint(split),
              "frame": frame_inputs(frame, framer.shape[1:], pre.channels, pre.interpolation, pre.crop_pct)}
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / store_key(inputs["source"], inputs["frame"])
    rank = _local_rank() if local_rank is None else local_rank
    if rank != 0:
        return wait_for_filler(folder, lambda: _open_complete(folder, repair=False), rank, start_wait_s)
    with fill_lock(folder):
        store = _open_complete(folder, repair=True)
        if store is None:
            _remove_stopped_fills(folder)
            log.info("image cache: filling %s with %d %s images (%s frame, %dx%d)", folder, len(split),
                     split.name, frame, *framer.shape[1:])
            _fill_disk(framer, split, folder, inputs, show=True, workers=workers)
            store = ImageStore.open(folder)
        else:
            log.info("image cache: %d %s images mapped from %s", len(store), split.name, folder)
    return store


def _local_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(os.environ.get("LOCAL_RANK", "0"))
    return 0


def open_store(split: Split, pre: Preprocess, cache: str, frame: str, size: tuple[int, int] | None = None,
               cache_dir: str = "", local_rank: int | None = None) -> ImageStore | DecodingImages:
    """The images of `split` for `data.cache`: "none" decodes on each read, "memory" fills a shared-memory
    store now (every process its own), "disk" maps the store under `cache_dir`, filling it first if needed."""
    if cache not in CACHES:
        raise ValueError(f"data.cache must be one of {CACHES}; got {cache!r}")
    if cache == "none":
        return DecodingImages(split, pre, frame, size)
    if cache == "memory":
        show = (_local_rank() if local_rank is None else local_rank) == 0
        return fill_memory(split, pre, frame, size, show=show)
    return open_disk(split, pre, frame, size, cache_dir, local_rank)
