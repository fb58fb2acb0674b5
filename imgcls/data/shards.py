"""The shards source: splits written by `imgcls-data shard` as Parquet files, read from a folder or a URL.

    data.source = "shards"
    data.root = "/data/cifar10-shards"          # or "https://host/cifar10-shards", "hf://datasets/me/cifar10/shards"

A shard folder holds, per split, `<split>-<k:05d>.parquet` (columns `image`: the source's encoded bytes as they
were, `label`: int32 class index, `key`: where the image came from) and `<split>.labels.npy` (the split's
labels in order), plus `manifest.json`:

    {"format": "imgcls-shards", "version": 1, "class_names": [...],
     "splits": {"train": {"count": N, "shards": [{"file": "train-00000.parquet", "count": n, "bytes": b,
                                                 "sha256": "..."}, ...]}, ...}}

Indexing reads the manifest and the label files only (through fsspec, for all three kinds of root). Item i of a
split is row i - start[k] of shard k, start being the cumulative counts. `ShardImages` keeps the `image` column
of at most KEEP_SHARDS shards in memory per process (each DataLoader worker has its own), a whole shard read at
once. Local shards are read in place; remote ones through `shard_cache.ShardCache` (`data.shard_cache_dir`,
"" -> <cache root>/shards/<hash of data.root>, at most `data.shard_cache_gb`). A shard that cannot be
fetched or read raises `ShardError`, which the image check does not take for a broken image.

`shard_counts(split)` gives the per-shard item counts of a split's positions, for `shard_order.ShardOrderSampler`.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from imgcls.data.fingerprint import cache_root
from imgcls.data.images import check_image, open_image
from imgcls.recipe import DataConfig
from imgcls.data.shard_cache import ShardCache, transfer_errors
from imgcls.errors import ShardError
from imgcls.data.split import Split
from imgcls.errors import DataError

__all__ = ["FORMAT", "VERSION", "MANIFEST", "ShardError", "ShardImages", "load_shards", "shard_counts",
           "is_remote", "labels_file", "shard_file"]

FORMAT, VERSION, MANIFEST = "imgcls-shards", 1, "manifest.json"
KEEP_SHARDS = 2
REMOTE_PREFIXES = ("http://", "https://", "hf://")


def shard_file(split: str, k: int) -> str:
    return f"{split}-{k:05d}.parquet"


def labels_file(split: str) -> str:
    return f"{split}.labels.npy"


def is_remote(root: str) -> bool:
    return root.startswith(REMOTE_PREFIXES)


class ShardImages:
    """Items of one split of a shard folder. Plain data (the root, the manifest's shard entries, the cache
    settings): pickles to DataLoader workers, which load the shards they need themselves."""

    def __init__(self, root: str, split: str, shards: list[dict], manifest_sha256: str, cache: ShardCache | None):
        self.root, self.split, self.shards, self.cache = root, split, shards, cache
        self.manifest_sha256 = manifest_sha256  # what `fingerprint.source_fingerprint` keys the disk cache by
        self.starts = list(itertools.accumulate((s["count"] for s in shards), initial=0))
        self._columns: OrderedDict[int, object] = OrderedDict()  # shard -> its `image` column (pyarrow)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_columns": OrderedDict()}

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row) of item i."""
        if not 0 <= i < self.starts[-1]:
            raise IndexError(f"item {i} of split {self.split!r}: it has {self.starts[-1]} items")
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k]

    def url(self, k: int) -> str:
        return f"{self.root}/{self.shards[k]['file']}"

    def raw(self, i: int) -> bytes:
        """The encoded bytes of item i, as the source held them."""
        k, row = self.locate(i)
        column = self._columns.get(k)
        if column is None:
            column = self._read(k, "image")
            self._columns[k] = column
            while len(self._columns) > KEEP_SHARDS:
                self._columns.popitem(last=False)
        else:
            self._columns.move_to_end(k)
        return column[row].as_py()

    def open(self, i: int, draft: tuple[int, int] | None = None):
        return open_image(self.raw(i), draft)

    def check(self, i: int) -> None:
        check_image(self.raw(i))

    def describe(self, i: int) -> str:
        k, row = self.locate(i)
        try:
            key = f" ({self._read(k, 'key')[row].as_py()})"
        except ShardError:
            key = ""
        return f"{self.url(k)} row {row}{key}"

    def _read(self, k: int, column: str):
        """One column of shard k, read whole (a remote shard is fetched first)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        for attempt in range(2):
            path = self._local_path(k)
            try:
                return pq.read_table(path, columns=[column]).column(column)
            except FileNotFoundError:
                if self.cache is None or attempt:
                    raise ShardError(f"{path}: shard not found (manifest.json lists it); copy the whole shard "
                                     f"folder again, or write it anew with `imgcls-data shard`") from None
                # evicted by another process between the fetch and the read: fetch again
            except (pa.ArrowException, OSError) as e:
                raise ShardError(f"{path}: cannot read this shard ({type(e).__name__}: {e}); write the shards "
                                 f"anew with `imgcls-data shard`") from None
        raise AssertionError("unreachable")

    def _local_path(self, k: int) -> Path:
        entry = self.shards[k]
        if self.cache is not None:
            return self.cache.fetch(self.url(k), entry["sha256"], entry["bytes"])
        path = Path(self.root) / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return path  # _read names it
        if size != entry["bytes"]:
            raise ShardError(f"{path}: {size} bytes, but manifest.json says {entry['bytes']}: the shard changed "
                             f"after it was written; write the shards anew with `imgcls-data shard`")
        return path


def shard_counts(split: Split) -> list[int]:
    """How many of the split's positions fall in each shard of its `ShardImages` reader, in position order: the
    `counts` of a `ShardOrderSampler` over a dataset of this split. Positions of one shard are contiguous as long
    as the split's indices ascend, as `data.build_splits` leaves them (also after a val carve or a skip)."""
    reader = split.reader
    if not isinstance(reader, ShardImages):
        raise TypeError(f"split {split.name!r} is read by a {type(reader).__qualname__}, not by ShardImages")
    indices = np.asarray(split.indices, dtype=np.int64)
    if np.any(np.diff(indices) <= 0):
        raise ValueError(f"split {split.name!r}: indices do not ascend, so its positions do not group by shard")
    shard_of = np.searchsorted(np.asarray(reader.starts), indices, side="right") - 1
    return np.bincount(shard_of, minlength=len(reader.shards)).tolist()


