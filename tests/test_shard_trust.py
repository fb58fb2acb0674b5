"""Shards from someone else (issue #20.5, #20.8-#20.11; #19.13): what a server, a shared cache folder or a
changed local file can and cannot make imgcls read.

    .venv/bin/python -m pytest -q tests/test_shard_trust.py
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_class_folders
from test_shards import CLASSES, manifest_of, shard, shards_cfg

from imgcls.data import shard_cache
from imgcls.data.scan import check_images
from imgcls.data.shard_cache import ShardCache
from imgcls.data.shards import load_shards
from imgcls.errors import DataError, ShardError


# ---------------------------------------------------------------- a server that counts, stalls and overflows
class Handler(SimpleHTTPRequestHandler):
    gets: collections.Counter
    stall_once: set = set()  # paths whose first GET sends half the body, waits, then hangs up
    endless: set = set()  # paths answered with far more bytes than the file holds
    delay_s: float = 0.0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.gets[name] += 1
        time.sleep(self.delay_s)
        if name in self.endless:
            self.send_response(200)
            self.send_header("Content-Length", str(8 << 20))
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(8):
                    self.wfile.write(bytes(1 << 20))
            return
        if name in self.stall_once and self.gets[name] == 1:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            time.sleep(6)
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def server(folder: Path, **behaviour):
    handler = type("H", (Handler,), {"gets": collections.Counter(), **behaviour})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.gets
    finally:
        httpd.shutdown()
        httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(out: Path, manifest: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest))


def replace_shard(out: Path, split: str, k: int, table: pa.Table, count: int | None = None) -> None:
    """Shard k of `split` becomes `table`; the manifest follows its bytes and sha256 (and count, unless given):
    a shard someone else wrote, consistent with its manifest."""
    entry = manifest_of(out)
    shard_entry = entry["splits"][split]["shards"][k]
    path = out / shard_entry["file"]
    pq.write_table(table, path)
    data = path.read_bytes()
    shard_entry.update(bytes=len(data), sha256=sha(data), count=table.num_rows if count is None else count)
    write_manifest(out, entry)


def replace_labels(out: Path, split: str, data: bytes) -> None:
    """`<split>.labels.npy` becomes `data`, and the manifest's hash of it follows."""
    (out / f"{split}.labels.npy").write_bytes(data)
    manifest = manifest_of(out)
    manifest["splits"][split]["labels"].update(bytes=len(data), sha256=sha(data))
    write_manifest(out, manifest)


def npy_bytes(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, labels)
    return buf.getvalue()


def flip_image_byte(path: Path) -> bytes:
    """One byte inside the first image of a shard flipped (the Parquet still parses): the changed bytes."""
    data = bytearray(path.read_bytes())
    first = pq.read_table(path, columns=["image"]).column("image")[0].as_py()
    at = bytes(data).index(first) + len(first) // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.fixture
def out(tmp_path) -> Path:
    """Shards of 4 images: train 18 (6 a class, PNG and JPEG), val 6, test 6 (16 px gray)."""
    tree = tmp_path / "imgs"
    write_class_folders(tree / "train", CLASSES, 6, exts=(".png", ".jpg"), seed=0)
    write_class_folders(tree / "val", CLASSES, 2, seed=1)
    write_class_folders(tree / "test", CLASSES, 2, exts=(".jpg",), seed=2)
    out = tmp_path / "shards"
    assert shard(tree, out, "--shard-size", "4") == 0
    return out


# ---------------------------------------------------------------- #20.5: the cache verifies what it serves
def test_a_changed_or_corrupt_cached_shard_is_evicted_and_fetched_again(out, tmp_path):
    cache = tmp_path / "cache"
    local = load_shards(shards_cfg(out))[0]["train"]
    with server(out) as (url, gets):
        remote = load_shards(shards_cfg(url, shard_cache_dir=str(cache)))[0]["train"]
        remote.reader.raw(0), remote.reader.raw(4)
        first, second = (next(cache.glob(f"train-0000{k}-*.parquet")) for k in (0, 1))
        flip_image_byte(first)  # the same size, still a Parquet: other pixels
        second.write_bytes(bytes(second.stat().st_size))  # the same size, not a Parquet at all
        again = load_shards(shards_cfg(url, shard_cache_dir=str(cache)))[0]["train"]  # the next run
        assert [again.reader.raw(i) for i in range(8)] == [local.reader.raw(i) for i in range(8)]
        assert gets["train-00000.parquet"] == gets["train-00001.parquet"] == 2
        assert first.read_bytes() == (out / "train-00000.parquet").read_bytes()
        assert second.read_bytes() == (out / "train-00001.parquet").read_bytes()


