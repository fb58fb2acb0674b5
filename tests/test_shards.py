"""Shards: the writer (`imgcls-data shard`), the reader (imgcls.data.shards, over a folder and over HTTP), the remote
cache (imgcls.data.shard_cache) and the disk-cache key of a shard split (imgcls.data.fingerprint).

    .venv/bin/python -m pytest -q tests/test_shards.py
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import pickle
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_class_folders, write_hub_layout, write_recipe
from PIL import Image

from imgcls.data import store_disk
from imgcls.data.loaders import build_splits
from imgcls.data.tools.cli import main
from imgcls.data.tools.shard import ShardSize, human_bytes, parse_shard_size, summary
from imgcls.data.tools.target import data_config
from imgcls.exitcodes import EXIT_USAGE
from imgcls.data.fingerprint import source_fingerprint
from imgcls.recipe import DataConfig, load_recipe
from imgcls.data.scan import check_images
from imgcls.data.shard_cache import ShardCache, download_lock
from imgcls.data.shards import load_shards, shard_counts
from imgcls.errors import DataError, ShardError
from imgcls.data.store import DecodingImages
from imgcls.data.store_disk import open_store
from imgcls.data.transforms import Preprocess

CLASSES = ["a", "b", "c"]


@pytest.fixture
def tree(tmp_path) -> Path:
    """train (6 a class, PNG and JPEG), val and test (2 a class) of 16 px gray images."""
    root = tmp_path / "imgs"
    write_class_folders(root / "train", CLASSES, 6, exts=(".png", ".jpg"), seed=0)
    write_class_folders(root / "val", CLASSES, 2, seed=1)
    write_class_folders(root / "test", CLASSES, 2, exts=(".jpg",), seed=2)
    return root


def folder_cfg(root: Path) -> DataConfig:
    """What `imgcls-data shard FOLDER --image-size 16 16 --channels 1` reads."""
    return data_config(str(root), [], (16, 16), 1)


def shards_cfg(root: str | Path, **kw) -> DataConfig:
    return DataConfig(source="shards", root=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25], **kw)


def shard(target: Path, out: Path, *extra: str) -> int:
    """`imgcls-data shard`, in the source's order unless `extra` says another."""
    folder = ["--image-size", "16", "16", "--channels", "1"] if target.is_dir() else []
    order = [] if "--order" in extra else ["--order", "source"]
    return main(["shard", str(target), str(out), *folder, *order, *extra])


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def assert_same_items(source, sharded, base: Path) -> None:
    """Item k of `sharded` (all items of its shards) is position k of `source`: bytes, pixels, label, and its key
    is where the source's item came from, relative to `base` (the source's root)."""
    assert len(sharded) == len(source) and sharded.indices == list(range(len(source)))
    for k, i in enumerate(source.indices):
        assert sharded.reader.raw(k) == source.reader.raw(i)
        got, want = sharded.open(k), source.open(i)
        assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want))
        assert sharded.labels[k] == source.labels[i]
        assert f" ({base}/" in f" ({source.describe(i)}" or f" ({base} " in f" ({source.describe(i)}"
        assert sharded.describe(k).endswith(f" ({source.describe(i).removeprefix(str(base))[1:]})")


