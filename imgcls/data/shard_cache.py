"""Remote shards on local disk: fetched through fsspec, checked against their sha256, kept under a size limit.

    cache = ShardCache("/scratch/shards", limit_bytes=20 * 10**9)
    path = cache.fetch("https://host/shards/train-00003.parquet", sha256, nbytes)   # a verified local file

A shard is downloaded once, to a temporary name beside its final one (`os.replace` then makes it appear
whole), hashed while it streams in, and kept only if its sha256 is the manifest's. Files are named
`<stem>-<first 16 hex of the sha256>.parquet`, so two datasets may share a cache folder and a rewritten shard
is never mistaken for the old one. Before a download, the least recently used shards (by mtime, which
`fetch` refreshes on every hit) are removed until the new one fits under `limit_bytes`; the one being fetched is
never removed, and a shard another process has open survives its unlink (Linux keeps the inode). A shard
larger than the whole limit is still fetched: the folder then holds it alone.

Several processes (DataLoader workers, training processes on one node) may share a folder: each downloads to
its own temporary name, and the last `os.replace` wins with identical bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from imgcls.errors import ShardError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
STALE_TMP_S = 3600.0  # a download in progress rewrites its temporary file every few ms; older ones were stopped


def transfer_errors() -> tuple[type[BaseException], ...]:
    """What fsspec's file systems raise for an unreachable or refusing server: OSError (also 404 as
    FileNotFoundError), aiohttp's errors (http/https), huggingface_hub's (hf://)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    for module, name in (("aiohttp", "ClientError"), ("huggingface_hub.errors", "HfHubHTTPError")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


@dataclass
class ShardCache:
    """A folder of verified shard files, at most `limit_bytes` (plus the one being fetched). Plain data."""

    folder: str
    limit_bytes: int

    def path_for(self, url: str, sha256: str) -> Path:
        stem = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
        return Path(self.folder) / f"{stem}-{sha256[:16]}.parquet"

    def fetch(self, url: str, sha256: str, nbytes: int) -> Path:
        """The local copy of `url`, downloaded now unless a complete one is here."""
        path = self.path_for(url, sha256)
        with contextlib.suppress(FileNotFoundError):  # another process may evict it between the two calls
            if path.stat().st_size == nbytes:
                os.utime(path)  # most recently used
                return path
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        self._make_room(nbytes, keep=path)
        self._download(url, sha256, path)
        return path

    def _make_room(self, incoming: int, keep: Path) -> None:
        now, held = time.time(), []
        for entry in os.scandir(self.folder):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                if ".parquet.tmp-" in entry.name and now - st.st_mtime > STALE_TMP_S:
                    os.unlink(entry.path)
                elif entry.name.endswith(".parquet") and entry.path != str(keep):
                    held.append((st.st_mtime_ns, st.st_size, entry.path))
        total = sum(size for _, size, _ in held)
        for _, size, path in sorted(held):
            if total + incoming <= self.limit_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
            log.debug("shard cache %s: evicted %s (%d bytes)", self.folder, path, size)

    def _download(self, url: str, sha256: str, path: Path) -> None:
        import fsspec

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        digest = hashlib.sha256()
        try:
            fs, remote_path = fsspec.core.url_to_fs(url)
            with fs.open(remote_path, "rb", block_size=0) as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
        except transfer_errors() as e:
            tmp.unlink(missing_ok=True)
            raise ShardError(f"{url}: download failed ({type(e).__name__}: {e}); check that data.root is "
                             f"reachable from this machine, then run again") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != sha256:
            tmp.unlink()
            raise ShardError(f"{url}: sha256 {digest.hexdigest()}, but manifest.json says {sha256}: the shard "
                             f"is not the one the manifest was written with (changed on the server, or damaged in "
                             f"transit); upload the shards and their manifest.json again, written together by "
                             f"`imgcls-data shard`")
        os.replace(tmp, path)
