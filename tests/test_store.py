"""The uint8 image store (imgcls.data.store), its cache keys (imgcls.data.fingerprint), the fill lock
(imgcls.data.storelock) and the folder index cache (imgcls.data.index_cache).

    .venv/bin/python -m pytest -q tests/test_store.py
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from imgcls.data import store as store_mod
from imgcls.data.augment import BatchAugment, normalize
from imgcls.data.fingerprint import frame_inputs, source_fingerprint, store_key
from imgcls.data.framing import cover_size
from imgcls.data.images import open_image
from imgcls.data.index_cache import cached_scan
from imgcls.recipe import AugmentConfig
from imgcls.data.sources import FileImages, _scan_classes, image_extensions
from imgcls.data.split import Split
from imgcls.errors import DataError
from imgcls.data.storelock import fill_lock
from imgcls.data.store import COMPLETE, DecodingImages, ImageStore, fill_memory, keep_batch, working_size
from imgcls.data.store_disk import open_disk, open_store
from imgcls.data.transforms import Preprocess
from imgcls.inference.preprocess import PIL_FILTERS

OLD_NS = 1_600_000_000 * 10**9  # a fixed past mtime: files that have not changed lately, as real data


class Counting:
    """A FileImages that counts decodes (and exposes `paths`, as the fingerprint needs)."""

    def __init__(self, paths: list[str], fail_at: int | None = None):
        self.files, self.opened, self.fail_at = FileImages(paths), 0, fail_at

    @property
    def paths(self) -> list[str]:
        return self.files.paths

    def open(self, i: int, draft=None) -> Image.Image:
        self.opened += 1
        if i == self.fail_at:
            raise KeyboardInterrupt  # a fill stopped half way (Ctrl-C, or a kill)
        return self.files.open(i, draft)

    def describe(self, i: int) -> str:
        return self.files.describe(i)

    def check(self, i: int) -> None:
        self.files.check(i)


def noise_images(folder: Path, sizes: list[tuple[int, int]], modes: list[str], ext: str = ".png") -> list[str]:
    """Random images of the given (width, height) and PIL modes, with an old mtime."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ((w, h), mode) in enumerate(zip(sizes, modes)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
        path = folder / f"{n:03d}{ext}"
        image.save(path)
        os.utime(path, ns=(OLD_NS, OLD_NS))
        paths.append(str(path))
    return paths


def counting_split(paths: list[str], name: str = "train") -> Split:
    return Split(name, [n % 3 for n in range(len(paths))], Counting(paths))


def pre(size=(13, 17), channels=3, crop_pct=1.0, interpolation="bilinear") -> Preprocess:
    return Preprocess(size, channels, (0.5,) * channels, (0.25,) * channels, interpolation, crop_pct)


@pytest.fixture
def mixed(tmp_path) -> list[str]:
    """Gray, RGB, palette and RGBA images of odd sizes."""
    sizes = [(37, 23), (8, 50), (64, 64), (17, 13), (101, 7), (30, 31)]
    return noise_images(tmp_path / "img", sizes, ["L", "RGB", "P", "RGBA", "RGB", "L"])


# ---------------------------------------------------------------- pixels
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.5])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_eval_frame_holds_the_pixels_of_todays_eval_path(mixed, channels, crop_pct, interpolation):
    p = pre((13, 17), channels, crop_pct, interpolation)
    store = fill_memory(counting_split(mixed), p, "eval", workers=2)
    before_float = v2.Compose(p.eval_transform().transforms[:-2])  # resize (+ crop), ToImage
    for k, path in enumerate(mixed):
        expected = before_float(p.convert(open_image(path)))
        assert expected.dtype == torch.uint8 and store.pixels[k].shape == expected.shape == (channels, 13, 17)
        assert torch.equal(store.pixels[k], expected), path
    model_input = torch.stack([p.eval_transform()(p.convert(open_image(path))) for path in mixed])
    assert torch.equal(normalize(store.pixels, p.mean, p.std), model_input)


