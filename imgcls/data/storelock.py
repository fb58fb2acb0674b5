"""Filling a disk cache once: an exclusive file lock for the filler, polling for the processes that wait.

    with fill_lock(folder):                      # <folder>.lock; blocks while another process fills
        ...check for COMPLETE, else fill...
    store = wait_for_filler(folder, try_open, rank)   # local ranks > 0: poll until try_open() returns a store

The kernel drops a flock when its holder dies, so a held lock means a live filler: waiters wait as long as
one holds it, and give up START_WAIT_S after the last time they saw it held (a local rank 0 that failed, or
that reads other data and so fills another key). Locks are fcntl.flock: Linux and macOS.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

from imgcls.errors import DataError

log = logging.getLogger(__name__)

POLL_S = 0.2
START_WAIT_S = 600.0  # how long waiters give local rank 0 to start (it may index or check images first)
SAY_WAITING_S = 2.0

T = TypeVar("T")


def _fcntl():
    try:
        import fcntl
    except ImportError:
        raise DataError('data.cache = "disk" needs file locks (fcntl), which this platform lacks; '
                        'use data.cache = "memory"') from None
    return fcntl


def lock_path(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.lock")


@contextlib.contextmanager
def fill_lock(folder: Path):
    """Hold <folder>.lock exclusively (it names our pid while we hold it)."""
    fcntl = _fcntl()
    path = lock_path(folder)
    with open(path, "a+", encoding="utf-8") as f:
        started, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # also when a waiter tests the lock for a moment: so poll, not block
                if not said and time.monotonic() - started > SAY_WAITING_S:
                    f.seek(0)
                    log.info("waiting for the process that is filling %s (pid %s on its host)", folder,
                             f.read().strip() or "?")
                    said = True
                time.sleep(POLL_S)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_held(folder: Path) -> bool:
    """True while some process holds <folder>.lock exclusively."""
    fcntl = _fcntl()
    try:
        f = open(lock_path(folder), encoding="utf-8")
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def wait_for_filler(folder: Path, try_open: Callable[[], T | None], rank: int,
                    start_wait_s: float = START_WAIT_S) -> T:
    """try_open() once it returns a store; DataError when for start_wait_s nobody held the lock."""
    deadline = time.monotonic() + start_wait_s
    while True:
        found = try_open()
        if found is not None:
            return found
        if is_held(folder):
            deadline = time.monotonic() + start_wait_s
        elif time.monotonic() > deadline:
            raise DataError(f"local rank {rank}: waited {start_wait_s:g} s for local rank 0 to fill the image "
                            f"cache {folder}, but it is not complete and no process is filling it "
                            f"({lock_path(folder)} is free). See whether local rank 0 failed, or reads other "
                            f"data than this process (its cache has another key); or use data.cache = \"memory\".")
        time.sleep(POLL_S)
