"""The splits a training run would use, as Parquet shards to train from with `data.source = "shards"`.

    imgcls-data shard recipes/mnist.toml /data/mnist-shards                        # 256MB of images a shard
    imgcls-data shard photos/ /data/photo-shards --shard-size 10000 --channels 3    # 10,000 images a shard
    imgcls-data shard recipes/imagefolder_resnet18.toml data.root=/data/photos /data/photo-shards --shard-size 1GB

The splits are `imgcls.data.loaders.build_splits`' (train, then val after any carve, then test; every image checked as
for training). Train is written in an order shuffled once (`--order shuffled`, the default, from `--seed`), so
that every shard holds a sample of every class: a training epoch shuffles the shards and the items inside each
shard but never mixes shards (that keeps reads local; see `imgcls/data/shard_order.py`), and shards cut from a folder
sorted by class would give batches of one or two classes. `--order source` keeps the source's order (then a run
with data.shuffle = false sees exactly what the folder run sees). Val and test keep their order. Each image is
stored as the source's encoded bytes, never re-encoded: the shards decode to the same pixels; its `key` is where
it came from relative to the source's folder (no user names or folder layouts are published). The layout and
manifest are described in `imgcls/data/shards.py`. OUT is written as OUT.tmp-<pid> with manifest.json last, then renamed: a stopped run leaves
no OUT (a killed one may leave OUT.tmp-<pid> to remove). OUT is a local folder; publish it as it is (a web
server, or `hf upload <repo> OUT --repo-type dataset`) and point data.root at its URL.

--shard-size: a whole number is images per shard; with a unit (B, KB, MB, GB, TB, or KiB, MiB, GiB, TiB) it is
encoded bytes per shard (a shard closes before the image that would take it over; a larger image has a shard
of its own).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from imgcls.errors import DataError
from imgcls.data.tools.target import add_target_arguments, data_config_of

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class ShardSize:
    """At most `images` images, or at most `nbytes` encoded bytes, per shard (the other one is 0)."""

    images: int = 0
    nbytes: int = 0

    def full(self, images: int, nbytes: int, next_bytes: int) -> bool:
        """Whether a shard holding `images` images of `nbytes` bytes takes no further image of `next_bytes`."""
        if self.images:
            return images >= self.images
        return images > 0 and nbytes + next_bytes > self.nbytes


def parse_shard_size(text: str) -> ShardSize:
    """"10000" -> 10,000 images; "256MB" -> 256,000,000 bytes; "1.5GiB" -> 1,610,612,736 bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in UNITS) or (not unit and "." in match.group(1)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of images (10000) or a size with a "
                                          f"unit (256MB, 1GB, 512MiB)")
    number = match.group(1)
    size = ShardSize(nbytes=int(float(number) * UNITS[unit])) if unit else ShardSize(images=int(number))
    if not (size.images or size.nbytes):
        raise argparse.ArgumentTypeError(f"{text!r}: a shard must hold something")
    return size


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_arguments(p)
    p.add_argument("out", metavar="OUT", help="a new (or empty) folder for the shards and manifest.json")
    p.add_argument("--shard-size", type=parse_shard_size, default=parse_shard_size("256MB"), metavar="N|SIZE",
                   help="images per shard (10000) or encoded bytes per shard (256MB, 1GB); default 256MB")
    p.add_argument("--order", choices=("shuffled", "source"), default="shuffled",
                   help="train's order in the shards: shuffled once with --seed (default; every shard holds every "
                        "class), or the source's order")
    p.add_argument("--seed", type=int, default=0, help="the seed of --order shuffled (default 0)")


def train_order(split, order: str, seed: int):
    """The train split as written: shuffled once by a generator of `seed`, or as it is."""
    if order == "source":
        return split
    import numpy as np

    return split.subset(split.name, np.random.default_rng(seed).permutation(len(split)).tolist())


def item_bytes(reader, i: int) -> bytes:
    """The encoded bytes of item i: the reader's `raw`, or the file behind it (`paths`, sources.FileImages)."""
    raw = getattr(reader, "raw", None)
    if raw is not None:
        return raw(i)
    paths = getattr(reader, "paths", None)
    if isinstance(paths, list):
        return Path(paths[i]).read_bytes()
    raise TypeError(f"cannot read the encoded bytes of a {type(reader).__qualname__} reader")


def source_base(cfg) -> str:
    """The local folder the source's item descriptions start with: data.root, or a hub dataset's folder."""
    base = cfg.dataset if cfg.source == "hub" else cfg.root
    path = Path(base).expanduser() if base else None
    if path is None or not path.exists():
        return ""  # a hub id, or nothing local to hide
    return str(path.parent if path.is_file() else path)