@pytest.mark.parametrize("crop_pct, size, expected", [(1.0, None, (13, 17)), (0.875, None, (14, 19)),
                                                      (1.0, (40, 24), (40, 24))])
def test_train_frame_covers_the_working_size_with_the_aspect_kept(mixed, crop_pct, size, expected):
    p = pre((13, 17), 3, crop_pct, "bicubic")
    assert working_size(p, "train", size) == expected
    store = fill_memory(counting_split(mixed), p, "train", size)
    for k, path in enumerate(mixed):
        image = p.convert(open_image(path))
        h, w = cover_size(image.height, image.width, *expected)
        framed = v2.CenterCrop(expected)(image.resize((w, h), PIL_FILTERS["bicubic"]))
        assert torch.equal(store.pixels[k], v2.ToImage()(framed)), path


def test_batch_augment_frames_the_train_frame_as_eval_does(mixed):
    """crop_pct < 1: the train frame is stored at floor(size / crop_pct), framed as eval frames (aspect ratio
    kept, centre cut), so that BatchAugment's centre crop gives, without augmentation, exactly the eval pixels."""
    p = pre((13, 17), 3, 0.875, "bilinear")
    paths = mixed
    train = fill_memory(counting_split(paths), p, "train")
    evaluation = fill_memory(counting_split(paths), p, "eval")
    index = torch.arange(len(paths))
    framed = BatchAugment.from_preprocess(AugmentConfig(hflip=0.0), p)(train.pixels, index, epoch=0, seed=0)
    assert train.size == (14, 19) and torch.equal(framed, normalize(evaluation.pixels, p.mean, p.std))