# ---------------------------------------------------------------- the writer
def test_folder_round_trip(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert shard(tree, out, "--shard-size", "4") == 0
    manifest = manifest_of(out)
    assert manifest["format"] == "imgcls-shards" and manifest["version"] == 2
    assert manifest["class_names"] == CLASSES
    counts = {name: [s["count"] for s in split["shards"]] for name, split in manifest["splits"].items()}
    assert counts == {"train": [4, 4, 4, 4, 2], "val": [4, 2], "test": [4, 2]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "train.labels.npy", "val.labels.npy", "test.labels.npy"]
        + [f"train-0000{k}.parquet" for k in range(5)] + ["val-00000.parquet", "val-00001.parquet",
                                                          "test-00000.parquet", "test-00001.parquet"])
    for entry in manifest["splits"]["train"]["shards"]:
        data = (out / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    schema = pq.read_schema(out / "train-00000.parquet")
    assert [(f.name, f.type) for f in schema] == [("image", pa.binary()), ("label", pa.int32()), ("key", pa.string())]
    lines = capsys.readouterr().out.splitlines()
    train_bytes = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    assert lines[0] == f"train: 18 images in 5 shards, {human_bytes(train_bytes)} (2-4 images a shard)"
    assert lines[:3] == summary(manifest)
    assert lines[3] == f'wrote {out}: set data.source = "shards" and data.root = "{out}" (or the URL you publish it at)'

    source, sharded = build_splits(folder_cfg(tree)), build_splits(shards_cfg(out))
    assert sharded.class_names == CLASSES and sharded.sizes() == "train 18 / val 6 / test 6"
    for name in ("train", "val", "test"):
        assert_same_items(getattr(source, name), getattr(sharded, name), tree)
        labels = np.load(out / f"{name}.labels.npy")
        assert labels.dtype == np.uint8 and labels.tolist() == getattr(sharded, name).labels
    assert sharded.train.describe(5) == f"{out}/train-00001.parquet row 1 (train/a/0005.jpg)"
    keys = [k for f in out.glob("*.parquet") for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]
    assert len(keys) == 30 and not [k for k in keys if str(tmp_path) in k or k.startswith("/")]
    assert pq.read_table(out / "train-00001.parquet", columns=["label"]).column("label").to_pylist() == [0, 0, 1, 1]


def test_train_is_written_shuffled_once_by_default_so_every_shard_holds_every_class(tree, tmp_path):
    out = tmp_path / "shards"
    assert shard(tree, out, "--order", "shuffled", "--seed", "3", "--shard-size", "9") == 0
    source, sharded = build_splits(folder_cfg(tree)), build_splits(shards_cfg(out))
    order = np.random.default_rng(3).permutation(len(source.train)).tolist()
    assert_same_items(source.train.subset("train", order), sharded.train, tree)
    assert_same_items(source.val, sharded.val, tree)  # val and test keep their order
    assert manifest_of(out)["train_order"] == {"order": "shuffled", "seed": 3}
    for entry in manifest_of(out)["splits"]["train"]["shards"]:  # 9 of 18 images, 3 classes of 6: all in each
        labels = pq.read_table(out / entry["file"], columns=["label"]).column("label").to_pylist()
        assert set(labels) == {0, 1, 2}, labels


def test_hub_layout_round_trip_writes_the_carved_val(tmp_path):
    hub = write_hub_layout(tmp_path / "hub", ["zero", "one", "two", "three"], {"train": 30, "test": 10})
    recipe = write_recipe(tmp_path / "r.toml", f'source = "hub"\ndataset = "{hub}"')
    out = tmp_path / "shards"
    assert main(["shard", str(recipe), "data.val_size=6", str(out), "--shard-size", "8", "--order", "source"]) == 0
    counts = {name: [s["count"] for s in split["shards"]] for name, split in manifest_of(out)["splits"].items()}
    assert counts == {"train": [8, 8, 8], "val": [6], "test": [8, 2]}
    source = build_splits(load_recipe(recipe, ["data.val_size=6"]).data)
    sharded = build_splits(shards_cfg(out))
    assert sharded.class_names == ["zero", "one", "two", "three"]
    for name in ("train", "val", "test"):
        assert_same_items(getattr(source, name), getattr(sharded, name), hub)
    assert sharded.val.describe(0) == f"{out}/val-00000.parquet row 0 ([train] row {source.val.indices[0]})"


def test_shard_size_in_bytes_closes_a_shard_before_the_image_that_would_overflow_it(tree, tmp_path):
    sizes = [p.stat().st_size for p in sorted((tree / "train").rglob("*.*"))]
    limit = 3 * sorted(sizes)[len(sizes) // 2]
    out = tmp_path / "shards"
    assert shard(tree, out, "--shard-size", f"{limit}B") == 0
    train = [s["file"] for s in manifest_of(out)["splits"]["train"]["shards"]]
    held = [[len(b) for b in pq.read_table(out / f, columns=["image"]).column("image").to_pylist()] for f in train]
    assert sum(len(h) for h in held) == 18 and len(held) > 3
    for this, following in zip(held, held[1:] + [None]):
        assert sum(this) <= limit or len(this) == 1
        if following is not None:
            assert sum(this) + following[0] > limit


def test_shard_size_parsing():
    assert parse_shard_size("10000") == ShardSize(images=10000)
    assert parse_shard_size("256MB") == ShardSize(nbytes=256_000_000)
    assert parse_shard_size("1.5gb") == ShardSize(nbytes=1_500_000_000)
    assert parse_shard_size("1GiB") == ShardSize(nbytes=2**30)
    assert parse_shard_size("700 B") == ShardSize(nbytes=700)
    for bad in ("12XB", "1.5", "-3", "MB"):
        with pytest.raises(argparse.ArgumentTypeError) as e:
            parse_shard_size(bad)
        assert str(e.value) == (f"{bad!r}: expected a whole number of images (10000) or a size with a unit "
                                f"(256MB, 1GB, 512MiB)")
    with pytest.raises(argparse.ArgumentTypeError, match="'0': a shard must hold something"):
        parse_shard_size("0")


def test_a_filled_out_folder_is_refused_and_left_alone(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert shard(tree, out) == EXIT_USAGE
    assert capsys.readouterr().err == (f"error: {out}: already exists and is not an empty folder; shards are "
                                       f"written into a new or empty folder: choose another OUT, or remove this one\n")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob("shards.tmp-*"))
    (out / "keep.txt").unlink()
    assert shard(tree, out) == 0  # an empty folder is fine
    assert manifest_of(out)["splits"]["train"]["count"] == 18
    assert not list(tmp_path.glob("shards.tmp-*"))


# ---------------------------------------------------------------- the reader
def test_missing_or_foreign_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(tmp_path / "nowhere"))
    assert str(e.value) == (f"data.root = '{tmp_path / 'nowhere'}': no such folder (data.source = \"shards\" "
                            f"reads a folder written by `imgcls-data shard`, or an http(s):// or hf:// URL of one)")
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(tmp_path))
    assert str(e.value) == f"{tmp_path}/manifest.json not found; is data.root a folder written by `imgcls-data shard`?"
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "imgcls-shards", "version": 1}))
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(tmp_path))
    assert str(e.value) == (f"{tmp_path}/manifest.json: version 1; this imgcls reads version 2: use the imgcls "
                            f"that wrote it, or write the shards anew")