# ---------------------------------------------------------------- #19.13: local shards are hashed on read
def test_a_local_shard_changed_in_place_at_the_same_size_is_refused_by_its_sha256(out):
    entry = manifest_of(out)["splits"]["train"]["shards"][1]
    changed = flip_image_byte(out / "train-00001.parquet")
    train = load_shards(shards_cfg(out))[0]["train"]
    assert train.reader.raw(0)  # shard 0 is fine
    with pytest.raises(ShardError) as e:
        train.reader.raw(4)
    assert str(e.value) == (f"{out}/train-00001.parquet: sha256 {sha(changed)}, but manifest.json says "
                            f"{entry['sha256']}: the shard changed after it was written; write the shards anew "
                            f"with `imgcls-data shard`")


# ---------------------------------------------------------------- #20.8: labels are hashed and cross-checked
def test_the_labels_file_is_hashed_in_the_manifest(out):
    data = (out / "train.labels.npy").read_bytes()
    assert manifest_of(out)["splits"]["train"]["labels"] == {"file": "train.labels.npy", "bytes": len(data),
                                                             "sha256": sha(data)}
    labels = np.load(out / "train.labels.npy")
    labels[[0, 17]] = labels[[17, 0]]
    relabelled = npy_bytes(labels)
    (out / "train.labels.npy").write_bytes(relabelled)  # the manifest not told
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(out))
    assert str(e.value) == (f"{out}/train.labels.npy: sha256 {sha(relabelled)}, but manifest.json says "
                            f"{sha(data)}: the labels changed after the shards were written; write the shards "
                            f"anew with `imgcls-data shard`")


def test_labels_that_disagree_with_the_shards_label_column_name_the_shard(out):
    labels = np.load(out / "train.labels.npy")
    labels[5] = (labels[5] + 1) % 3
    replace_labels(out, "train", npy_bytes(labels))  # a manifest written to match: only the shard disagrees
    train = load_shards(shards_cfg(out))[0]["train"]
    assert train.reader.raw(0)
    with pytest.raises(ShardError) as e:
        train.reader.raw(4)
    assert str(e.value) == (f"{out}/train-00001.parquet row 1: label {labels[5] - 1 if labels[5] else 2} in the "
                            f"shard, {labels[5]} in train.labels.npy; the shards and their labels were not written "
                            f"together: write the shards anew with `imgcls-data shard`")


# ---------------------------------------------------------------- #20.9: rows are validated
def test_an_image_column_of_paths_is_refused_and_never_opened(out):
    rows = pq.read_table(out / "train-00000.parquet")
    paths = pa.table({"image": pa.array(["/etc/hostname"] * 4), "label": rows.column("label"),
                      "key": rows.column("key")})
    replace_shard(out, "train", 0, paths)
    train = load_shards(shards_cfg(out))[0]["train"]
    with pytest.raises(ShardError) as e:
        train.open(0)
    assert str(e.value) == (f"{out}/train-00000.parquet: columns image: string, label: int32, key: string; a shard "
                            f"holds image: binary (encoded bytes), label: int32, key: string; write the shards anew "
                            f"with `imgcls-data shard`")
    ints = pa.table({"image": pa.array([1, 2, 3, 4]), "label": rows.column("label"), "key": rows.column("key")})
    replace_shard(out, "train", 0, ints)
    with pytest.raises(ShardError, match=r"columns image: int64, label: int32, key: string; a shard holds"):
        load_shards(shards_cfg(out))[0]["train"].open(0)


def test_a_null_image_is_a_bad_image_that_on_bad_image_handles(out):
    rows = pq.read_table(out / "train-00000.parquet")
    images = rows.column("image").to_pylist()
    images[2] = None
    replace_shard(out, "train", 0, rows.set_column(0, "image", pa.array(images, pa.binary())))
    train = load_shards(shards_cfg(out))[0]["train"]
    with pytest.raises(ValueError) as e:
        train.open(2)
    assert str(e.value) == f"{out}/train-00000.parquet row 2: no image (null)"
    with pytest.raises(DataError, match=r"train-00000.parquet row 2 \(.*\): .*no image \(null\)"):
        check_images({"train": train}, [], "error")
    kept = check_images({"train": train}, [], "skip")["train"]
    assert len(kept) == 17 and 2 not in kept.indices