@pytest.mark.parametrize("width, height", [(40, 20), (20, 40), (30, 30)])
def test_eval_frame_keeps_the_aspect_ratio_and_cuts_the_centre(tmp_path, width, height):
    """A photo is resized to cover the frame with its aspect ratio kept, then the centre is cut (timm's and
    torchvision's eval transform): a 40 x 20 image at crop_pct 1.0 becomes 20 x 10 -> its middle 10 x 10, which
    loses the left band and keeps the top one. A squeeze (the old framing) would keep both bands in every case."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 4] = 255  # a white band on the left quarter: cut away when the width is cropped
    a[: height // 4] = 128  # a gray band on the top quarter: cut away when the height is cropped
    path = tmp_path / "band.png"
    Image.fromarray(a).save(path)
    p = pre((10, 10), 3, 1.0, "nearest")
    pixels = fill_memory(counting_split([str(path)]), p, "eval").pixels[0]
    expected = {(40, 20): (0, 128), (20, 40): (255, 0), (30, 30): (255, 128)}[(width, height)]
    assert (pixels[0, 5, 0].item(), pixels[0, 0, 5].item()) == expected


def test_memory_disk_and_decoding_give_the_same_batches(mixed, tmp_path):
    p = pre((9, 11), 3, 0.875)
    split = counting_split(mixed)
    memory = open_store(split, p, "memory", "eval")
    disk = open_store(split, p, "disk", "eval", cache_dir=str(tmp_path / "cache"))
    decoding = open_store(split, p, "none", "eval")
    assert isinstance(memory, ImageStore) and isinstance(disk, ImageStore) and isinstance(decoding, DecodingImages)
    assert memory.pixels.is_shared() and memory.path is None and disk.path.parent == tmp_path / "cache"
    assert torch.equal(memory.pixels, disk.pixels) and torch.equal(memory.labels, disk.labels)
    assert memory.labels.tolist() == [0, 1, 2, 0, 1, 2]
    positions = torch.tensor([5, 0, 5, 2])
    for got in (disk.batch(positions), decoding.batch(positions), memory.__getitems__([5, 0, 5, 2])[:2]):
        assert torch.equal(got[0], memory.pixels[positions]) and got[1].tolist() == [2, 0, 2, 2]


def test_a_subset_stores_its_own_items_in_order(mixed, tmp_path):
    split = counting_split(mixed).subset("val", [4, 1])
    store = open_store(split, pre(), "disk", "eval", cache_dir=str(tmp_path))
    full = fill_memory(counting_split(mixed), pre(), "eval")
    assert torch.equal(store.pixels, full.pixels[[4, 1]]) and store.labels.tolist() == [1, 1]


def test_an_unreadable_image_is_named_and_leaves_no_store(mixed, tmp_path):
    Path(mixed[3]).write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        open_store(counting_split(mixed), pre(), "disk", "eval", cache_dir=str(tmp_path / "cache"))
    assert str(e.value).startswith(f"cannot read image {mixed[3]}: UnidentifiedImageError: ")
    assert str(e.value).endswith('. Fix or remove the file, or set data.on_bad_image = "skip" to leave unreadable '
                                 'images out.')
    assert entries(tmp_path / "cache") == set()


# ---------------------------------------------------------------- the disk cache
def entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.endswith(".lock")}


def test_a_complete_disk_store_reopens_without_decoding(mixed, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = counting_split(mixed)
    filled = open_disk(first, pre(), "eval", cache_dir=str(cache))
    assert first.reader.opened == len(mixed)
    (key,) = entries(cache)
    assert sorted(p.name for p in (cache / key).iterdir()) == [COMPLETE, "labels.npy", "manifest.json", "pixels.u8"]
    second = counting_split(mixed)
    with caplog.at_level(logging.INFO, logger="imgcls.data.store"):
        again = open_disk(second, pre(), "eval", cache_dir=str(cache))
    assert second.reader.opened == 0 and torch.equal(again.pixels, filled.pixels)
    assert f"image cache: 6 train images mapped from {cache / key}" in caplog.messages


def test_cache_dir_defaults_to_imgcls_cache_env(mixed, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "env"))
    store = open_store(counting_split(mixed), pre(), "disk", "eval")
    assert store.path.parent == tmp_path / "env"


def _rewrite_same_size(paths: list[str]) -> None:
    path = Path(paths[2])
    old_size = path.stat().st_size
    array = np.array(open_image(path))
    array[0, 0] ^= 0xFF
    Image.fromarray(array).save(path)  # a .bmp: the same size whatever the pixels
    assert path.stat().st_size == old_size


STALE = {
    "touched": lambda paths: os.utime(paths[2], ns=(OLD_NS + 10**9, OLD_NS + 10**9)),
    "same size, new bytes": _rewrite_same_size,
    "file added": lambda paths: paths.append(noise_images(Path(paths[0]).parent / "new", [(9, 9)], ["RGB"],
                                                          ".bmp")[0]),
    "file removed": lambda paths: paths.pop(1),
}


@pytest.mark.parametrize("change", list(STALE))
def test_a_changed_source_gets_a_new_key_and_a_fresh_fill(tmp_path, change):
    paths = noise_images(tmp_path / "img", [(10, 12)] * 4, ["RGB"] * 4, ".bmp")
    cache = tmp_path / "cache"
    old = open_disk(counting_split(paths), pre(), "eval", cache_dir=str(cache))
    STALE[change](paths)
    split = counting_split(paths)
    new = open_disk(split, pre(), "eval", cache_dir=str(cache))
    assert split.reader.opened == len(paths)
    assert entries(cache) == {old.path.name, new.path.name} and old.path != new.path
    assert torch.equal(new.pixels, fill_memory(counting_split(paths), pre(), "eval").pixels)


@pytest.mark.parametrize("other", [dict(p=pre((13, 18))), dict(p=pre(interpolation="bicubic")),
                                   dict(p=pre(channels=1)), dict(p=pre(crop_pct=0.875)), dict(frame="train"),
                                   dict(frame="train", size=(20, 20))])
def test_other_preprocessing_gets_a_new_key(mixed, tmp_path, other):
    cache = tmp_path / "cache"
    old = open_disk(counting_split(mixed), pre(), "eval", cache_dir=str(cache))
    split = counting_split(mixed)
    new = open_disk(split, other.get("p", pre()), other.get("frame", "eval"), other.get("size"), str(cache))
    assert split.reader.opened == len(mixed) and old.path != new.path


def test_train_frame_ignores_crop_pct_when_the_size_is_given(mixed, tmp_path):
    a = open_disk(counting_split(mixed), pre(crop_pct=1.0), "train", (20, 20), str(tmp_path))
    split = counting_split(mixed)
    b = open_disk(split, pre(crop_pct=0.5), "train", (20, 20), str(tmp_path))
    assert a.path == b.path and split.reader.opened == 0


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_stopped_fill_is_never_used_and_is_cleaned(mixed, tmp_path, caplog):
    cache = tmp_path / "cache"
    stopped = Split("train", [0] * len(mixed), Counting(mixed, fail_at=3))
    with pytest.raises(KeyboardInterrupt):
        open_disk(stopped, pre(), "eval", cache_dir=str(cache), workers=1)
    assert entries(cache) == set()  # the temp folder went with the exception
    store = open_disk(counting_split(mixed), pre(), "eval", cache_dir=str(cache))
    key = store.path.name
    killed = cache / f".{key}.k1ll3d.tmp"  # what a SIGKILL leaves
    killed.mkdir()
    (killed / "pixels.u8").write_bytes(b"half")
    (store.path / COMPLETE).unlink()  # a final folder without its marker
    split = counting_split(mixed)
    with caplog.at_level(logging.WARNING, logger="imgcls.data.store"):
        again = open_disk(split, pre(), "eval", cache_dir=str(cache))
    assert split.reader.opened == len(mixed) and entries(cache) == {key} and (again.path / COMPLETE).exists()
    assert warnings(caplog) == [f"image cache {cache / key} is unusable (no COMPLETE marker: its fill was stopped); "
                               f"removing it and filling it again",
                               f"removing {killed}: the fill that wrote it was stopped"]
    assert torch.equal(again.pixels, fill_memory(counting_split(mixed), pre(), "eval").pixels)


def test_a_truncated_pixels_file_is_refilled(mixed, tmp_path, caplog):
    store = open_disk(counting_split(mixed), pre(), "eval", cache_dir=str(tmp_path))
    pixels = store.path / "pixels.u8"
    del store
    os.truncate(pixels, 100)
    split = counting_split(mixed)
    with caplog.at_level(logging.WARNING, logger="imgcls.data.store"):
        open_disk(split, pre(), "eval", cache_dir=str(tmp_path))
    assert split.reader.opened == len(mixed)
    assert warnings(caplog) == [f"image cache {pixels.parent} is unusable ({pixels}: 100 bytes, its manifest says "
                               f"(6, 3, 13, 17) = 3978); removing it and filling it again"]


def test_a_file_gone_since_indexing_is_named(mixed, tmp_path):
    split = counting_split(mixed)
    os.remove(mixed[4])
    with pytest.raises(DataError) as e:
        open_disk(split, pre(), "eval", cache_dir=str(tmp_path))
    assert str(e.value) == (f"cannot read image {mixed[4]}: FileNotFoundError: [Errno 2] No such file or directory: "
                            f"'{mixed[4]}'. Fix or remove the file, or set data.on_bad_image = \"skip\" to leave "
                            f"unreadable images out.")


def test_other_local_ranks_wait_for_local_rank_0(mixed, tmp_path):
    cache = str(tmp_path / "cache")
    waiter, got = counting_split(mixed), {}
    thread = threading.Thread(target=lambda: got.update(store=open_disk(waiter, pre(), "eval", cache_dir=cache,
                                                                        local_rank=1)))
    thread.start()
    filled = open_disk(counting_split(mixed), pre(), "eval", cache_dir=cache, local_rank=0)
    thread.join(30)
    assert waiter.reader.opened == 0 and torch.equal(got["store"].pixels, filled.pixels)


def _rank_main(rank: int, paths: list[str], cache: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        split = counting_split(paths)
        time.sleep(1.0 if rank == 0 else 0.0)  # local rank 1 comes first, and still does not fill
        store = open_disk(split, pre(), "eval", cache_dir=cache)
        torch.save({"opened": split.reader.opened, "pixels": store.pixels.clone()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_with_torch_distributed_only_local_rank_0_decodes(mixed, tmp_path):
    torch.multiprocessing.start_processes(_rank_main, (mixed, str(tmp_path / "cache"), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [g["opened"] for g in got] == [len(mixed), 0]
    assert torch.equal(got[0]["pixels"], got[1]["pixels"])
    assert torch.equal(got[0]["pixels"], fill_memory(counting_split(mixed), pre(), "eval").pixels)


def test_a_waiting_rank_waits_past_start_wait_s_while_a_filler_holds_the_lock(mixed, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    split, waiter, got = counting_split(mixed), counting_split(mixed), {}
    folder = cache / store_key(source_fingerprint(split), frame_inputs("eval", (13, 17), 3, "bilinear", 1.0))
    thread = threading.Thread(target=lambda: got.update(store=open_disk(
        waiter, pre(), "eval", cache_dir=str(cache), local_rank=1, start_wait_s=1.5)))
    with fill_lock(folder):  # a slow filler (another job, or local rank 0 of a large split)
        thread.start()
        time.sleep(3.0)
    time.sleep(0.6)  # free for a moment (between two holders): still waiting, 1.5 s from when it was last held
    filled = open_disk(split, pre(), "eval", cache_dir=str(cache), local_rank=0)
    thread.join(30)
    assert waiter.reader.opened == 0 and torch.equal(got["store"].pixels, filled.pixels)


def test_a_waiting_rank_gives_up_when_nobody_fills(mixed, tmp_path):
    split = counting_split(mixed)
    cache = tmp_path / "cache"
    folder = cache / store_key(source_fingerprint(split), frame_inputs("eval", (13, 17), 3, "bilinear", 1.0))
    with pytest.raises(DataError) as e:
        open_disk(split, pre(), "eval", cache_dir=str(cache), local_rank=2, start_wait_s=0.3)
    assert str(e.value) == (f"local rank 2: waited 0.3 s for local rank 0 to fill the image cache {folder}, but it "
                            f"is not complete and no process is filling it ({folder}.lock is free). See whether local "
                            f"rank 0 failed, or reads other data than this process (its cache has another key); or "
                            f"use data.cache = \"memory\".")
    assert split.reader.opened == 0 and list(cache.iterdir()) == []


def test_shared_memory_and_disk_space_are_checked_first(mixed, tmp_path, monkeypatch):
    class Tiny:
        f_bavail, f_frsize = 1, 1024

    monkeypatch.setattr(store_mod.os, "statvfs", lambda path: Tiny)
    with pytest.raises(DataError) as e:
        fill_memory(counting_split(mixed), pre((500, 500)), "eval")
    assert str(e.value) == ('data.cache = "memory": the train images need 4 MiB of shared memory, /dev/shm has 0 MiB '
                            'free; use data.cache = "disk", or give the container more (docker run --shm-size=...)')
    with pytest.raises(DataError) as e:
        open_disk(counting_split(mixed), pre((500, 500)), "eval", cache_dir=str(tmp_path))
    assert str(e.value) == (f'data.cache = "disk": the store needs 4 MiB, {tmp_path} has 0 MiB free; set '
                            f'data.cache_dir to a bigger disk (or $IMGCLS_CACHE), or use data.cache = "memory"')


def test_a_reader_without_an_identity_cannot_use_the_disk_cache(mixed):
    class Opaque:
        def open(self, i, draft=None):
            return open_image(mixed[i], draft)

    with pytest.raises(TypeError) as e:
        source_fingerprint(Split("val", [0] * len(mixed), Opaque()))
    assert str(e.value) == ("split 'val': cannot fingerprint the images of a "
                            "test_a_reader_without_an_identity_cannot_use_the_disk_cache.<locals>.Opaque reader for "
                            "the disk cache: it has neither `paths` (a list of image files) nor `ds` (a "
                            "datasets.Dataset with a _fingerprint); teach imgcls.data.fingerprint.source_fingerprint "
                            "about it, or use data.cache = \"memory\"")


def test_hub_rows_are_keyed_by_the_datasets_fingerprint(tmp_path):
    from conftest import write_hub_layout

    from imgcls.data.hub import load_hub
    from imgcls.recipe import DataConfig

    root = write_hub_layout(tmp_path / "hub", ["a", "b"], {"train": 12})
    cfg = DataConfig(source="hub", dataset=str(root))
    cache = str(tmp_path / "cache")
    first = load_hub(cfg)[0]["train"].subset("train", [3, 1, 7])
    filled = open_disk(first, pre(channels=1), "eval", cache_dir=cache)
    again = load_hub(cfg)[0]["train"].subset("train", [3, 1, 7])
    opened = []
    again.reader.open = lambda i: opened.append(i) or open_image(b"")
    assert torch.equal(open_disk(again, pre(channels=1), "eval", cache_dir=cache).pixels, filled.pixels)
    assert opened == []
    other_rows = load_hub(cfg)[0]["train"].subset("train", [3, 1, 8])
    assert open_disk(other_rows, pre(channels=1), "eval", cache_dir=cache).path != filled.path
    write_hub_layout(tmp_path / "hub", ["a", "b"], {"train": 12}, seed=5)  # new pixels, same layout
    changed = load_hub(cfg)[0]["train"].subset("train", [3, 1, 7])
    assert source_fingerprint(changed)["datasets_fingerprint"] != source_fingerprint(first)["datasets_fingerprint"]
    store = open_disk(changed, pre(channels=1), "eval", cache_dir=cache)
    assert store.path != filled.path and not torch.equal(store.pixels, filled.pixels)


# ---------------------------------------------------------------- DataLoader workers
class WhereIsIt(torch.utils.data.Dataset):
    """Batches of a store plus, from inside the worker, the file mapping its pixels live in."""

    def __init__(self, store: ImageStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitems__(self, positions):
        address, where = self.store.pixels.data_ptr(), None
        with open("/proc/self/maps") as f:
            for line in f:
                span, *rest = line.split(maxsplit=5)
                low, high = (int(a, 16) for a in span.split("-"))
                if low <= address < high:
                    where = rest[-1].strip() if len(rest) == 5 else "(anonymous)"
        worker = torch.utils.data.get_worker_info()
        return (*self.store.__getitems__(positions), where, worker.id if worker else None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("cache", ["memory", "disk"])
@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_workers_map_the_store_instead_of_copying_it(tmp_path, cache, context):
    paths = noise_images(tmp_path / "img", [(20, 20)] * 24, ["RGB"] * 24)
    store = open_store(counting_split(paths), pre(), cache, "eval", cache_dir=str(tmp_path / "cache"))

    ctx = multiprocessing.get_context(context)
    if context == "forkserver":  # the server imports torch once, not every worker (~10 s each on a busy box)
        ctx.set_forkserver_preload(["imgcls.data.store", WhereIsIt.__module__])

    def batches(workers: int) -> list:
        loader = DataLoader(WhereIsIt(store), batch_size=5, shuffle=True, collate_fn=keep_batch,
                            num_workers=workers, generator=torch.Generator().manual_seed(0),
                            multiprocessing_context=ctx if workers else None)
        return list(loader)

    in_main, in_workers = batches(0), batches(2)
    assert {b[4] for b in in_workers} == {0, 1}
    for (images, labels, index, where, _), (w_images, w_labels, w_index, w_where, _) in zip(in_main, in_workers):
        assert torch.equal(images, w_images) and torch.equal(labels, w_labels) and torch.equal(index, w_index)
        assert torch.equal(images, store.pixels[index])
        if cache == "disk":
            assert where == w_where == str(store.path / "pixels.u8")
        else:
            assert w_where.startswith("/dev/shm/torch_") and w_where.endswith(" (deleted)"), w_where
    assert len(in_main) == 5


# ---------------------------------------------------------------- folder index cache
def counting_scan(calls: list):
    def scan(folder, exts):
        calls.append(folder)
        return _scan_classes(folder, exts)
    return scan


def backdate(root: Path, ns: int = OLD_NS) -> None:
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(ns, ns))


@pytest.fixture
def class_tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    for c, n in (("cat", 3), ("dog", 2)):
        noise_images(root / c, [(4, 4)] * n, ["RGB"] * n)
    (root / "dog" / "more").mkdir()
    noise_images(root / "dog" / "more", [(4, 4)], ["RGB"])
    (root / "empty").mkdir()
    backdate(root)
    return root


def test_folder_index_cache_returns_the_scan_and_skips_it_next_time(class_tree, tmp_path):
    calls, exts = [], image_extensions()
    scan = counting_scan(calls)
    first = cached_scan(class_tree, exts, scan, str(tmp_path / "cache"))
    second = cached_scan(class_tree, exts, scan, str(tmp_path / "cache"))
    assert first == second == _scan_classes(class_tree, exts) and len(calls) == 1
    assert second[0]["dog"] == [str(class_tree / "dog" / "000.png"), str(class_tree / "dog" / "001.png"),
                                str(class_tree / "dog" / "more" / "000.png")]
    assert second[1] == [str(class_tree / "empty")]


CHANGES = {
    "file added": lambda root: noise_images(root / "cat", [(4, 4)] * 4, ["RGB"] * 4),
    "file removed": lambda root: (root / "cat" / "001.png").unlink(),
    "file renamed": lambda root: (root / "cat" / "001.png").rename(root / "cat" / "zz.png"),
    "file added in a subfolder": lambda root: noise_images(root / "dog" / "more", [(4, 4)] * 2, ["RGB"] * 2),
    "file added to an empty class": lambda root: noise_images(root / "empty", [(4, 4)], ["RGB"]),
    "class added": lambda root: noise_images(root / "eel", [(4, 4)], ["RGB"]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_folder_index_cache_scans_again_after_a_change(class_tree, tmp_path, change):
    calls, exts = [], image_extensions()
    scan = counting_scan(calls)
    before = cached_scan(class_tree, exts, scan, str(tmp_path / "cache"))
    CHANGES[change](class_tree)
    after = cached_scan(class_tree, exts, scan, str(tmp_path / "cache"))
    assert len(calls) == 2 and after == _scan_classes(class_tree, exts) != before
    backdate(class_tree, OLD_NS + 10**9)  # quiet again (an mtime it never had): cached
    cached_scan(class_tree, exts, scan, str(tmp_path / "cache"))
    assert cached_scan(class_tree, exts, scan, str(tmp_path / "cache")) == after and len(calls) == 3


def test_folder_index_of_a_folder_that_just_changed_is_not_cached(class_tree, tmp_path):
    """A second change within one tick of the filesystem clock would keep the mtime: racy, not cached."""
    calls, exts = [], image_extensions()
    os.utime(class_tree / "cat")  # now
    for _ in range(2):
        cached_scan(class_tree, exts, counting_scan(calls), str(tmp_path / "cache"))
    assert len(calls) == 2 and not (tmp_path / "cache" / "folder-index").exists()


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_without_augmentation_train_pixels_of_a_large_jpeg_are_its_eval_pixels(tmp_path, crop_pct):
    """#19.8: a JPEG at least twice the working size was decoded in draft mode for the train frame only, so train
    pixels differed from eval's (and predict's) with augmentation off. At the eval frame's size, no draft."""
    import numpy as np
    from imgcls.data.sources import FileImages

    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 200, 3), dtype=np.uint8)).save(path)
    p = Preprocess((32, 32), 3, (0.5,) * 3, (0.5,) * 3, "bilinear", crop_pct)
    split = Split("train", [0], FileImages([str(path)]))
    train = fill_memory(split, p, "train")
    evaluation = fill_memory(split, p, "eval")
    framed = BatchAugment.from_preprocess(AugmentConfig(hflip=0.0), p)(train.pixels, torch.arange(1), epoch=0, seed=0)
    assert torch.equal(framed, normalize(evaluation.pixels, p.mean, p.std))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_for_a_larger_working_size_only(tmp_path):
    """libjpeg's draft mode: a 256 px JPEG stored at a 48 px working size (a random-resized-crop recipe's, not the
    eval frame) decodes at 1/4 scale (16x fewer pixels to decode and resize); the eval frame, and a train frame of
    the eval frame's size, decode fully, as imgcls-predict does."""
    import numpy as np
    from imgcls.data.sources import FileImages

    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
    assert open_image(str(path), draft=(48, 48)).size == (64, 64)
    assert open_image(str(path)).size == (256, 256)
    split = Split("train", [0], FileImages([str(path)]))
    p = Preprocess((32, 32), 3, (0.5,) * 3, (0.5,) * 3, "bilinear")
    seen = []
    original = FileImages.open
    FileImages.open = lambda self, i, draft=None: seen.append(draft) or original(self, i, draft)
    try:
        large = fill_memory(split, p, "train", (48, 48)).pixels[0]
        fill_memory(split, p, "train")
        fill_memory(split, p, "eval")
    finally:
        FileImages.open = original
    assert seen == [(48, 48), None, None]
    expected = v2.functional.pil_to_tensor(open_image(str(path), draft=(48, 48)).resize((48, 48), Image.BILINEAR))
    assert torch.equal(large, expected)


