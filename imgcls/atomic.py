"""Writing files and folders so that a reader never sees half of one, and a kill leaves the old one intact.

Every write of a result, cache entry, checkpoint or artifact goes through here (one temp-name scheme):
- a file is written to `.<name>.<random>.tmp` beside it (unpredictable, so a shared folder cannot pre-plant
  it; beside it, so `os.replace` is an atomic rename on the same filesystem), then renamed over `path`;
- a folder is filled under `.<name>.<random>.tmp/` and swapped in by `replace_dir`; `recover_dir` undoes a
  kill between the swap's two renames.
A failed write removes its temp and leaves `path` as it was. Imports nothing from imgcls (bottom of the graph).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside `path` for the caller to write (any writer that takes a path); on success it
    is renamed to `path`, on any exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, data, **dumps) -> None:
    write_text(path, json.dumps(data, **{"indent": 2, **dumps}))


def tmp_dir(dest: str | Path) -> Path:
    """A new empty folder beside `dest`, to fill and then `replace_dir` into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))


def recover_dir(dest: str | Path) -> None:
    """A kill between the two renames of `replace_dir` leaves `.<name>.old` and no `<name>`: put it back."""
    dest = Path(dest)
    if not dest.name:
        return
    old = dest.with_name(f".{dest.name}.old")
    if old.is_dir() and not dest.exists():
        os.replace(old, dest)
        log.warning("%s was missing after an interrupted replace; restored it from %s", dest, old.name)


def replace_dir(tmp: str | Path, dest: str | Path) -> None:
    """Move a fully written `tmp` to `dest`, replacing any previous `dest` by rename, never in place."""
    dest = Path(dest)
    recover_dir(dest)
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)


def remove_stale_tmp_dirs(dest: str | Path) -> None:
    """Folders a killed writer left beside `dest` (`.<name>.*.tmp`). Only for folders one writer owns (a run
    folder): in a shared cache another process may be filling one right now."""
    dest = Path(dest)
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
