"""The disk cache's lock and folders against leftovers and plants (#20 item 6, #19 items 1 and 9): a lock path
that is a symlink, a store folder that is not this user's, a filler killed with its decode workers running, and
pools and shared memory sized for every process of a node.

    .venv/bin/python -m pytest -q tests/test_cache_lock.py
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import subprocess_env
from imgcls.data import pool, store as store_mod
from imgcls.data.fingerprint import frame_inputs, source_fingerprint, store_key
from imgcls.data.sources import FileImages
from imgcls.data.split import Split
from imgcls.data.store import fill_memory
from imgcls.data.store_disk import open_disk
from imgcls.data.storelock import fill_lock, is_held
from imgcls.data.transforms import Preprocess
from imgcls.errors import DataError

PRE = Preprocess((16, 16), 3, (0.5,) * 3, (0.25,) * 3, "bilinear")


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    return [str(folder / f"{k:03d}.png") for k in range(n)]


def _key_folder(split: Split, cache: Path) -> Path:
    return cache / store_key(source_fingerprint(split), frame_inputs("eval", (16, 16), 3, "bilinear", 1.0))


# ---------------------------------------------------------------- #20.6
def test_a_lock_path_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "cache" / "abc"
    folder.parent.mkdir()
    os.symlink(victim, folder.with_name("abc.lock"))
    with pytest.raises(DataError) as e:
        with fill_lock(folder):
            pass
    assert victim.read_text() == "precious"
    assert str(e.value).startswith(f"{folder.with_name('abc.lock')}: cannot use this lock file (")
    assert str(e.value).endswith("); remove it, or set data.cache_dir to a folder of your own")


def test_a_store_folder_of_another_user_is_not_trusted(tmp_path, monkeypatch):
    """A COMPLETE store planted by someone else in a shared cache folder is refused, not mapped."""
    split = Split("train", [0, 1, 2], FileImages(_images(tmp_path / "img", 3)))
    filled = open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    me, lstat = os.geteuid(), os.lstat

    def planted(path, *args, **kwargs):  # the store folder as another user (uid + 1) would have made it
        st = lstat(path, *args, **kwargs)
        if Path(path) == filled.path:
            fields = list(st)
            fields[4] = me + 1  # st_uid
            return os.stat_result(fields)
        return st
    monkeypatch.setattr(os, "lstat", planted)
    with pytest.raises(DataError) as e:
        open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    assert str(e.value) == (f"image cache {filled.path}: owned by uid {me + 1}, not by this user (uid {me}); a "
                            f"cache is used only when it is the user's own. Remove it, or set data.cache_dir to a "
                            f"folder of your own")
    assert (filled.path / "COMPLETE").exists()  # neither used nor removed


def test_a_store_file_that_is_a_symlink_is_refilled(tmp_path):
    split = Split("train", [0, 1, 2], FileImages(_images(tmp_path / "img", 3)))
    filled = open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    pixels = filled.path / "pixels.u8"
    elsewhere = tmp_path / "planted.u8"
    elsewhere.write_bytes(b"\0" * pixels.stat().st_size)
    pixels.unlink()
    os.symlink(elsewhere, pixels)
    again = open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    assert not (again.path / "pixels.u8").is_symlink()
    assert torch.equal(again.pixels, fill_memory(split, PRE, "eval").pixels)


# ---------------------------------------------------------------- #19.1
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_filler_leaves_no_decode_worker_holding_the_lock(tmp_path):
    """SIGKILL to a filler whose pool of 2 forked decoders is running: the decoders must die with it, so the
    lock is free and the next run fills the store (before, they held the flock and the next run waited forever)."""
    paths = _images(tmp_path / "img", 40)
    cache, pids = tmp_path / "cache", tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "filler.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        from imgcls.data import store
        from imgcls.data.store_disk import open_disk
        from imgcls.data.sources import FileImages
        from imgcls.data.split import Split
        from imgcls.data.transforms import Preprocess
        store.CHUNK = 1
        frame = store.Framer.__call__
        def slow(self, k):
            open({str(pids)!r} + f"/{{os.getpid()}}", "w").close()
            time.sleep(0.5)
            return frame(self, k)
        store.Framer.__call__ = slow
        split = Split("train", [0] * 40, FileImages({paths!r}))
        open_disk(split, Preprocess((16, 16), 3, (0.5,) * 3, (0.25,) * 3, "bilinear"), "eval",
                  cache_dir={str(cache)!r}, workers=2)
    """))
    filler = subprocess.Popen([sys.executable, str(script)], env=subprocess_env())
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and filler.pid not in workers
        filler.send_signal(signal.SIGKILL)
        filler.wait(10)
    finally:
        filler.kill()
    split = Split("train", [0] * 40, FileImages(paths))
    folder = _key_folder(split, cache)
    deadline = time.monotonic() + 10
    while (any(_alive(p) for p in workers) or is_held(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in workers if _alive(p)]
    for p in workers:  # leave no stray process behind, whatever the outcome
        if _alive(p):
            os.kill(p, signal.SIGKILL)
    assert not survivors, "decode workers outlived their killed parent"
    assert not is_held(folder)
    got = {}
    thread = threading.Thread(target=lambda: got.update(store=open_disk(split, PRE, "eval", cache_dir=str(cache))),
                              daemon=True)
    thread.start()
    thread.join(60)
    assert "store" in got, "the next fill waited on the killed filler's lock"
    assert torch.equal(got["store"].pixels, fill_memory(split, PRE, "eval").pixels)


# ---------------------------------------------------------------- #19.9
def test_the_decode_pool_is_shared_among_the_processes_of_a_node(monkeypatch):
    monkeypatch.setattr(pool, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert pool.pool_size() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert pool.pool_size() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert pool.pool_size() == 1


def test_shared_memory_must_hold_one_copy_per_process_of_the_node(tmp_path, monkeypatch):
    split = Split("train", [0, 1, 2], FileImages(_images(tmp_path / "img", 3)))
    nbytes = 3 * 3 * 16 * 16

    class Free:
        f_frsize, f_bavail = 1, 3 * nbytes  # room for three copies

    monkeypatch.setattr(store_mod.os, "statvfs", lambda path: Free)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert fill_memory(split, PRE, "eval").pixels.shape == (3, 3, 16, 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(DataError) as e:
        fill_memory(split, PRE, "eval")
    assert str(e.value) == ('data.cache = "memory": the train images need 0 MiB of shared memory in each of the 4 '
                            'processes on this node (0 MiB in all), /dev/shm has 0 MiB free; use data.cache = "disk", '
                            'or give the container more (docker run --shm-size=...)')


def test_a_lock_held_only_by_the_leftovers_of_a_dead_filler_is_named_not_waited_on(tmp_path, monkeypatch):
    """Where no parent-death signal exists (macOS), decoders may outlive a killed filler and keep its flock: the
    waiters see it free and the next filler stops with the way out, instead of waiting forever."""
    import fcntl
    import socket

    from imgcls.data import storelock

    folder = tmp_path / "abc"
    lock = folder.with_name("abc.lock")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f"{dead.pid} {socket.gethostname()}\n")
    leftover = open(lock)  # another open file description: conflicts as a forked child's would
    fcntl.flock(leftover, fcntl.LOCK_EX)
    monkeypatch.setattr(storelock, "STALE_S", 0.3)
    try:
        assert not is_held(folder)
        with pytest.raises(DataError) as e:
            with fill_lock(folder):
                pass
        assert str(e.value) == (f"{lock}: held by processes that the filler (pid {dead.pid} on "
                                f"{socket.gethostname()}) left behind when it was killed, though it is gone; stop "
                                f"them (`fuser -k {lock}`) and start again")
        lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live holder: held
        assert is_held(folder)
    finally:
        leftover.close()
