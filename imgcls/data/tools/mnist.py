"""MNIST IDX files -> OUT/{train,val,test}/<digit>/<index>.png, the classic 55,000 / 5,000 / 10,000 split.

    imgcls-data mnist IDX_DIR OUT [--format png|jpg] [--lists] [--separator ----]

IDX_DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, each gzip'd (.gz) or not. val is the FIRST 5,000 training images (--val-size), train the
rest, test the 10,000 t10k images; a file is named for the image's index in its IDX file (00000-59999), so
each one traces back. PNG keeps the IDX bytes exactly; jpg (quality 95) is lossy. --lists also writes
OUT/{train,val,test}.txt, one `<path relative to OUT><separator><label>` a line, for data.source = "listfile".
OUT must be absent or empty: the tree is written to a temporary sibling and renamed to OUT when complete.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from imgcls.errors import DataError

PARTS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 0x0803, 0x0801  # unsigned bytes, 3 dimensions / 1 dimension
SPLITS = ("train", "val", "test")
DIGITS = 10
CHUNK = 1000  # images per pool task
SAVE = {"png": {"format": "PNG"}, "jpg": {"format": "JPEG", "quality": 95}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("idx_dir", metavar="IDX_DIR", help="folder with the four MNIST IDX files (.gz or not)")
    p.add_argument("out", metavar="OUT", help="output folder; must not exist or be empty")
    p.add_argument("--format", choices=tuple(SAVE), default="png",
                   help="png (default): lossless, pixels equal the IDX bytes; jpg: quality 95, LOSSY")
    p.add_argument("--lists", action="store_true",
                   help="also write OUT/train.txt, val.txt, test.txt: '<path><separator><label>' per line")
    p.add_argument("--separator", default="----", help="between path and label in the lists (default ----)")
    p.add_argument("--val-size", type=int, default=5000,
                   help="the first N training images form val (default 5000, the classic rule)")


# ---------------------------------------------------------------- reading
def _find(idx_dir: Path, name: str) -> Path:
    for path in (idx_dir / name, idx_dir / f"{name}.gz"):
        if path.is_file():
            return path
    raise DataError(f"{idx_dir}: {name} (or {name}.gz) not found; IDX_DIR must hold "
                    f"{', '.join(n for pair in PARTS.values() for n in pair)}, gzip'd or not")


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        return gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({e}); download it again") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array an IDX file holds, its magic number and size checked against `magic` and its header."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, shorter than an IDX header ({header} bytes); "
                        f"download it again")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} (MNIST {kind}); "
                        f"is it the right file?")
    shape = tuple(int.from_bytes(data[4 + 4 * d:8 + 4 * d], "big") for d in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected or 0 in shape:
        raise DataError(f"{path}: header says {' x '.join(map(str, shape))} = {expected} bytes with the header, "
                        f"the file has {len(data)}; it is truncated or damaged: download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist(idx_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """"train" and "t10k": (images uint8 [N, H, W], labels uint8 [N]), checked against each other."""
    if not idx_dir.is_dir():
        raise DataError(f"{idx_dir}: no such folder (IDX_DIR holds the four MNIST IDX files)")
    parts = {}
    for part, (images_name, labels_name) in PARTS.items():
        images_path, labels_path = _find(idx_dir, images_name), _find(idx_dir, labels_name)
        images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                            f"they must come from the same download")
        if labels.max() >= DIGITS:
            i = int(np.argmax(labels >= DIGITS))
            raise DataError(f"{labels_path}: label {labels[i]} at index {i}; MNIST labels are digits 0-9")
        parts[part] = images, labels
    if parts["train"][0].shape[1:] != parts["t10k"][0].shape[1:]:
        raise DataError(f"{idx_dir}: train images are {parts['train'][0].shape[1:]}, t10k images "
                        f"{parts['t10k'][0].shape[1:]}; the two sets must have one image size")
    return parts


# ---------------------------------------------------------------- writing
def split_of(part: str, i: int, val_size: int) -> str:
    return "test" if part == "t10k" else "val" if i < val_size else "train"


def relative_path(split: str, label: int, i: int, fmt: str) -> str:
    return f"{split}/{label}/{i:05d}.{fmt}"


def _write_chunk(shared: tuple, chunk: tuple[str, int, int]) -> int:
    from PIL import Image

    root, parts, val_size, fmt = shared
    part, start, stop = chunk
    images, labels = parts[part]
    for i in range(start, stop):
        encoded = io.BytesIO()  # PIL saving straight to a path costs twice as much for an image this small
        Image.fromarray(images[i], "L").save(encoded, **SAVE[fmt])
        (root / relative_path(split_of(part, i, val_size), int(labels[i]), i, fmt)).write_bytes(encoded.getbuffer())
    return stop - start


def write_lists(root: Path, parts: dict, val_size: int, fmt: str, separator: str) -> None:
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    for part, (_, labels) in parts.items():
        for i, label in enumerate(labels.tolist()):
            split = split_of(part, i, val_size)
            lines[split].append(f"{relative_path(split, label, i, fmt)}{separator}{label}\n")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("".join(rows), encoding="utf-8")


def count_table(parts: dict, val_size: int) -> str:
    """Images per class and split, with totals: the original tool's table."""
    train_labels, test_labels = parts["train"][1], parts["t10k"][1]
    counts = {"train": np.bincount(train_labels[val_size:], minlength=DIGITS),
              "val": np.bincount(train_labels[:val_size], minlength=DIGITS),
              "test": np.bincount(test_labels, minlength=DIGITS)}
    counts["total"] = sum(counts.values())
    rows = [f"{'split':<6}" + "".join(f"{d:>7}" for d in range(DIGITS)) + f"{'total':>8}"]
    rows += [f"{name:<6}" + "".join(f"{c:>7}" for c in row) + f"{row.sum():>8}" for name, row in counts.items()]
    return "\n".join(rows)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"OUT {out} is a file; give a new folder name")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"OUT {out} is not empty; nothing was written. Give a new or empty folder "
                        f"(or remove {out} first)")