# ---------------------------------------------------------------- fills across processes
@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_fill_split_across_processes_holds_the_pixels_of_a_fill_in_this_process(mixed, tmp_path, monkeypatch,
                                                                                    cache):
    here = fill_memory(file_split(mixed), pre(), "train", workers=1)
    monkeypatch.setattr(store_mod, "CHUNK", 2)  # 3 chunks, so the pool forks
    if cache == "memory":
        pooled = fill_memory(file_split(mixed), pre(), "train", workers=2)
    else:
        pooled = open_disk(file_split(mixed), pre(), "train", cache_dir=str(tmp_path), workers=2)
    assert torch.equal(pooled.pixels, here.pixels) and torch.equal(pooled.labels, here.labels)
    assert pooled.pixels.float().std() > 10  # noise, not an untouched (zero) tensor


def test_a_broken_image_in_a_child_process_is_named_in_the_parent(mixed, tmp_path, monkeypatch):
    Path(mixed[4]).write_bytes(b"not an image")
    monkeypatch.setattr(store_mod, "CHUNK", 2)
    with pytest.raises(DataError, match=f"^cannot read image {mixed[4]}: UnidentifiedImageError"):
        open_disk(file_split(mixed), pre(), "train", cache_dir=str(tmp_path / "cache"), workers=2)
    assert entries(tmp_path / "cache") == set()


def file_split(paths: list[str]) -> Split:
    return Split("train", [n % 3 for n in range(len(paths))], FileImages(paths))
