"""What the caches key on (#20 items 3 and 4, #19 items 6, 7 and 18): a file replaced with the same size and mtime,
a folder edited with its mtime restored, a transient read error, an edit of the code that makes the pixels,
and temp files at predictable names.

    .venv/bin/python -m pytest -q tests/test_cache_keys.py
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import write_class_folders
from imgcls.data import fingerprint, images, index_cache, scan
from imgcls.data.fingerprint import code_identity

from imgcls.data.loaders import build_splits
from imgcls.data.sources import FileImages
from imgcls.data.split import Split
from imgcls.data.store_disk import open_disk
from imgcls.data.transforms import Preprocess
from imgcls.errors import DataError
from imgcls.recipe import DataConfig

OLD_NS = 1_600_000_000 * 10**9
PRE = Preprocess((8, 8), 3, (0.5,) * 3, (0.25,) * 3, "bilinear")


def _bmp(path: Path, value: int) -> None:
    """An 8x8 RGB BMP of one value: uncompressed, so every such file has the same byte size."""
    Image.new("RGB", (8, 8), (value, value, value)).save(path, "BMP")
    os.utime(path, ns=(OLD_NS, OLD_NS))


def _replace_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What `cp -p` / `rsync -t` / `tar` do: new content under the old name, with the old mtime."""
    st = os.stat(path)
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    assert len(data) == st.st_size
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(new, path)


@pytest.fixture
def bmps(tmp_path) -> list[str]:
    folder = tmp_path / "img"
    folder.mkdir()
    for n in range(3):
        _bmp(folder / f"{n}.bmp", 40 * (n + 1))
    return [str(folder / f"{n}.bmp") for n in range(3)]


def test_the_disk_store_serves_the_new_pixels_of_a_file_replaced_with_its_size_and_mtime(bmps, tmp_path):
    split = Split("train", [0, 1, 2], FileImages(bmps))
    first = open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    assert int(first.pixels[0].max()) == 40
    buf = Path(tmp_path / "x.bmp")
    Image.new("RGB", (8, 8), (200, 200, 200)).save(buf, "BMP")
    _replace_keeping_size_and_mtime(Path(bmps[0]), buf.read_bytes())
    again = open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    assert int(again.pixels[0].min()) == int(again.pixels[0].max()) == 200


def test_the_image_check_runs_again_on_a_file_replaced_with_its_size_and_mtime(tmp_path):
    root = write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 6).parent
    write_class_folders(root / "val", ["a", "b"], 2, seed=1)
    cfg = DataConfig(source="folder", root=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25])
    assert len(build_splits(cfg).train) == 12
    victim = root / "train" / "a" / "0000.png"
    _replace_keeping_size_and_mtime(victim, b"\x89PNG" + b"\0" * (victim.stat().st_size - 4))
    with pytest.raises(DataError, match=f"{victim}: UnidentifiedImageError"):
        build_splits(cfg)


def test_a_folder_edited_with_its_mtime_restored_is_indexed_anew(tmp_path):
    """#20.4: one file removed, another added, the class folder's mtime put back: the cached index was trusted,
    and every run failed on the removed file; the index must clear itself and see the new file."""
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b"], 6)
    write_class_folders(root / "val", ["a", "b"], 2, seed=1)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        os.utime(d, ns=(OLD_NS, OLD_NS))  # quiet folders, so the index is cached
    cfg = DataConfig(source="folder", root=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25],
                     on_bad_image="error")
    build_splits(cfg)
    assert len(list((Path(os.environ["IMGCLS_CACHE"]) / "folder-index").glob("*.json"))) == 2
    folder = root / "train" / "a"
    st = os.stat(folder)
    (folder / "0003.png").unlink()
    Image.new("L", (16, 16), 77).save(folder / "9999.png")
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    splits = build_splits(cfg)
    paths = [splits.train.reader.paths[i] for i in splits.train.indices]
    assert str(folder / "9999.png") in paths and str(folder / "0003.png") not in paths
    assert len(paths) == 12