def relative_key(description: str, base: str) -> str:
    """Where an item came from, without the local folders above the source: `train/a/0005.jpg` for
    `/home/me/photos/train/a/0005.jpg` with `base` /home/me/photos, `[train] row 3` for `<hub folder> [train]
    row 3`; an absolute path elsewhere keeps its file name only (user names and folder layouts stay home). A
    file name that is not UTF-8 keeps its odd bytes as backslash-x escapes (`\\xe9`) (Parquet strings are UTF-8)."""
    key = description
    if base:
        for prefix in dict.fromkeys((base, os.path.abspath(base), os.path.realpath(base))):
            if any(description.startswith(prefix + sep) for sep in ("/", " ")):
                key = description[len(prefix) + 1:]
                break
        else:
            key = os.path.basename(description) if os.path.isabs(description) else description
    elif os.path.isabs(description):
        key = os.path.basename(description)
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _file_entry(path: Path, count: int) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"file": path.name, "count": count, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_shard(path: Path, rows: list[tuple[bytes, int, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels, keys = zip(*rows)
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int32()),
                      "key": pa.array(keys, pa.string())})
    # images are compressed already, and images and keys are unique: no compression, no dictionaries
    pq.write_table(table, path, compression="none", use_dictionary=False)


def write_split(name: str, split, folder: Path, size: ShardSize, base: str = "") -> dict:
    """The shards of one split in `folder` (keys relative to `base`, see `relative_key`); its manifest entry."""
    from tqdm.auto import tqdm

    from imgcls.data.shards import shard_file

    entries: list[dict] = []
    rows: list[tuple[bytes, int, str]] = []
    nbytes = 0

    def close(rows: list[tuple[bytes, int, str]]) -> None:
        path = folder / shard_file(name, len(entries))
        _write_shard(path, rows)
        entries.append(_file_entry(path, len(rows)))

    for i in tqdm(split.indices, desc=f"sharding {name}", unit="img", disable=None, leave=False):
        data = item_bytes(split.reader, i)
        if size.full(len(rows), nbytes, len(data)):
            close(rows)
            rows, nbytes = [], 0
        rows.append((data, int(split.labels[i]), relative_key(split.describe(i), base)))
        nbytes += len(data)
    if rows:
        close(rows)
    return {"count": len(split), "shards": entries}


def _labels_array(split, classes: int):
    import numpy as np

    dtype = np.min_scalar_type(max(classes - 1, 0))
    return np.asarray([split.labels[i] for i in split.indices], dtype=dtype)


def refuse_filled(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not an empty folder; shards are written into a new or "
                        f"empty folder: choose another OUT, or remove this one")


def write_shards(splits: dict, class_names: list[str], out: Path, size: ShardSize, order: dict | None = None,
                 base: str = "") -> dict:
    """All `splits` (name -> Split, in order) as shards in `out`, atomically, keys relative to `base`; the
    manifest."""
    import numpy as np

    from imgcls.data.shard_manifest import FORMAT, MANIFEST, VERSION, file_entry, labels_file

    refuse_filled(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a stopped run whose pid this one reuses
    tmp.mkdir(parents=True)
    try:
        manifest = {"format": FORMAT, "version": VERSION, "class_names": list(class_names), "splits": {},
                    **({"train_order": order} if order else {})}
        for name, split in splits.items():
            manifest["splits"][name] = write_split(name, split, tmp, size, base)
            np.save(tmp / labels_file(name), _labels_array(split, len(class_names)))
            manifest["splits"][name]["labels"] = file_entry((tmp / labels_file(name)).read_bytes(), labels_file(name))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.rename(tmp, out)  # replaces an empty folder; fails on one filled meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def human_bytes(n: int) -> str:
    """1234 -> "1.2 kB", with the decimal units --shard-size reads."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def summary(manifest: dict) -> list[str]:
    """One line per split: images, shards, bytes, and images per shard."""
    lines = []
    for name, split in manifest["splits"].items():
        counts = [s["count"] for s in split["shards"]]
        nbytes = sum(s["bytes"] for s in split["shards"])
        per = f"{min(counts, default=0)}" + (f"-{max(counts)}" if counts and min(counts) != max(counts) else "")
        lines.append(f"{name}: {split['count']} images in {len(counts)} shard{'' if len(counts) == 1 else 's'}, "
                     f"{human_bytes(nbytes)} ({per} images a shard)")
    return lines


def run(args: argparse.Namespace) -> int:
    from imgcls.data.loaders import build_splits

    out = Path(args.out).expanduser()
    refuse_filled(out)  # before the image check, which may take minutes
    cfg = data_config_of(args)
    found = build_splits(cfg)
    splits = {"train": train_order(found.train, args.order, args.seed), "val": found.val,
              **({"test": found.test} if found.test is not None else {})}
    manifest = write_shards(splits, found.class_names, out, args.shard_size,
                            {"order": args.order, **({"seed": args.seed} if args.order == "shuffled" else {})},
                            source_base(cfg))
    for line in summary(manifest):
        print(line)
    print(f"wrote {out}: set data.source = \"shards\" and data.root = \"{out}\" (or the URL you publish it at)")
    return 0