@pytest.mark.parametrize("rows", [3, 5])
def test_a_shard_with_other_row_counts_than_its_manifest_is_a_shard_error(out, rows):
    table = pq.read_table(out / "train-00000.parquet")
    table = table.slice(0, 3) if rows == 3 else pa.concat_tables([table, table.slice(0, 1)])
    replace_shard(out, "train", 0, table, count=4)
    train = load_shards(shards_cfg(out))[0]["train"]
    with pytest.raises(ShardError) as e:
        train.open(3)
    assert str(e.value) == (f"{out}/train-00000.parquet: {rows} rows, but manifest.json says 4; write the shards "
                            f"anew with `imgcls-data shard`")


# ---------------------------------------------------------------- #20.10: the manifest is validated
def test_a_split_name_that_leaves_the_root_is_refused(out, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.labels.npy").write_bytes((out / "val.labels.npy").read_bytes())
    manifest = manifest_of(out)
    manifest["splits"]["../../outside/secret"] = manifest["splits"].pop("val")
    write_manifest(out, manifest)
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(out))
    assert str(e.value) == (f"{out}/manifest.json: malformed (split name '../../outside/secret' is not a plain "
                            f"name: letters, digits, '_' and '-'); write the shards anew with `imgcls-data shard`")


def test_a_labels_header_claiming_a_huge_shape_is_refused_before_allocating(out):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (99999999999,)})
    huge = buf.getvalue() + np.load(out / "train.labels.npy").tobytes()
    assert b"99999999999" in huge
    replace_labels(out, "train", huge)
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(out))
    assert str(e.value) == (f"{out}/train.labels.npy: uint8 (99999999999,), manifest.json says 18 integer labels; "
                            f"write the shards anew with `imgcls-data shard`")


def test_a_deeply_nested_manifest_is_a_data_error(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(tmp_path))
    assert str(e.value) == (f"{tmp_path}/manifest.json: not a JSON object (nested too deeply); write the shards anew "
                            f"with `imgcls-data shard`")


@pytest.mark.parametrize("key,value", [("bytes", 10**30), ("bytes", -1), ("count", True), ("count", -4)])
def test_shard_sizes_outside_sense_are_refused(out, key, value):
    manifest = manifest_of(out)
    manifest["splits"]["val"]["shards"][0][key] = value
    write_manifest(out, manifest)
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(out))
    assert str(e.value) == (f"{out}/manifest.json: malformed (split 'val': shard 'val-00000.parquet' needs a count "
                            f"and bytes (whole numbers, 0 <= count, 0 < bytes <= 2**40) and a sha256 of 64 hex "
                            f"digits); write the shards anew with `imgcls-data shard`")


# ---------------------------------------------------------------- #20.11: downloads
def remote_entry(out: Path, url: str, k: int = 0) -> tuple[str, str, int]:
    entry = manifest_of(out)["splits"]["train"]["shards"][k]
    return f"{url}/{entry['file']}", entry["sha256"], entry["bytes"]


def test_a_stalled_download_times_out_and_is_retried(out, tmp_path, monkeypatch):
    monkeypatch.setattr(shard_cache, "READ_TIMEOUT_S", 0.5)
    monkeypatch.setattr(shard_cache, "BACKOFF_S", 0.01)
    with server(out, stall_once={"train-00000.parquet"}) as (url, gets):
        started = time.monotonic()
        path = ShardCache(str(tmp_path / "cache"), 10**9).fetch(*remote_entry(out, url))
        assert time.monotonic() - started < 5  # not waiting the server's 6 s out
        assert gets["train-00000.parquet"] == 2
        assert path.read_bytes() == (out / "train-00000.parquet").read_bytes()


def test_a_server_sending_more_than_the_manifest_says_is_cut_off(out, tmp_path):
    cache = tmp_path / "cache"
    with server(out, endless={"train-00000.parquet"}) as (url, gets):
        link, digest, nbytes = remote_entry(out, url)
        with pytest.raises(ShardError) as e:
            ShardCache(str(cache), 10**9).fetch(link, digest, nbytes)
    assert str(e.value) == (f"{link}: the server sent more than the {nbytes} bytes manifest.json says; upload the "
                            f"shards and their manifest.json again, written together by `imgcls-data shard`")
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []


