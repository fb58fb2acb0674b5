"""What identifies cached data, and where caches live.

A disk cache is keyed by a sha256 of everything its content depends on, so a stale cache is never found:

    key = store_key(source_fingerprint(split), frame_inputs(pre, "eval", size))
    root = cache_root(cfg.cache_dir)             # "" -> $IMGCLS_CACHE, else ~/.cache/imgcls

`source_fingerprint(split)` reads the reader's plain attributes (readers are not edited for it):
- files (`reader.paths`, sources.FileImages): every image of the split with its path, size, mtime_ns, inode and
  ctime_ns (as git's index), in the split's order, plus the split's labels. An edited, added, removed or reordered
  file gives a new key, and so does one replaced with its old size and mtime (`cp -p`, `rsync -t`, `tar` and
  `touch -d` restore the mtime; the inode or the ctime, which no user call can set, still changes). A file that
  cannot be stat'ed (gone, a dangling symlink, a symlink loop) is keyed by its error: the image check names it.
- a `datasets.Dataset` (`reader.ds`, hub.HubRows): its `_fingerprint` (which `datasets` derives from the data
  files and every transform), the split name, the image column, the indices and the labels.
- shards (`reader.manifest_sha256`, shards.ShardImages): the sha256 of the shard folder's manifest.json (which
  holds every shard's sha256), the split name, the indices and the labels; not where the folder is.
Anything else is a TypeError naming the reader type: its images cannot be told apart from changed ones.

Like every mtime-keyed cache (git's index, make), a file rewritten in place with the same size within one tick of
the filesystem clock (a few ms on ext4) after its previous write, and after the key was taken, is not seen.

The code that makes the cached bytes is part of the key too (`code_identity`: the sha256 of each module's source):
a store filled by other framing code is never reused. Every cache keys its code this way (the disk store, the
image check, the probe's feature cache).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import PIL
import torchvision

from imgcls.data.split import Split

# Part of every key: bump it whenever what a cache holds or how it is laid out changes.
FORMAT_VERSION = 3  # 2: frames keep the aspect ratio (framing.py); 3: files keyed with inode and ctime too
# The modules whose code decides the pixels of a stored frame: decoding and mode conversion, framing, filling.
PIXEL_MODULES = ("imgcls.data.images", "imgcls.data.framing", "imgcls.data.transforms", "imgcls.data.store",
                 "imgcls.data.fingerprint")


def cache_root(cache_dir: str = "") -> Path:
    """`data.cache_dir`, or $IMGCLS_CACHE, or ~/.cache/imgcls."""
    chosen = cache_dir or os.environ.get("IMGCLS_CACHE", "") or "~/.cache/imgcls"
    return Path(chosen).expanduser()


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _labels_sha(split: Split) -> str:
    return _sha([np.asarray([split.labels[i] for i in split.indices], dtype="<i8").tobytes()])


def file_stamp(path: str) -> str:
    """What identifies the content of `path` without reading it: size, mtime, inode and ctime (git's choice);
    for a file that cannot be stat'ed, its error (the image check then names the file)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"error {e.errno}"
    return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"


def _file_lines(split: Split, paths: list[str]):
    for i in split.indices:
        yield f"{paths[i]}\0{file_stamp(paths[i])}\n".encode("utf-8", "surrogateescape")


def code_identity(modules: list[ModuleType]) -> dict:
    """{module name: sha256 of its source file}: an edit of any of them gives a new key."""
    return {m.__name__: _sha([Path(m.__file__).read_bytes()]) for m in sorted(modules, key=lambda m: m.__name__)}


def pixel_code() -> dict:
    """`code_identity` of PIXEL_MODULES."""
    return code_identity([importlib.import_module(name) for name in PIXEL_MODULES])


def source_fingerprint(split: Split) -> dict:
    """A small JSON-able description of the split's images that changes whenever they may have changed."""
    reader = split.reader
    paths = getattr(reader, "paths", None)
    if isinstance(paths, list):
        return {"kind": "files", "items": len(split), "files_sha256": _sha(_file_lines(split, paths)),
                "labels_sha256": _labels_sha(split)}
    ds_fingerprint = getattr(getattr(reader, "ds", None), "_fingerprint", None)
    if isinstance(ds_fingerprint, str):
        return {"kind": "datasets", "dataset": str(getattr(reader, "dataset", "")),
                "split": str(getattr(reader, "name", split.name)),
                "image_column": str(getattr(reader, "image_col", "")), "datasets_fingerprint": ds_fingerprint,
                "items": len(split), "indices_sha256": _sha([np.asarray(split.indices, dtype="<i8").tobytes()]),
                "labels_sha256": _labels_sha(split)}
    manifest_sha = getattr(reader, "manifest_sha256", None)
    if isinstance(manifest_sha, str):
        return {"kind": "shards", "manifest_sha256": manifest_sha, "split": str(getattr(reader, "split", split.name)),
                "items": len(split), "indices_sha256": _sha([np.asarray(split.indices, dtype="<i8").tobytes()]),
                "labels_sha256": _labels_sha(split)}
    raise TypeError(f"split {split.name!r}: cannot fingerprint the images of a {type(reader).__qualname__} "
                    f"reader for the disk cache: it has neither `paths` (a list of image files) nor `ds` "
                    f"(a datasets.Dataset with a _fingerprint); teach imgcls.data.fingerprint.source_fingerprint "
                    f"about it, or use data.cache = \"memory\"")


def frame_inputs(frame: str, size: tuple[int, int], channels: int, interpolation: str, crop_pct: float) -> dict:
    """What the stored pixels of one image depend on besides the image: the framing and the libraries that
    resize (Pillow does the resampling; torchvision chooses the calls)."""
    inputs = {"frame": frame, "size": [int(size[0]), int(size[1])], "channels": int(channels),
              "interpolation": interpolation, "pillow": PIL.__version__, "torchvision": torchvision.__version__,
              "code": pixel_code()}
    if frame == "eval":  # the train frame is a plain resize to `size`: crop_pct does not reach its pixels
        inputs["crop_pct"] = float(crop_pct)
    return inputs


def store_key(source: dict, frame: dict) -> str:
    """sha256 hex of the format version, the source fingerprint and the frame inputs (which hold the code's
    identity)."""
    text = json.dumps({"format": FORMAT_VERSION, "source": source, "frame": frame}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
