"""Remote shards on local disk: fetched through fsspec, checked against their sha256, kept under a size limit.

    cache = ShardCache("/scratch/shards", limit_bytes=20 * 10**9)
    path = cache.fetch("https://host/shards/train-00003.parquet", sha256, nbytes)   # a verified local file
    cache.evict(path)                            # the reader found its bytes are not the manifest's: fetch again

A shard is downloaded once, to a temporary file of an unpredictable name beside its final one (`os.replace`
then makes it appear whole), hashed while it streams in, and kept only if it is exactly the manifest's bytes
and sha256: reading stops one byte past the manifest's count. A read that stalls for READ_TIMEOUT_S (not the
whole body: a large shard on a slow link is fine) is retried RETRIES times with a doubling backoff. Files are
named `<stem>-<first 16 hex of the sha256>.parquet`, so two datasets may share a cache folder and a rewritten
shard is never mistaken for the old one. A hit is found by name and size: the reader (`shards.ShardImages`)
hashes the bytes it parses on every use and evicts a file that does not match, so a file changed or planted in
the folder is fetched again, never used.

One download per shard: a process holds `.<name>.lock` (flock) while it downloads, and others that want the
same shard wait for it and then find the file. After a download, the least recently used shards (by mtime,
which `fetch` refreshes on every hit) are removed until the new one fits under `limit_bytes`, counting the
temporary files of downloads in progress; temporary files whose download lock nobody holds were left by a
killed download and are removed. The shard just fetched is never removed, and one another process has open
survives its unlink (Linux keeps the inode). A shard larger than the whole limit is still fetched: the folder
then holds it alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from imgcls.errors import ShardError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
READ_TIMEOUT_S = 60.0  # no byte for this long: the connection is given up and the download tried again
CONNECT_TIMEOUT_S = 30.0
RETRIES = 4
BACKOFF_S = 2.0  # before try n + 1: BACKOFF_S * 2**(n - 1)
TMP = ".tmp-"


def transfer_errors() -> tuple[type[BaseException], ...]:
    """What fsspec's file systems raise for an unreachable or refusing server: OSError (also 404 as
    FileNotFoundError), aiohttp's errors (http/https), huggingface_hub's (hf://)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    for module, name in (("aiohttp", "ClientError"), ("huggingface_hub.errors", "HfHubHTTPError")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _flock(fd: int, blocking: bool) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def download_lock(path: Path):
    """Hold the download lock of the cached file `path`, waiting while another process holds it. The lock file is
    opened without following a symlink and never written; the kernel drops the lock when its holder dies."""
    fd = os.open(lock_path(path), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _flock(fd, blocking=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _downloading(final: Path) -> bool:
    """Whether some process holds the download lock of `final` now."""
    try:
        fd = os.open(lock_path(final), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return not _flock(fd, blocking=False)
    finally:
        os.close(fd)


def _storage_options(url: str) -> dict:
    """A per-read timeout for http(s) (aiohttp's default is 300 s for the whole body)."""
    if not url.startswith(("http://", "https://")):
        return {}
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout}}


@dataclass
class ShardCache:
    """A folder of verified shard files, at most `limit_bytes` (plus the one being fetched). Plain data."""

    folder: str
    limit_bytes: int

    def path_for(self, url: str, sha256: str) -> Path:
        stem = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
        return Path(self.folder) / f"{stem}-{sha256[:16]}.parquet"

    def fetch(self, url: str, sha256: str, nbytes: int) -> Path:
        """The local copy of `url`, downloaded now unless one of the right size is here."""
        path = self.path_for(url, sha256)
        if self._hit(path, nbytes):
            return path
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        with download_lock(path):
            if not self._hit(path, nbytes):  # another process may have fetched it while this one waited
                self._download(url, sha256, nbytes, path)
        return path

    def evict(self, path: Path) -> None:
        """Remove a cached file whose bytes are not what its name promises (changed, planted or damaged)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.warning("shard cache %s: removed %s, whose bytes do not match its sha256; fetching it again",
                    self.folder, path)

    @staticmethod
    def _hit(path: Path, nbytes: int) -> bool:
        with contextlib.suppress(FileNotFoundError):  # another process may evict it between the two calls
            if path.stat().st_size == nbytes:
                os.utime(path)  # most recently used
                return True
        return False

    def _make_room(self, incoming: int, keep: Path) -> None:
        held, busy = [], 0
        for entry in os.scandir(self.folder):
            with contextlib.suppress(FileNotFoundError):
                if TMP in entry.name and entry.name.startswith("."):
                    final = Path(self.folder) / entry.name[1:entry.name.index(TMP)]
                    if final == keep:
                        continue  # this download's own temporary file: `incoming`
                    if _downloading(final):
                        busy += entry.stat().st_size
                    else:  # its download was killed
                        os.unlink(entry.path)
                elif entry.name.endswith(".parquet") and not entry.name.startswith(".") and entry.path != str(keep):
                    st = entry.stat()
                    held.append((st.st_mtime_ns, st.st_size, entry.path))
        total = busy + sum(size for _, size, _ in held)
        for _, size, path in sorted(held):
            if total + incoming <= self.limit_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
            log.debug("shard cache %s: evicted %s (%d bytes)", self.folder, path, size)

    def _download(self, url: str, sha256: str, nbytes: int, path: Path) -> None:
        """Fetch `url` into `path`, trying again after a transfer error; the caller holds its download lock."""
        for attempt in range(1, RETRIES + 2):
            try:
                return self._download_once(url, sha256, nbytes, path)
            except FileNotFoundError:
                raise ShardError(f"{url}: not found on the server (manifest.json lists it); upload the whole shard "
                                 f"folder again") from None
            except transfer_errors() as e:
                if attempt > RETRIES:
                    raise ShardError(f"{url}: download failed {attempt} times, last with {type(e).__name__}: {e}; "
                                     f"check that data.root is reachable from this machine, then run again") from None
                wait = BACKOFF_S * 2 ** (attempt - 1)
                log.warning("%s: download failed (%s: %s); trying again in %g s", url, type(e).__name__, e, wait)
                time.sleep(wait)

    def _download_once(self, url: str, sha256: str, nbytes: int, path: Path) -> None:
        import fsspec

        tmp = path.with_name(f".{path.name}{TMP}{os.getpid()}-{secrets.token_hex(8)}")
        digest, left = hashlib.sha256(), nbytes
        try:
            fs, remote_path = fsspec.core.url_to_fs(url, **_storage_options(url))
            with fs.open(remote_path, "rb", block_size=0) as src, open(tmp, "xb") as dst:
                while chunk := src.read(min(CHUNK, left + 1)):
                    left -= len(chunk)
                    if left < 0:
                        raise ShardError(f"{url}: the server sent more than the {nbytes} bytes manifest.json says; "
                                         f"upload the shards and their manifest.json again, written together by "
                                         f"`imgcls-data shard`")
                    digest.update(chunk)
                    dst.write(chunk)
            if left:
                raise ShardError(f"{url}: the server sent {nbytes - left} bytes, but manifest.json says {nbytes}; "
                                 f"upload the shards and their manifest.json again, written together by "
                                 f"`imgcls-data shard`")
            if digest.hexdigest() != sha256:
                raise ShardError(f"{url}: sha256 {digest.hexdigest()}, but manifest.json says {sha256}: the shard "
                                 f"is not the one the manifest was written with (changed on the server, or damaged "
                                 f"in transit); upload the shards and their manifest.json again, written together "
                                 f"by `imgcls-data shard`")
            self._make_room(nbytes, keep=path)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