# ---------------------------------------------------------------- indexing
def _fetch_small(root: str, name: str) -> bytes:
    """manifest.json or a label file, through fsspec (a local folder, http(s)://, hf://)."""
    import fsspec

    url = f"{root}/{name}"
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path)
    except FileNotFoundError:
        hint = ("is data.root a folder written by `imgcls-data shard`?" if name == MANIFEST else
                "manifest.json lists this split, so the shard folder is incomplete: copy it again")
        raise DataError(f"{url} not found; {hint}") from None
    except transfer_errors() as e:
        raise DataError(f"cannot read {url} ({type(e).__name__}: {e}); check data.root and that this machine "
                        f"can reach it") from None
    except ImportError as e:  # fsspec's http(s) needs aiohttp; hf:// needs huggingface_hub
        raise DataError(f"cannot read {url}: {e}") from None


def _problem(manifest: dict) -> str:
    """What is wrong with a parsed manifest of the right format and version; '' when nothing is."""
    try:
        if not all(isinstance(c, str) for c in manifest["class_names"]):
            return "class_names must be a list of strings"
        for name, split in manifest["splits"].items():
            for s in split["shards"]:
                if not isinstance(s["file"], str) or "/" in s["file"] or s["file"].startswith("."):
                    return f"split {name!r}: shard file {s['file']!r} is not a plain file name"
                if not (isinstance(s["count"], int) and isinstance(s["bytes"], int) and isinstance(s["sha256"], str)):
                    return f"split {name!r}: shard {s['file']!r} needs an integer count and bytes and a sha256"
            total = sum(s["count"] for s in split["shards"])
            if total != split["count"]:
                return f"split {name!r} says {split['count']} items, its shards hold {total}"
    except (KeyError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def read_manifest(root: str) -> tuple[dict, str]:
    """The manifest of a shard folder and the sha256 of its bytes; DataError naming it when it is not one."""
    data = _fetch_small(root, MANIFEST)
    where = f"{root}/{MANIFEST}"
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: not a JSON object; write the shards anew with `imgcls-data shard`")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}; is data.root a folder "
                        f"written by `imgcls-data shard`?")
    if manifest.get("version") != VERSION:
        raise DataError(f"{where}: version {manifest.get('version')!r}; this imgcls reads version {VERSION}: use "
                        f"the imgcls that wrote it, or write the shards anew")
    problem = _problem(manifest)
    if problem:
        raise DataError(f"{where}: malformed ({problem}); write the shards anew with `imgcls-data shard`")
    return manifest, hashlib.sha256(data).hexdigest()


def _labels(root: str, split: str, count: int, classes: int) -> list[int]:
    name = labels_file(split)
    try:
        labels = np.load(io.BytesIO(_fetch_small(root, name)), allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{root}/{name}: not a numpy array file ({e}); write the shards anew") from None
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise DataError(f"{root}/{name}: {labels.dtype} {labels.shape}, manifest.json says {count} integer labels")
    if count and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{root}/{name}: labels outside 0..{classes - 1} (manifest.json names {classes} classes)")
    return labels.tolist()


def cache_for(cfg: DataConfig, root: str) -> ShardCache:
    default = cache_root(cfg.cache_dir) / "shards" / hashlib.sha256(root.encode()).hexdigest()[:16]
    folder = cfg.shard_cache_dir or default
    return ShardCache(str(Path(folder).expanduser()), int(cfg.shard_cache_gb * 1e9))


def load_shards(cfg: DataConfig) -> tuple[dict[str, Split], list[str]]:
    """The splits of a shard folder or URL (`data.root`), and the class names of its manifest."""
    root = cfg.root.rstrip("/")
    if not is_remote(root):
        if not Path(root).expanduser().is_dir():
            raise DataError(f"data.root = {cfg.root!r}: no such folder (data.source = \"shards\" reads a folder "
                            f"written by `imgcls-data shard`, or an http(s):// or hf:// URL of one)")
        root = str(Path(root).expanduser().resolve())
    manifest, manifest_sha = read_manifest(root)
    names = [str(c) for c in manifest["class_names"]]
    cache = cache_for(cfg, root) if is_remote(root) else None
    splits = {}
    for name, entry in manifest["splits"].items():
        labels = _labels(root, name, entry["count"], len(names))
        splits[name] = Split(name, labels, ShardImages(root, name, entry["shards"], manifest_sha, cache))
    return splits, names
