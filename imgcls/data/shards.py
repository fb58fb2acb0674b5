"""The shards source: splits written by `imgcls-data shard` as Parquet files, read from a folder or a URL.

    data.source = "shards"
    data.root = "/data/cifar10-shards"          # or "https://host/cifar10-shards", "hf://datasets/me/cifar10/shards"

A shard folder holds, per split, `<split>-<k:05d>.parquet` (columns `image`: the source's encoded bytes as they
were, `label`: int32 class index, `key`: where the image came from, relative to the source's folder) and
`<split>.labels.npy` (the split's labels in order), plus `manifest.json`:

    {"format": "imgcls-shards", "version": 2, "class_names": [...],
     "splits": {"train": {"count": N, "shards": [{"file": "train-00000.parquet", "count": n, "bytes": b,
                                                 "sha256": "..."}, ...],
                          "labels": {"file": "train.labels.npy", "bytes": b, "sha256": "..."}}, ...}}

Indexing reads the manifest and the label files only (through fsspec, for all three kinds of root; both are
checked in `shard_manifest.py`). Item i of a split is row i - start[k] of shard k, start being the cumulative
counts. `ShardImages` keeps the `image` and `key` columns of at most KEEP_SHARDS shards in memory per process
(each DataLoader worker has its own), a whole shard read at once. Local shards are read in place; remote ones
through `shard_cache.ShardCache` (`data.shard_cache_dir`, "" -> <cache root>/shards/<hash of data.root>, at most
`data.shard_cache_gb`). Every time a shard is read, the bytes parsed are the bytes hashed: their size and sha256
must be the manifest's (a cached copy that is not is evicted and fetched again), the columns exactly the
writer's (`image` binary: encoded bytes, never a path to open), the row count the manifest's, and the `label`
column the labels file's. A shard that cannot be fetched or read, or fails a check, raises `ShardError`, which
the image check does not take for a broken image; a row without an image (null) is a bad image (ValueError),
which `data.on_bad_image` handles.

`shard_counts(split)` gives the per-shard item counts of a split's positions, for `shard_order.ShardOrderSampler`.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import os
import stat
from collections import OrderedDict
from pathlib import Path

import numpy as np

from imgcls.data.fingerprint import cache_root
from imgcls.data.images import check_image, open_image
from imgcls.recipe import DataConfig
from imgcls.data.shard_cache import ShardCache
from imgcls.data.shard_manifest import (ANEW, FORMAT, MANIFEST, VERSION, labels_file, read_labels, read_manifest,
                                        shard_file)
from imgcls.data.split import Split
from imgcls.errors import DataError, ShardError

__all__ = ["FORMAT", "VERSION", "MANIFEST", "ShardError", "ShardImages", "load_shards", "shard_counts",
           "is_remote", "labels_file", "shard_file"]

KEEP_SHARDS = 2
REMOTE_PREFIXES = ("http://", "https://", "hf://")
COLUMNS = "image: binary, label: int32, key: string"
COLUMNS_SAID = COLUMNS.replace("binary", "binary (encoded bytes)")


def is_remote(root: str) -> bool:
    return root.startswith(REMOTE_PREFIXES)


class ShardImages:
    """Items of one split of a shard folder. Plain data (the root, the manifest's shard entries, the split's
    labels, the cache settings): pickles to DataLoader workers, which load the shards they need themselves."""

    def __init__(self, root: str, split: str, shards: list[dict], manifest_sha256: str, cache: ShardCache | None,
                 labels: np.ndarray):
        self.root, self.split, self.shards, self.cache = root, split, shards, cache
        self.manifest_sha256 = manifest_sha256  # what `fingerprint.source_fingerprint` keys the disk cache by
        self.labels = np.asarray(labels)  # what the `label` column of each shard must hold (uint8 for <= 256 classes)
        self.starts = list(itertools.accumulate((s["count"] for s in shards), initial=0))
        self._tables: OrderedDict[int, object] = OrderedDict()  # shard -> its `image` and `key` (pyarrow)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tables": OrderedDict()}

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row) of item i."""
        if not 0 <= i < self.starts[-1]:
            raise IndexError(f"item {i} of split {self.split!r}: it has {self.starts[-1]} items")
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k]

    def url(self, k: int) -> str:
        return f"{self.root}/{self.shards[k]['file']}"

    def raw(self, i: int) -> bytes:
        """The encoded bytes of item i, as the source held them; ValueError for a row without an image."""
        k, row = self.locate(i)
        data = self._table(k).column("image")[row].as_py()
        if data is None:
            raise ValueError(f"{self.url(k)} row {row}: no image (null)")
        return data

    def open(self, i: int, draft: tuple[int, int] | None = None):
        return open_image(self.raw(i), draft)

    def check(self, i: int) -> None:
        check_image(self.raw(i))

    def describe(self, i: int) -> str:
        k, row = self.locate(i)
        try:
            key = f" ({self._table(k).column('key')[row].as_py()})"
        except ShardError:
            key = ""
        return f"{self.url(k)} row {row}{key}"

    def _table(self, k: int):
        table = self._tables.get(k)
        if table is None:
            table = self._tables[k] = self._read(k)
            while len(self._tables) > KEEP_SHARDS:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(k)
        return table

    def _read(self, k: int):
        """Shard k's `image` and `key` columns, from bytes that are the manifest's (a remote shard is fetched
        first; a cached copy that is not what its name promises is evicted and fetched again, once)."""
        entry = self.shards[k]
        for attempt in range(2):
            path = self.cache.fetch(self.url(k), entry["sha256"], entry["bytes"]) if self.cache else \
                Path(self.root) / entry["file"]
            try:
                data = _read_bytes(path, entry["bytes"])
            except FileNotFoundError:
                if self.cache is None or attempt:
                    raise ShardError(f"{path}: shard not found (manifest.json lists it); copy the whole shard "
                                     f"folder again, or write it anew with `imgcls-data shard`") from None
                continue  # evicted by another process between the fetch and the read: fetch again
            except OSError as e:
                raise ShardError(f"{path}: cannot read this shard ({type(e).__name__}: {e}); {ANEW}") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest == entry["sha256"] and len(data) == entry["bytes"]:
                return self._checked(k, path, data)
            if self.cache is not None and not attempt:
                self.cache.evict(path)
                continue
            if len(data) != entry["bytes"]:
                raise ShardError(f"{path}: {_size(path)} bytes, but manifest.json says {entry['bytes']}: the shard "
                                 f"changed after it was written; {ANEW}")
            raise ShardError(f"{path}: sha256 {digest}, but manifest.json says {entry['sha256']}: the shard changed "
                             f"after it was written; {ANEW}")
        raise AssertionError("unreachable")

    def _checked(self, k: int, path: Path, data: bytes):
        """The parsed shard, if its columns, row count and labels are what the manifest and labels file say."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise ShardError(f"{path}: cannot read this shard ({type(e).__name__}: {e}); {ANEW}") from None
        where, count = self.url(k), self.shards[k]["count"]
        columns = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        if columns != COLUMNS:
            raise ShardError(f"{where}: columns {columns}; a shard holds {COLUMNS_SAID}; {ANEW}")
        if table.num_rows != count:
            raise ShardError(f"{where}: {table.num_rows} rows, but manifest.json says {count}; {ANEW}")
        got = table.column("label").to_numpy(zero_copy_only=False)
        want = self.labels[self.starts[k]:self.starts[k] + count]
        differ = np.flatnonzero(table.column("label").is_null().to_numpy(zero_copy_only=False) | (got != want))
        if differ.size:
            row = int(differ[0])
            raise ShardError(f"{where} row {row}: label {table.column('label')[row].as_py()} in the shard, "
                             f"{want[row]} in {labels_file(self.split)}; the shards and their labels were not "
                             f"written together: {ANEW}")
        return table.select(["image", "key"])


def _read_bytes(path: Path, nbytes: int) -> bytes:
    """At most nbytes + 1 bytes of a regular file (never waiting on a FIFO or reading a device without end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return f.read(nbytes + 1)


def _size(path: Path) -> int | str:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return "?"


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
        labels = read_labels(root, name, entry, len(names))
        reader = ShardImages(root, name, entry["shards"], manifest_sha, cache, labels)
        splits[name] = Split(name, labels.tolist(), reader)
    return splits, names