def test_a_changed_local_shard_is_a_shard_error_not_a_bad_image(tree, tmp_path):
    out = tmp_path / "shards"
    shard(tree, out, "--shard-size", "4")
    with open(out / "train-00002.parquet", "ab") as f:
        f.write(b"extra")
    entry = manifest_of(out)["splits"]["train"]["shards"][2]
    split = load_shards(shards_cfg(out))[0]["train"]
    assert split.open(0).size == (16, 16)  # the other shards still read
    with pytest.raises(ShardError) as e:
        check_images({"train": split}, [], "skip")
    assert str(e.value) == (f"{out}/train-00002.parquet: {entry['bytes'] + 5} bytes, but manifest.json says "
                            f"{entry['bytes']}: the shard changed after it was written; write the shards anew with "
                            f"`imgcls-data shard`")


def test_reader_pickles_as_plain_data_and_keeps_two_shards(tree, tmp_path):
    out = tmp_path / "shards"
    shard(tree, out, "--shard-size", "4")
    split = load_shards(shards_cfg(out))[0]["train"]
    reader = split.reader
    for i in (0, 4, 8, 12):  # four shards, in turn
        reader.raw(i)
    assert list(reader._tables) == [2, 3]
    clone = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) < 4000 and not clone._tables
    assert [clone.raw(i) for i in range(18)] == [reader.raw(i) for i in range(18)]


def test_shard_counts_follow_the_positions_of_a_split(tree, tmp_path):
    out = tmp_path / "shards"
    shard(tree, out, "--shard-size", "4")
    train = load_shards(shards_cfg(out))[0]["train"]
    assert shard_counts(train) == [4, 4, 4, 4, 2]
    assert shard_counts(train.subset("part", [0, 1, 5, 6, 7, 8, 17])) == [2, 3, 1, 0, 1]