def test_temps_of_killed_downloads_go_and_running_ones_count_toward_the_limit(out, tmp_path):
    cache_dir = tmp_path / "cache"
    cache = ShardCache(str(cache_dir), limit_bytes=1)  # anything more than the one being fetched is too much
    with server(out) as (url, gets):
        a = cache.fetch(*remote_entry(out, url, 0))
        killed = cache_dir / f".{a.name.replace('00000', '00003')}.tmp-1-00"
        killed.write_bytes(bytes(5000))  # fresh, but nobody downloads it: its download was killed
        cache.fetch(*remote_entry(out, url, 1))
        assert not killed.exists() and not a.exists()
        running_for = cache_dir / a.name.replace("00000", "00004")
        running = cache_dir / f".{running_for.name}.tmp-2-00"
        with shard_cache.download_lock(running_for):  # a download in progress (another process)
            running.write_bytes(bytes(5000))
            b = cache.fetch(*remote_entry(out, url, 2))
            assert running.exists()
        assert sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")) == sorted(
            [running.name, b.name])


def test_one_download_per_shard_however_many_ask_at_once(out, tmp_path):
    cache = ShardCache(str(tmp_path / "cache"), 10**9)
    with server(out, delay_s=0.3) as (url, gets):
        entry = remote_entry(out, url)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(lambda _: cache.fetch(*entry), range(4)))
    assert gets["train-00000.parquet"] == 1
    assert len(set(paths)) == 1 and paths[0].read_bytes() == (out / "train-00000.parquet").read_bytes()


def test_a_shard_claiming_more_bytes_than_it_has_evicts_nothing_and_is_refused(out, tmp_path):
    cache_dir = tmp_path / "cache"
    cache = ShardCache(str(cache_dir), limit_bytes=10**6)
    with server(out) as (url, gets):
        kept = cache.fetch(*remote_entry(out, url, 0))
        link, digest, nbytes = remote_entry(out, url, 1)
        with pytest.raises(ShardError) as e:
            cache.fetch(link, digest, 10**12)  # room for a terabyte would have emptied the cache
    assert str(e.value) == (f"{link}: the server sent {nbytes} bytes, but manifest.json says {10**12}; upload the "
                            f"shards and their manifest.json again, written together by `imgcls-data shard`")
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == [kept.name]


def test_a_labels_file_longer_than_the_manifest_says_is_not_read_past_it(out):
    nbytes = manifest_of(out)["splits"]["train"]["labels"]["bytes"]
    with open(out / "train.labels.npy", "ab") as f:
        f.write(bytes(50 << 20))
    with pytest.raises(DataError) as e:
        load_shards(shards_cfg(out))
    assert str(e.value) == (f"{out}/train.labels.npy: more than the {nbytes} bytes manifest.json says; write the "
                            f"shards anew with `imgcls-data shard`")


def test_a_manifest_larger_than_any_shard_folder_needs_is_refused_without_reading_it_whole(out, monkeypatch):
    from imgcls.data import shard_manifest

    monkeypatch.setattr(shard_manifest, "MAX_MANIFEST_BYTES", 1 << 20, raising=False)
    read = []
    real = shard_manifest.fetch_small

    def spy(root, name, limit=None):
        data = real(root, name, limit)
        read.append(len(data))
        return data

    monkeypatch.setattr(shard_manifest, "fetch_small", spy)
    with server(out, endless={"manifest.json"}) as (url, gets):  # 8 MiB of zeros, as a hostile server sends
        with pytest.raises(DataError) as e:
            shard_manifest.read_manifest(url)
    assert str(e.value) == (f"{url}/manifest.json: more than 1048576 bytes, far more than a manifest of shards "
                            f"needs (its limit is 1048576); check data.root, or write the shards anew with "
                            f"`imgcls-data shard`")
    assert read == []  # refused inside the read: at most the limit + 1 bytes were taken


def test_a_remote_labels_file_longer_than_one_network_read_is_read_whole(tmp_path):
    # a streamed http read(n) returns what one network read brought (64 KiB): 50,000 labels were cut short
    from imgcls.data.shard_manifest import read_labels

    labels = (np.arange(50_000) % 7).astype(np.int32)
    data = npy_bytes(labels)
    (tmp_path / "train.labels.npy").write_bytes(data)
    entry = {"count": len(labels), "labels": {"file": "train.labels.npy", "bytes": len(data), "sha256": sha(data)}}
    with server(tmp_path) as (url, gets):
        got = read_labels(url, "train", entry, 7)
    assert np.array_equal(got, labels) and got.dtype == np.int32
