"""`data.cache`'s choice of store (`open_store`), and the disk store: its fill, its lock and what makes a
folder trusted.

The disk store is kept under <cache_root>/<key>/ (see `fingerprint.py` for the key) as a file that every
process maps (the page cache holds one copy per node). It is written to .<key>.<random>.tmp/ (`atomic.tmp_dir`) with COMPLETE last, then renamed, under a file
lock (<key>.lock): a stopped fill is never used, and the next filler removes it. A store is mapped only when its
folder and files are this user's own regular files (not links) that match their manifest: a folder someone else
planted in a shared cache_dir is refused, a planted link refilled. With several processes on a node,
local rank 0 fills; the others wait for COMPLETE for as long as a filler holds the lock.
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

from imgcls.atomic import tmp_dir
from imgcls.data.fingerprint import FORMAT_VERSION, cache_root, frame_inputs, source_fingerprint, store_key
from imgcls.data.split import Split
from imgcls.data.store import (CACHES, COMPLETE, LABELS, MANIFEST, PIXELS, DecodingImages, Framer, ImageStore,
                               fill, fill_memory)
from imgcls.data.storelock import START_WAIT_S, fill_lock, wait_for_filler
from imgcls.data.transforms import Preprocess
from imgcls.errors import DataError

log = logging.getLogger("imgcls.data.store")  # one logger for the store, whichever module speaks


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
