"""Filling a disk cache once: an exclusive file lock for the filler, polling for the processes that wait.

    with fill_lock(folder):                      # <folder>.lock; blocks while another process fills
        ...check for COMPLETE, else fill...
    store = wait_for_filler(folder, try_open, rank)   # local ranks > 0: poll until try_open() returns a store

The kernel drops a flock when its holder dies, so a held lock means a live filler: waiters wait as long as
one holds it, and give up START_WAIT_S after the last time they saw it held (a local rank 0 that failed, or
that reads other data and so fills another key). A flock is shared by forked children, so decoders that outlive
a killed filler would hold it forever; the pool's children die with their parent (pool.py), and a lock whose
recorded holder (pid and host, written by the filler) is gone from this host counts as free for waiters, while
a filler stops with an error naming the leftover instead of waiting forever. Locks are fcntl.flock: Linux and
macOS.

The lock file is opened with O_NOFOLLOW and used only when it is a regular file of this user with one link: a
planted symlink or hard link never gets its target truncated.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Callable, TypeVar

from imgcls.errors import DataError

log = logging.getLogger(__name__)

POLL_S = 0.2
START_WAIT_S = 600.0  # how long waiters give local rank 0 to start (it may index or check images first)
SAY_WAITING_S = 2.0
STALE_S = 5.0  # a lock held this long after its recorded holder died is held by that holder's leftovers

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


def _open_lock(path: Path, flags: int) -> int:
    """A descriptor of the lock file, if it is a regular file of this user with one link; else DataError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise DataError(f"{path}: cannot use this lock file (it is a symbolic link); remove it, or set "
                        f"data.cache_dir to a folder of your own") from None
    st = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
               f"owned by uid {st.st_uid}, not by this user" if st.st_uid != os.geteuid() else
               f"it has {st.st_nlink} hard links" if st.st_nlink != 1 else "")
    if problem:
        os.close(fd)
        raise DataError(f"{path}: cannot use this lock file ({problem}); remove it, or set data.cache_dir to a "
                        f"folder of your own")
    return fd


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode("utf-8", "replace").strip()


def _holder_gone(record: str) -> bool:
    """True when the recorded holder ("pid host") ran on this host and is no longer running."""
    pid, _, host = record.partition(" ")
    if not pid.isdigit() or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def fill_lock(folder: Path):
    """Hold <folder>.lock exclusively (it names our pid and host while we hold it)."""
    fcntl = _fcntl()
    path = lock_path(folder)
    fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
    try:
        started, said, gone_since = time.monotonic(), False, None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # also when a waiter tests the lock for a moment: so poll, not block
                record = _holder(fd)
                if not _holder_gone(record):
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                elif time.monotonic() - gone_since > STALE_S:
                    pid, _, host = record.partition(" ")
                    raise DataError(f"{path}: held by processes that the filler (pid {pid} on {host}) left behind "
                                    f"when it was killed, though it is gone; stop them (`fuser -k {path}`) and "
                                    f"start again") from None
                if not said and time.monotonic() - started > SAY_WAITING_S:
                    log.info("waiting for the process that is filling %s (pid %s)", folder, record or "?")
                    said = True
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_held(folder: Path) -> bool:
    """True while a live process holds <folder>.lock exclusively (not the leftovers of a dead holder)."""
    fcntl = _fcntl()
    try:
        fd = _open_lock(lock_path(folder), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return not _holder_gone(_holder(fd))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


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