def _check_options(args: argparse.Namespace, n_train: int) -> None:
    sep = args.separator
    if not sep or "\n" in sep or "\r" in sep or any(c.isdigit() for c in sep):
        raise DataError(f"--separator {sep!r}: must be non-empty, on one line and without digits (labels are "
                        f"digits)")
    if not 0 < args.val_size < n_train:
        raise DataError(f"--val-size {args.val_size}: must be between 1 and {n_train - 1} (the training images)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from imgcls.data.pool import map_chunks

    out = Path(args.out)
    _check_out(out)
    parts = read_mnist(Path(args.idx_dir))
    _check_options(args, len(parts["train"][1]))
    out.parent.mkdir(parents=True, exist_ok=True)
    target = out.resolve()  # OUT may be "." or end in "/"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        for split in SPLITS:
            for d in range(DIGITS):
                (tmp / split / str(d)).mkdir(parents=True)
        chunks = [(part, start, min(start + CHUNK, len(labels)))
                  for part, (_, labels) in parts.items() for start in range(0, len(labels), CHUNK)]
        total = sum(len(labels) for _, labels in parts.values())
        with tqdm(total=total, desc=f"writing {args.format}", unit="img", file=sys.stderr, disable=None) as bar:
            for done in map_chunks(_write_chunk, (tmp, parts, args.val_size, args.format), chunks):
                bar.update(done)
        if args.lists:
            write_lists(tmp, parts, args.val_size, args.format, args.separator)
        _check_out(out)  # still absent or empty: rename over an empty folder replaces it
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(count_table(parts, args.val_size))
    kind = "PNG, lossless" if args.format == "png" else "JPEG quality 95, lossy"
    lists = f", lists {', '.join(f'{s}.txt' for s in SPLITS)}" if args.lists else ""
    print(f"wrote {total:,} images ({kind}) to {out}{lists}")
    return 0
