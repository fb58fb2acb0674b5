"""The up-front image check: every image is decoded once before training, and every problem is named at once.

`check_images` decodes each item of each split (`Reader.check`: JPEGs at 1/8 scale, see `images.check_image`)
in forked processes (`pool.map_chunks`), then lists every unreadable image and every class
folder without images: one DataError with `data.on_bad_image = "error"`; with "skip", the splits without
them and one warning with the counts. More than SHOWN problems: the message shows the first SHOWN and writes
the full list to a file whose path it gives. Measured on 2 busy cores: 5,000 CIFAR JPEGs (32 px) 0.4 s,
5,000 JPEGs of 500x375 1.3 s, the 70,000 MNIST PNG rows of the hub layout ~3.5 s. The result is kept in the
cache folder (`data.cache_dir`) under a key of the split's images (every path with its size, mtime, inode and
ctime, or the dataset's fingerprint), `data.max_image_pixels` and the checking code: a second run over unchanged
images reads it instead of decoding them again. Only what the file holds is kept: a read that failed for a
passing reason (an OSError with an errno: EACCES, EMFILE, EIO, ...) is a bad image for this run only, and a
result that holds one is not kept.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from imgcls.atomic import write_text
from imgcls.data import images
from imgcls.data.fingerprint import FORMAT_VERSION, cache_root, code_identity, source_fingerprint
from imgcls.data.images import BAD_IMAGE_ERRORS, MAX_IMAGE_PIXELS, set_max_image_pixels
from imgcls.data.pool import map_chunks
from imgcls.data.split import Split
from imgcls.errors import DataError

log = logging.getLogger(__name__)

SHOWN = 20
CHUNK = 256  # items per task: few enough tasks to keep the pool's overhead small, enough to balance threads


# errnos that say what the file is, not how the read went: kept with the result (the key holds the file's stat)
_LASTING_ERRNOS = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


def _lasting(e: BaseException) -> bool:
    """A decode error, or an OSError about the file itself; not EACCES, EMFILE, EIO and the like, which pass."""
    return not isinstance(e, OSError) or e.errno is None or e.errno in _LASTING_ERRNOS


def _check_items(splits: list[Split], job: tuple[int, list[int]]) -> list[tuple[int, str, bool]]:
    split, items = splits[job[0]], job[1]
    bad = []
    for i in items:
        try:
            split.reader.check(i)
        except BAD_IMAGE_ERRORS as e:
            bad.append((i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", _lasting(e)))
    return bad


def _result_file(split: Split, cache_dir: str) -> Path | None:
    """Where the check's result for exactly these images (paths with their stat, or the dataset's fingerprint),
    this pixel limit and this checking code is kept; None for a reader the fingerprint does not know (then the
    images are checked every run)."""
    try:
        source = source_fingerprint(split)
    except TypeError:
        return None
    key = hashlib.sha256(json.dumps({"check": source, "format": FORMAT_VERSION, "code": code_identity([images]),
                                     "max_image_pixels": images.max_image_pixels()}, sort_keys=True).encode())
    return cache_root(cache_dir) / "image-check" / f"{key.hexdigest()}.json"


def find_unreadable(splits: list[Split], cache_dir: str = "") -> list[list[tuple[int, str]]]:
    """For each split, (item, "ErrorType: message") of every item that does not decode, in the split's order.
    A split whose images did not change since they were last checked is not decoded again."""
    files = [_result_file(split, cache_dir) for split in splits]
    known = [_read_result(f) for f in files]
    found = _decode_all(splits, [k for k, seen in enumerate(known) if seen is None])
    result = []
    for k, f in enumerate(files):
        if known[k] is not None:
            result.append([(int(i), why) for i, why in known[k]])
            continue
        result.append([(i, why) for i, why, _ in found[k]])
        if f is not None and all(lasting for _, _, lasting in found[k]):
            write_text(f, json.dumps(result[-1]))  # unpredictable temp name, then rename
    return result


def _read_result(f: Path | None) -> list | None:
    """A cached result, or None (a miss) where there is none or it is empty, torn or not a list."""
    if f is None or not f.is_file():
        return None
    try:
        found = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, list) else None


def _decode_all(splits: list[Split], which: list[int]) -> list[list[tuple[int, str, bool]]]:
    """Decode every item of splits[k] for k in `which`, chunk by chunk in a process pool."""
    jobs = [(k, splits[k].indices[s:s + CHUNK]) for k in which for s in range(0, len(splits[k].indices), CHUNK)]
    found: list[list[tuple[int, str, bool]]] = [[] for _ in splits]
    results = map_chunks(_check_items, splits, jobs)
    for (k, _), bad in tqdm(zip(jobs, results), total=len(jobs), desc="checking images", unit="chunk",
                            disable=None, leave=False):
        found[k] += bad
    return found


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _listing(problems: list[str]) -> list[str]:
    lines = [f"  {p}" for p in problems[:SHOWN]]
    if len(problems) > SHOWN:
        fd, path = tempfile.mkstemp(prefix="imgcls-unreadable-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(f"{p}\n" for p in problems))
        lines.append(f"  ... and {len(problems) - SHOWN} more; all {len(problems)} are listed in {path}")
    return lines


def check_images(splits: dict[str, Split], empty_folders: list[str], on_bad_image: str,
                 cache_dir: str = "", max_image_pixels: int = MAX_IMAGE_PIXELS) -> dict[str, Split]:
    """`splits` as they are when every image decodes and no class folder is empty; otherwise one DataError
    naming every problem ("error"), or the splits without the unreadable images and a warning ("skip").
    `max_image_pixels` becomes the process's limit (`images.set_max_image_pixels`): the check and every later
    decode in this process and its forked workers refuse larger images."""
    set_max_image_pixels(max_image_pixels)
    first_names: dict[int, tuple[str, Split]] = {}
    for name, s in splits.items():  # the same split may serve twice (val_split = test_split)
        first_names.setdefault(id(s), (name, s))
    unique = list(first_names.values())
    bad = dict(zip(first_names, find_unreadable([s for _, s in unique], cache_dir)))
    problems = [f"{s.describe(i)}: {why}" for _, s in unique for i, why in bad[id(s)]]
    problems += [f"{folder}: class folder has no images" for folder in empty_folders]
    if not problems:
        return splits
    n_bad = len(problems) - len(empty_folders)
    parts = [_plural(n_bad, "unreadable image")] if n_bad else []
    parts += [f"{_plural(len(empty_folders), 'class folder')} without images"] if empty_folders else []
    if on_bad_image == "error":
        head = f'data.on_bad_image = "error": {" and ".join(parts)}:'
        raise DataError("\n".join([head, *_listing(problems),
                                   'Fix or remove them, or set data.on_bad_image = "skip" to leave them out.']))
    if n_bad:
        per_split = ", ".join(f"{name} {len(bad[id(s)])}" for name, s in unique if bad[id(s)])
        parts[0] += f" ({per_split})"
    log.warning("\n".join([f'data.on_bad_image = "skip": left out {" and ".join(parts)}:', *_listing(problems)]))
    return {name: _without(s, {i for i, _ in bad[id(s)]}) for name, s in splits.items()}


def _without(split: Split, items: set[int]) -> Split:
    if not items:
        return split
    return split.subset(split.name, [k for k, i in enumerate(split.indices) if i not in items])
