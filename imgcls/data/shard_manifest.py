"""A shard folder's `manifest.json` and `<split>.labels.npy`, read and checked before anything trusts them.

Both may come from anyone (a web server, a hub repo): the manifest is checked field by field (split names are
plain names, so `<split>.labels.npy` stays inside the root; counts and sizes are whole numbers in range; hashes
are 64 hex digits), and a labels file is read only when its bytes and sha256 are the manifest's, its header is
a one-dimensional integer array of the manifest's count, and its data is exactly that long: nothing is
allocated from a size the file claims. Any problem is one `DataError` naming the file.

    manifest, manifest_sha256 = read_manifest(root)
    labels = read_labels(root, "train", manifest["splits"]["train"], len(manifest["class_names"]))
"""
from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np

from imgcls.data.shard_cache import transfer_errors
from imgcls.errors import DataError

FORMAT, VERSION, MANIFEST = "imgcls-shards", 2, "manifest.json"
MAX_SHARD_BYTES = 2**40
MAX_MANIFEST_BYTES = 64 << 20  # ~200 bytes a shard: room for 300,000 shards
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SHA256 = re.compile(r"[0-9a-f]{64}")
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
ANEW = "write the shards anew with `imgcls-data shard`"


def shard_file(split: str, k: int) -> str:
    return f"{split}-{k:05d}.parquet"


def labels_file(split: str) -> str:
    return f"{split}.labels.npy"


def file_entry(data: bytes, name: str) -> dict:
    """A manifest entry of a file: its name, size and sha256."""
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fetch_small(root: str, name: str, limit: int | None = None) -> bytes:
    """manifest.json or a label file, through fsspec (a local folder, http(s)://, hf://). Reading stops past
    `limit` (a label file: the size the manifest says) or, for the manifest, past MAX_MANIFEST_BYTES: a
    DataError, so a server sending endless bytes costs no more memory than that."""
    import fsspec

    url = f"{root}/{name}"
    cap = MAX_MANIFEST_BYTES if limit is None else limit
    try:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb", block_size=0) as f:
            data = _read_upto(f, cap + 1)
    except FileNotFoundError as e:
        cause = e.__cause__ or e.__context__  # fsspec's streamed http open: an unreachable server, as missing
        if isinstance(cause, transfer_errors()):
            raise DataError(f"cannot read {url} ({type(cause).__name__}: {cause}); check data.root and that this "
                            f"machine can reach it") from None
        hint = ("is data.root a folder written by `imgcls-data shard`?" if name == MANIFEST else
                "manifest.json lists this split, so the shard folder is incomplete: copy it again")
        raise DataError(f"{url} not found; {hint}") from None
    except transfer_errors() as e:
        raise DataError(f"cannot read {url} ({type(e).__name__}: {e}); check data.root and that this machine "
                        f"can reach it") from None
    except ImportError as e:  # fsspec's http(s) needs aiohttp; hf:// needs huggingface_hub
        raise DataError(f"cannot read {url}: {e}") from None
    if len(data) > cap:
        if limit is None:
            raise DataError(f"{url}: more than {cap} bytes, far more than a manifest of shards needs (its limit is "
                            f"{cap}); check data.root, or {ANEW}")
        raise DataError(f"{url}: more than the {limit} bytes manifest.json says; {ANEW}")
    return data


def _read_upto(f, n: int) -> bytes:
    """Up to n bytes: a streamed http file's read(n) returns what one network read brought, often less."""
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _file_ok(entry, count: bool) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str) and
            _whole(entry.get("bytes"), 1, MAX_SHARD_BYTES) and isinstance(entry.get("sha256"), str) and
            SHA256.fullmatch(entry["sha256"]) is not None and (not count or _whole(entry.get("count"), 0, 2**40)))


def _split_problem(name, split) -> str:
    if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
        return f"split name {name!r} is not a plain name: letters, digits, '_' and '-'"
    for s in split["shards"]:
        if not isinstance(s.get("file"), str) or "/" in s["file"] or s["file"].startswith("."):
            return f"split {name!r}: shard file {s.get('file')!r} is not a plain file name"
        if not _file_ok(s, count=True):
            return (f"split {name!r}: shard {s['file']!r} needs a count and bytes (whole numbers, 0 <= count, "
                    f"0 < bytes <= 2**40) and a sha256 of 64 hex digits")
    if not _file_ok(split.get("labels"), count=False) or split["labels"]["file"] != labels_file(name):
        return f"split {name!r}: needs labels {{file = {labels_file(name)!r}, bytes, sha256}}"
    total = sum(s["count"] for s in split["shards"])
    if total != split["count"]:
        return f"split {name!r} says {split['count']} items, its shards hold {total}"
    return ""


def _problem(manifest: dict) -> str:
    """What is wrong with a parsed manifest of the right format and version; '' when nothing is."""
    try:
        if not all(isinstance(c, str) for c in manifest["class_names"]):
            return "class_names must be a list of strings"
        for name, split in manifest["splits"].items():
            problem = _split_problem(name, split)
            if problem:
                return problem
    except (KeyError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def read_manifest(root: str) -> tuple[dict, str]:
    """The manifest of a shard folder and the sha256 of its bytes; DataError naming it when it is not one."""
    data = fetch_small(root, MANIFEST)
    where = f"{root}/{MANIFEST}"
    why = ""
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    except RecursionError:
        manifest, why = None, " (nested too deeply)"
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: not a JSON object{why}; {ANEW}")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}; is data.root a folder "
                        f"written by `imgcls-data shard`?")
    if manifest.get("version") != VERSION:
        raise DataError(f"{where}: version {manifest.get('version')!r}; this imgcls reads version {VERSION}: use "
                        f"the imgcls that wrote it, or write the shards anew")
    problem = _problem(manifest)
    if problem:
        raise DataError(f"{where}: malformed ({problem}); {ANEW}")
    return manifest, hashlib.sha256(data).hexdigest()


def read_labels(root: str, split: str, entry: dict, classes: int) -> np.ndarray:
    """The labels of a split ([count], the file's integer dtype) from its `<split>.labels.npy`, checked against the
    manifest."""
    name, want, count = labels_file(split), entry["labels"], entry["count"]
    where = f"{root}/{name}"
    data = fetch_small(root, name, want["bytes"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != want["sha256"]:
        raise DataError(f"{where}: sha256 {digest}, but manifest.json says {want['sha256']}: the labels changed "
                        f"after the shards were written; {ANEW}")
    f = io.BytesIO(data)
    try:
        read_header = HEADER_READERS.get(np.lib.format.read_magic(f))
        if read_header is None:
            raise ValueError("a numpy file format version other than 1.0 or 2.0")
        shape, fortran, dtype = read_header(f, max_header_size=10_000)  # never an object dtype: not pickled
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{where}: not a numpy array file ({e}); {ANEW}") from None
    if shape != (count,) or dtype.kind not in "iu" or fortran:
        raise DataError(f"{where}: {dtype} {shape}, manifest.json says {count} integer labels; {ANEW}")
    if len(data) - f.tell() != count * dtype.itemsize:
        raise DataError(f"{where}: {len(data) - f.tell()} bytes of labels, {count} {dtype} labels need "
                        f"{count * dtype.itemsize}; {ANEW}")
    labels = np.frombuffer(data, dtype, count, f.tell())
    if count and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{where}: labels outside 0..{classes - 1} (manifest.json names {classes} classes)")
    return labels
