"""The up-front image check: every image is decoded once before training; every unreadable file and every
class folder without images is named in one error (on_bad_image = "error") or left out with the counts logged
(on_bad_image = "skip"); a long list goes to a file whose path the message gives."""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_class_folders
from imgcls.data.loaders import build_splits, make_datasets
from imgcls.recipe import DataConfig
from imgcls.errors import DataError

GRAY = dict(image_size=(16, 16), channels=1, mean=[0.5], std=[0.25])
FOOTER = 'Fix or remove them, or set data.on_bad_image = "skip" to leave them out.'


def folder_cfg(root: Path, mode: str) -> DataConfig:
    return DataConfig(source="folder", root=str(root), on_bad_image=mode, **GRAY)


def truncated_jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()[:len(out.getvalue()) // 2]


@pytest.fixture
def broken(tmp_path) -> Path:
    """train/{a,b,c} x 6 and val/{a,b,c} x 2 good images; 3 broken files; train/d has no images."""
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b", "c"], 6)
    write_class_folders(root / "val", ["a", "b", "c"], 2)
    (root / "train" / "a" / "x.png").write_bytes(b"\x89PNG but not really an image")
    (root / "train" / "b" / "cut.jpg").write_bytes(truncated_jpeg())
    (root / "val" / "c" / "empty.png").write_bytes(b"")
    (root / "train" / "d").mkdir()
    (root / "train" / "d" / "notes.txt").write_text("no images here")
    return root


@pytest.mark.parametrize("chunk", [256, 2])  # one chunk per split, or many: each split checked across processes
def test_every_broken_file_and_empty_class_folder_in_one_error(broken, chunk, monkeypatch):
    monkeypatch.setattr("imgcls.data.scan.CHUNK", chunk)
    with pytest.raises(DataError) as e:
        build_splits(folder_cfg(broken, "error"))
    lines = str(e.value).split("\n")
    assert lines[0] == 'data.on_bad_image = "error": 3 unreadable images and 1 class folder without images:'
    assert lines[1].startswith(f"  {broken / 'train' / 'a' / 'x.png'}: UnidentifiedImageError: cannot identify")
    assert lines[2].startswith(f"  {broken / 'train' / 'b' / 'cut.jpg'}: OSError: image file is truncated")
    assert lines[3].startswith(f"  {broken / 'val' / 'c' / 'empty.png'}: UnidentifiedImageError: ")
    assert lines[4] == f"  {broken / 'train' / 'd'}: class folder has no images"
    assert lines[5:] == [FOOTER]
    assert e.value.__cause__ is None


def test_skip_leaves_them_out_and_logs_the_counts(broken, caplog):
    cfg = folder_cfg(broken, "skip")
    with caplog.at_level(logging.WARNING):
        s = build_splits(cfg)
    assert s.class_names == ["a", "b", "c"]
    assert s.sizes() == "train 18 / val 6 / test 0"
    names = [s.train.describe(i) for i in s.train.indices] + [s.val.describe(i) for i in s.val.indices]
    assert not any(n.endswith(("x.png", "cut.jpg", "empty.png")) for n in names)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    lines = warning.split("\n")
    assert lines[0] == ('data.on_bad_image = "skip": left out 3 unreadable images (train 2, val 1) and 1 class '
                        'folder without images:')
    assert [line.split(": ")[0] for line in lines[1:]] == [
        f"  {broken / 'train' / 'a' / 'x.png'}", f"  {broken / 'train' / 'b' / 'cut.jpg'}",
        f"  {broken / 'val' / 'c' / 'empty.png'}", f"  {broken / 'train' / 'd'}"]
    ds = make_datasets(s, cfg, seed=0)
    assert [ds["train"][k][0].shape for k in range(18)] == [(1, 16, 16)] * 18
    assert sorted(ds["val"][k][1] for k in range(6)) == [0, 0, 1, 1, 2, 2]


def test_a_long_list_goes_to_a_file(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the system temp folder, for this test
    (tmp_path / "tmp").mkdir()
    root = write_class_folders(tmp_path / "imgs", ["a", "b"], 6)
    for i in range(25):
        (root / "a" / f"bad{i:02d}.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(source="folder", root=str(root), val_size=2, val_pick="first", **GRAY))
    lines = str(e.value).split("\n")
    assert lines[0] == 'data.on_bad_image = "error": 25 unreadable images:'
    assert len(lines) == 1 + 20 + 1 + 1 and lines[-1] == FOOTER
    match = re.fullmatch(r"  \.\.\. and 5 more; all 25 are listed in (.+)", lines[21])
    assert match, lines[21]
    assert Path(match.group(1)).parent == tmp_path / "tmp" and Path(match.group(1)).name.startswith("imgcls-")
    listed = Path(match.group(1)).read_text().splitlines()
    assert [line.split(": ")[0] for line in listed] == [str(root / "a" / f"bad{i:02d}.png") for i in range(25)]
    assert lines[1:21] == [f"  {line}" for line in listed[:20]]


def test_an_image_that_breaks_after_the_check_is_named_when_read(tmp_path):
    root = write_class_folders(tmp_path / "imgs", ["a", "b"], 5)
    cfg = DataConfig(source="folder", root=str(root), val_size=2, val_pick="first", **GRAY)
    s = build_splits(cfg)
    broken = s.train.describe(s.train.indices[0])
    Path(broken).write_bytes(b"overwritten")
    with pytest.raises(DataError) as e:
        make_datasets(s, cfg, seed=0)["train"][0]
    assert str(e.value).startswith(f"cannot read image {broken}: UnidentifiedImageError: ")
    assert str(e.value).endswith('Fix or remove the file, or set data.on_bad_image = "skip" to leave unreadable '
                                 'images out.')


def test_the_check_is_not_repeated_for_unchanged_images_and_is_for_changed_ones(broken, monkeypatch):
    """A second run over the same files reads the check's result from the cache folder; a file whose size or
    mtime changed is checked again (here: the broken PNG replaced by a good one)."""
    from imgcls.data.sources import FileImages

    calls = []
    original = FileImages.check
    monkeypatch.setattr("imgcls.data.pool.pool_size", lambda: 1)  # decode here, where `calls` is seen
    monkeypatch.setattr(FileImages, "check", lambda self, i: calls.append(i) or original(self, i))
    first = build_splits(folder_cfg(broken, "skip"))
    assert len(calls) == 27  # train 18 + 2 broken, val 6 + 1 broken
    calls.clear()
    again = build_splits(folder_cfg(broken, "skip"))
    assert calls == [] and again.train.indices == first.train.indices and again.val.indices == first.val.indices
    Image.new("L", (16, 16)).save(broken / "train" / "a" / "x.png", "PNG")
    mended = build_splits(folder_cfg(broken, "skip"))
    assert len(calls) == 20  # the train split again; val is unchanged
    assert len(mended.train) == len(first.train) + 1