@pytest.mark.parametrize("err", [errno.EACCES, errno.EMFILE, errno.EIO])
def test_a_transient_read_error_is_not_remembered_as_a_bad_image(tmp_path, monkeypatch, err):
    """#19.6: EACCES / EMFILE / EIO while checking left the file out of every later run too."""
    root = write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 6).parent
    write_class_folders(root / "val", ["a", "b"], 2, seed=1)
    cfg = DataConfig(source="folder", root=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25],
                     on_bad_image="skip")
    victim = str(root / "train" / "a" / "0002.png")
    original = FileImages.check

    def flaky(self, i):
        if self.paths[i] == victim:
            raise OSError(err, os.strerror(err), victim)
        return original(self, i)
    monkeypatch.setattr("imgcls.data.pool.pool_size", lambda: 1)
    monkeypatch.setattr(FileImages, "check", flaky)
    assert len(build_splits(cfg).train) == 11  # this run leaves it out, through on_bad_image
    monkeypatch.setattr(FileImages, "check", original)
    splits = build_splits(cfg)
    assert len(splits.train) == 12 and victim in splits.train.reader.paths


def test_a_decode_error_is_remembered(tmp_path, monkeypatch):
    root = write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 6).parent
    write_class_folders(root / "val", ["a", "b"], 2, seed=1)
    (root / "train" / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    cfg = DataConfig(source="folder", root=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25],
                     on_bad_image="skip")
    assert len(build_splits(cfg).train) == 12
    calls = []
    monkeypatch.setattr("imgcls.data.pool.pool_size", lambda: 1)
    monkeypatch.setattr(FileImages, "check", lambda self, i: calls.append(i))
    assert len(build_splits(cfg).train) == 12 and calls == []


# ---------------------------------------------------------------- #19.7: the code that makes the pixels
def test_code_identity_is_the_sha256_of_each_modules_source():
    got = code_identity([images, fingerprint])
    assert got == {m.__name__: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
                   for m in (images, fingerprint)}


def test_the_disk_store_key_holds_the_identity_of_the_code_that_frames_the_pixels(bmps, tmp_path, monkeypatch):
    split = Split("train", [0, 1, 2], FileImages(bmps))
    store = open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert set(manifest["inputs"]["frame"]["code"]) == {"imgcls.data.images", "imgcls.data.framing",
                                               "imgcls.data.transforms", "imgcls.data.store",
                                               "imgcls.data.fingerprint"}
    edited = dict(manifest["inputs"]["frame"]["code"], **{"imgcls.data.framing": "0" * 64})
    monkeypatch.setattr(fingerprint, "code_identity", lambda modules: edited)
    other = open_disk(split, PRE, "eval", cache_dir=str(tmp_path / "cache"))
    assert other.path != store.path and torch.equal(other.pixels, store.pixels)


# ---------------------------------------------------------------- #19.18 / #20.6: temp names nobody can guess
def test_the_image_check_cache_does_not_write_through_a_planted_temp_name(tmp_path):
    root = write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 6).parent
    write_class_folders(root / "val", ["a", "b"], 2, seed=1)
    cfg = DataConfig(source="folder", root=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25])
    splits = build_splits(cfg)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for f in [scan._result_file(s, "") for s in (splits.train, splits.val)]:
        f.unlink()
        os.symlink(victim, f.with_name(f".{f.name}.{os.getpid()}.tmp"))
    build_splits(cfg)
    assert victim.read_text() == "precious"


def test_the_folder_index_cache_does_not_write_through_a_planted_temp_name(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root, ["a", "b"], 3)
    for d in [root, root / "a", root / "b"]:
        os.utime(d, ns=(OLD_NS, OLD_NS))
    from imgcls.data.sources import _scan_classes, image_extensions
    path = index_cache._cache_file(root, image_extensions(), _scan_classes, "")
    path.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, path.with_name(f"{path.name}.tmp-{os.getpid()}"))
    classes, _ = index_cache.cached_scan(root, image_extensions(), _scan_classes)
    assert victim.read_text() == "precious" and sorted(classes) == ["a", "b"]
    assert json.loads(path.read_text())["classes"] == classes
