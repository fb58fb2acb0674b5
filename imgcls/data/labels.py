"""Labels -> classes, decided once for all splits, and the check that every class is a real one.

The class list is `data.class_names` when given; otherwise the labels of every split together (list file) or
the class folders of the train split (image folder). A mistyped label makes a class of its own with a handful
of images, usually in one split only: `check_classes` makes that an error naming each such class, its count per
split and where it first appears, unless `data.allow_rare_classes = true` (then a warning with the same list).

Digit labels ("101", "3070") are names like any other, sorted by number. With `data.labels_are_indices = true`
labels are 0-based indices into `data.class_names`, or into "0".."max" when no names are given.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass

from imgcls.recipe import DataConfig
from imgcls.data.split import Split
from imgcls.errors import DataError

log = logging.getLogger(__name__)

# A class with fewer images than this, all splits together, is listed as suspect: a typo, not a class.
MIN_IMAGES_PER_CLASS = 5
SHOWN_NAMES = 20
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Entry:
    """One line of a list file: the image, its label as written, and where ("list.txt:12")."""

    path: str
    label: str
    where: str


def list_class_names(cfg: DataConfig, entries: dict[str, list[Entry]]) -> list[str]:
    """The classes of a list-file dataset: data.class_names, "0".."max" for index labels, else every label of
    every split (sorted by number when all are digits)."""
    every = [e for split in entries.values() for e in split]
    if cfg.labels_are_indices:
        for e in every:
            if not _DIGITS.fullmatch(e.label):
                raise DataError(f"{e.where}: label {e.label!r} is not a class index (data.labels_are_indices = "
                                f"true: labels are 0, 1, 2, ...)")
        return list(cfg.class_names) or [str(i) for i in range(max(int(e.label) for e in every) + 1)]
    if cfg.class_names:
        return list(cfg.class_names)
    names = {e.label for e in every}
    if all(_DIGITS.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def assign_labels(entries: list[Entry], names: list[str], labels_are_indices: bool) -> list[int]:
    """The class index of each entry; a label that names no class is an error at its file:line."""
    if labels_are_indices:
        out = [int(e.label) for e in entries]
        for e, k in zip(entries, out):
            if k >= len(names):
                raise DataError(f"{e.where}: label {e.label!r} is out of range: data.class_names has {len(names)} "
                                f"classes (indices 0-{len(names) - 1})")
        return out
    index = {name: k for k, name in enumerate(names)}
    for e in entries:
        if e.label not in index:
            shown = f"{names[:SHOWN_NAMES]}{' ...' if len(names) > SHOWN_NAMES else ''}"
            hint = (", or set data.labels_are_indices = true if the labels are class indices"
                    if _DIGITS.fullmatch(e.label) else "")
            raise DataError(f"{e.where}: label {e.label!r} is not a known class (classes: {shown}); fix the line, "
                            f"or add the class to data.class_names{hint}")
    return [index[e.label] for e in entries]


def first_appearances(entries: dict[str, list[Entry]], names: list[str], labels_are_indices: bool) -> dict[str, str]:
    """Class name -> the file:line where a label first names it (splits in order train, val, test)."""
    seen: dict[str, str] = {}
    for split in entries.values():
        for e in split:
            seen.setdefault(names[int(e.label)] if labels_are_indices else e.label, e.where)
    return seen


def rare_classes(names: list[str], splits: dict[str, Split]) -> dict[str, dict[str, int]]:
    """Class -> its images per split, for each class that `check_classes` refuses: fewer than
    MIN_IMAGES_PER_CLASS images in all or, when there are several splits, images in one split only."""
    counts = {name: Counter(split.label(k) for k in range(len(split))) for name, split in splits.items()}
    rare = {}
    for c, name in enumerate(names):
        per_split = {s: counts[s][c] for s in splits}
        one_split = len(splits) > 1 and sum(1 for n in per_split.values() if n) < 2
        if sum(per_split.values()) < MIN_IMAGES_PER_CLASS or one_split:
            rare[name] = per_split
    return rare


def rare_class_line(name: str, per_split: dict[str, int], first_seen: dict[str, str]) -> str:
    where = f"first: {first_seen[name]}" if name in first_seen else "no image has this label"
    return f"  {name!r}: {', '.join(f'{s} {n}' for s, n in per_split.items())} ({where})"


def _suspects(names: list[str], splits: dict[str, Split], first_seen: dict[str, str]) -> list[str]:
    return [rare_class_line(name, per_split, first_seen) for name, per_split in rare_classes(names, splits).items()]


def check_classes(names: list[str], splits: dict[str, Split], first_seen: dict[str, str], allow: bool) -> None:
    """Every class has MIN_IMAGES_PER_CLASS images or more and, when the source has several splits, appears in
    two of them at least; else a DataError listing each suspect class (a warning with `allow`). `splits` are
    the source's own splits, before any val is carved."""
    lines = _suspects(names, splits, first_seen)
    if not lines:
        return
    n = len(lines)
    head = (f"data: {n} class{'es have' if n > 1 else ' has'} fewer than {MIN_IMAGES_PER_CLASS} images or "
            f"appear{'' if n > 1 else 's'} in one split only (a mistyped label makes such a class):")
    listing = "\n".join([head, *lines])
    if allow:
        log.warning("%s\ndata.allow_rare_classes = true: training with them.", listing)
        return
    raise DataError(f"{listing}\nFix these labels, or set data.allow_rare_classes = true to train with these "
                    f"classes.")