# ---------------------------------------------------------------- over HTTP
class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def served(folder: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def cached(folder: Path) -> list[Path]:
    """What a cache folder holds but its (empty) download lock files."""
    return [p for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_http_shards_read_through_a_bounded_cache(tree, tmp_path):
    out = tmp_path / "shards"
    shard(tree, out, "--shard-size", "4")
    local = load_shards(shards_cfg(out))[0]
    largest = max(s["bytes"] for split in manifest_of(out)["splits"].values() for s in split["shards"])
    limit = int(largest * 1.5)
    with served(out) as url:
        sharded = build_splits(shards_cfg(url, shard_cache_gb=limit / 1e9))
        cache = Path(os.environ["IMGCLS_CACHE"]) / "shards" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
        assert sharded.train.reader.cache.folder == str(cache)
        assert sharded.sizes() == "train 18 / val 6 / test 6"
        for name in ("train", "val", "test", "train"):  # the second pass over train reads evicted shards again
            remote = getattr(sharded, name)
            for k in range(len(remote)):
                assert np.array_equal(np.asarray(remote.open(k)), np.asarray(local[name].open(k)))
                assert remote.labels[k] == local[name].labels[k]
                assert folder_bytes(cache) <= remote.reader.cache.limit_bytes + largest
        held = sorted(p.name for p in cached(cache))
        assert 1 <= len(held) <= 2 and all(p.endswith(".parquet") and not p.startswith(".") for p in held)
        entry = manifest_of(out)["splits"]["train"]["shards"][4]
        assert held[-1] == f"train-00004-{entry['sha256'][:16]}.parquet"
        assert sharded.train.describe(17) == f"{url.rstrip('/')}/train-00004.parquet row 1 (train/c/0005.jpg)"


def test_a_corrupted_remote_shard_is_named_with_both_hashes(tree, tmp_path):
    out = tmp_path / "shards"
    shard(tree, out, "--shard-size", "4")
    path = out / "train-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    want = manifest_of(out)["splits"]["train"]["shards"][1]["sha256"]
    with served(out) as url:
        train = load_shards(shards_cfg(url, shard_cache_dir=str(tmp_path / "cache")))[0]["train"]
        assert train.open(0).size == (16, 16)
        with pytest.raises(ShardError) as e:
            train.open(4)
        root = url.rstrip("/")
        assert str(e.value) == (f"{root}/train-00001.parquet: sha256 {hashlib.sha256(data).hexdigest()}, but "
                                f"manifest.json says {want}: the shard is not the one the manifest was written with "
                                f"(changed on the server, or damaged in transit); upload the shards and their "
                                f"manifest.json again, written together by `imgcls-data shard`")
        with pytest.raises(ShardError):  # not an unreadable image that "skip" would leave out
            check_images({"train": train}, [], "skip")
    assert [p.name.split("-")[1] for p in cached(tmp_path / "cache")] == ["00000"]  # nothing else kept


def test_cache_evicts_the_least_recently_used_shard_and_stopped_downloads(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    shards = {}
    for name in "abc":
        data = name.encode() * 100
        (remote / f"{name}.parquet").write_bytes(data)
        shards[name] = (f"file://{remote}/{name}.parquet", hashlib.sha256(data).hexdigest(), 100)
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=250)
    hour_ago = time.time() - 3600
    os.utime(cache.fetch(*shards["a"]), (hour_ago, hour_ago))
    os.utime(cache.fetch(*shards["b"]), (hour_ago + 1, hour_ago + 1))
    cache.fetch(*shards["a"])  # a hit: a is now the most recently used
    stopped, running = tmp_path / "cache" / ".x.parquet.tmp-1-00", tmp_path / "cache" / ".y.parquet.tmp-2-00"
    stopped.write_bytes(b"x")  # nobody holds its download lock: its download was stopped
    with download_lock(tmp_path / "cache" / "y.parquet"):  # a download in progress
        running.write_bytes(b"y")
        cache.fetch(*shards["c"])  # 200 + 100 + 1 > 250: b goes
    kept = [running.name, f"a-{shards['a'][1][:16]}.parquet", f"c-{shards['c'][1][:16]}.parquet"]
    assert sorted(p.name for p in cached(tmp_path / "cache")) == sorted(kept)


def test_an_unreachable_root_is_a_data_error(tmp_path):
    with served(tmp_path) as url:
        pass  # the server is gone: nothing listens on its port any more
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(url))
    assert str(e.value).startswith(f"cannot read {url}manifest.json (ClientConnectorError: ")
    assert str(e.value).endswith("); check data.root and that this machine can reach it")


# ---------------------------------------------------------------- the disk cache key
def test_disk_store_over_shards_reopens_and_a_new_manifest_changes_the_key(tree, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    shard(tree, out, "--shard-size", "4")
    cfg = shards_cfg(out)
    pre = Preprocess.from_data(cfg)
    val = build_splits(cfg).val
    first = open_store(val, pre, "disk", "eval")
    expected = DecodingImages(build_splits(folder_cfg(tree)).val, pre, "eval")
    index = torch.arange(6)
    assert torch.equal(first.batch(index)[0], expected.batch(index)[0])

    def no_fill(*args, **kwargs):
        raise AssertionError("the store was filled again")
    monkeypatch.setattr(store_disk, "_fill_disk", no_fill)
    again = open_store(build_splits(cfg).val, pre, "disk", "eval")
    assert again.path == first.path and torch.equal(again.pixels, first.pixels)

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert source_fingerprint(build_splits(shards_cfg(moved)).val) == source_fingerprint(val)

    Image.new("L", (16, 16), 7).save(tree / "val" / "a" / "0000.png")
    rewritten = tmp_path / "rewritten"
    shard(tree, rewritten, "--shard-size", "4")
    changed = source_fingerprint(build_splits(shards_cfg(rewritten)).val)
    assert changed["kind"] == "shards" and changed["manifest_sha256"] != source_fingerprint(val)["manifest_sha256"]
    assert changed != source_fingerprint(val)


def test_a_file_name_that_is_not_utf8_is_sharded_with_a_readable_key(tree, tmp_path):
    """#20.17: a Latin-1 file name (bytes 0xE9, not UTF-8) made `imgcls-data shard` fail on the key column
    (UnicodeEncodeError). Its key keeps the byte as a \\xe9 escape, and the image is sharded like any other."""
    odd = os.fsencode(tree / "train" / "a") + b"/caf\xe9.png"
    shutil.copyfile(tree / "train" / "a" / "0000.png", odd)
    out = tmp_path / "shards"
    assert shard(tree, out) == 0
    keys = [k for f in sorted(out.glob("train-*.parquet")) for k in pq.read_table(f).column("key").to_pylist()]
    assert "train/a/caf\\xe9.png" in keys and len(keys) == 19
