"""What `imgcls-data check` finds: every problem a training run would hit on a dataset, gathered at once.

    report = build_report(cfg)       # cfg: a DataConfig (see target.py); DataError if the source cannot be indexed
    report.fatal()                   # why imgcls-train would stop on this data; [] when it would start
    report.warnings()                # what deserves a look but does not stop a run
    report.to_json()                 # everything: each problem, each duplicate group, all counts

The splits are the ones a training run uses (`data.build_splits`): the source's train/val/test, val carved from
train when the source has none. The rules are the run's own: `labels.rare_classes` on the source's splits,
`scan.find_unreadable` for broken images (cached under data.cache_dir, so the run that follows reads the result
instead of decoding again). One more pass, in forked processes (`pool.map_chunks`), reads each readable image's
bytes once for their sha256 (exact duplicates, within a split and across splits) and its header's size (no
decode). Counts are of readable images: the ones a run with data.on_bad_image = "skip" trains on.
"""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import asdict, dataclass, field

from PIL import Image
from tqdm.auto import tqdm

from imgcls.data.classnames import check_class_names
from imgcls.errors import ClassNameError, DataError
from imgcls.data.loaders import carve_val, pick_split
from imgcls.data.hub import streaming_refusal
from imgcls.data.images import BAD_IMAGE_ERRORS, set_max_image_pixels
from imgcls.data.labels import MIN_IMAGES_PER_CLASS, rare_classes
from imgcls.data.pool import map_chunks
from imgcls.recipe import DataConfig
from imgcls.data.scan import CHUNK, find_unreadable
from imgcls.data.sources import SOURCES, TEST_NAMES, VAL_NAMES
from imgcls.data.split import Split
from imgcls.data.store import working_size
from imgcls.data.transforms import Preprocess

UPSCALE_LIMIT = 2      # shorter side below 1/2 of the working size's: the run upscales it more than 2x
DOWNSCALE_LIMIT = 8    # shorter side above 8x the working size's: decoded at great cost, then thrown away
IMBALANCE_LIMIT = 10   # largest / smallest class above this in a split is worth a warning


@dataclass
class Item:
    """One image: its split, where it is (a path, or "<dataset> [<split>] row <i>") and its class."""

    split: str
    image: str
    label: str


@dataclass
class Unreadable(Item):
    error: str


@dataclass
class Sized(Item):
    width: int
    height: int


@dataclass
class DuplicateGroup:
    sha256: str
    images: list[Item]

    @property
    def across_splits(self) -> bool:
        return len({item.split for item in self.images}) > 1


@dataclass
class SplitCounts:
    """Readable images per class of one split, in class order."""

    name: str
    counts: dict[str, int]
    unreadable: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def extremes(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(class, images) of the largest and of the smallest class (the first one on ties)."""
        return max(self.counts.items(), key=lambda kv: kv[1]), min(self.counts.items(), key=lambda kv: kv[1])

    @property
    def imbalance(self) -> float | None:
        """Largest class / smallest class; None when a class has no image here (or the split has none)."""
        (_, most), (_, least) = self.extremes()
        return most / least if least else None

    def to_json(self) -> dict:
        (big, n_big), (small, n_small) = self.extremes()
        return {"images": self.total, "unreadable": self.unreadable, "counts": self.counts,
                "largest": {"class": big, "images": n_big}, "smallest": {"class": small, "images": n_small},
                "imbalance": self.imbalance}


def plural(n: int, word: str, words: str = "") -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


@dataclass
class Report:
    source: str                       # data.source
    location: str                     # its data.dataset (hub) or data.root
    on_bad_image: str
    allow_rare_classes: bool
    class_names: list[str]
    splits: list[SplitCounts]
    working_size: tuple[int, int]     # (H, W) of the stored train images
    val_carved: bool = False
    unreadable: list[Unreadable] = field(default_factory=list)
    empty_folders: list[str] = field(default_factory=list)
    rare: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> images per source split
    first_seen: dict[str, str] = field(default_factory=dict)
    unusable_splits: dict[str, str] = field(default_factory=dict)  # split -> why a run cannot use it
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    too_small: list[Sized] = field(default_factory=list)
    too_large: list[Sized] = field(default_factory=list)

    @property
    def size_limits(self) -> tuple[float, int]:
        """Shorter sides below the first or above the second are far from the working size."""
        side = min(self.working_size)
        return side / UPSCALE_LIMIT, side * DOWNSCALE_LIMIT

    def duplicate_groups(self, across: bool) -> list[DuplicateGroup]:
        return [g for g in self.duplicates if g.across_splits == across]

    def fatal(self) -> list[str]:
        """Why imgcls-train would stop on this data, one short reason each."""
        out = []
        if self.unreadable and self.on_bad_image == "error":
            out.append(f'{plural(len(self.unreadable), "unreadable image")} (data.on_bad_image = "error")')
        if self.empty_folders and self.on_bad_image == "error":
            out.append(f'{plural(len(self.empty_folders), "class folder")} without images '
                       f'(data.on_bad_image = "error")')
        if self.rare and not self.allow_rare_classes:
            out.append(f"{plural(len(self.rare), 'rare class', 'rare classes')} (data.allow_rare_classes = false)")
        out += [f"no usable {split} split" for split in self.unusable_splits]
        return out

    def warnings(self) -> list[str]:
        """What a run survives but a user should look at."""
        out = []
        if self.unreadable and self.on_bad_image == "skip":
            out.append(f'{plural(len(self.unreadable), "unreadable image")} left out (data.on_bad_image = "skip")')
        if self.empty_folders and self.on_bad_image == "skip":
            out.append(f"{plural(len(self.empty_folders), 'class folder')} without images left out")
        if self.rare and self.allow_rare_classes:
            out.append(f"{plural(len(self.rare), 'rare class', 'rare classes')} (data.allow_rare_classes = true)")
        for across, where in ((True, "across splits"), (False, "within a split")):
            if groups := self.duplicate_groups(across):
                out.append(f"{plural(len(groups), 'duplicate group')} {where}")
        for s in self.splits:
            missing = sum(1 for n in s.counts.values() if n == 0)
            if s.name not in self.unusable_splits and missing:
                out.append(f"{s.name} has no image of {plural(missing, 'class', 'classes')}")
            elif s.imbalance is not None and s.imbalance > IMBALANCE_LIMIT:
                out.append(f"{s.name} imbalance {s.imbalance:.1f}x")
        if self.too_small:
            out.append(f"{plural(len(self.too_small), 'image')} far below the working size")
        if self.too_large:
            out.append(f"{plural(len(self.too_large), 'image')} far above the working size")
        return out

    @property
    def exit_status(self) -> int:
        return 1 if self.fatal() else 0

    def to_json(self) -> dict:
        below, above = self.size_limits
        return {
            "data": {"source": self.source, "location": self.location, "on_bad_image": self.on_bad_image,
                     "allow_rare_classes": self.allow_rare_classes},
            "class_names": self.class_names,
            "splits": {s.name: s.to_json() for s in self.splits},
            "val_carved": self.val_carved,
            "unreadable": [asdict(u) for u in self.unreadable],
            "empty_folders": self.empty_folders,
            "rare_classes": [{"class": c, "images": n, "first_seen": self.first_seen.get(c)}
                             for c, n in self.rare.items()],
            "min_images_per_class": MIN_IMAGES_PER_CLASS,
            "unusable_splits": self.unusable_splits,
            "duplicates": {key: [{"sha256": g.sha256, "images": [asdict(i) for i in g.images]}
                                 for g in self.duplicate_groups(across)]
                           for key, across in (("across_splits", True), ("within_split", False))},
            "sizes": {"working_size": list(self.working_size), "shorter_side_below": below,
                      "shorter_side_above": above, "too_small": [asdict(s) for s in self.too_small],
                      "too_large": [asdict(s) for s in self.too_large]},
            "fatal": self.fatal(),
            "warnings": self.warnings(),
            "exit_status": self.exit_status,
        }


# ---------------------------------------------------------------- gathering
def _used_splits(splits: dict[str, Split], cfg: DataConfig) -> tuple[dict[str, Split], dict[str, str]]:
    """The splits a training run uses, by role (train, val, test), and why a role has none ({"val": ...})."""
    train = splits[cfg.train_split]
    val = pick_split(splits, cfg.val_split, VAL_NAMES, "val_split")
    test = pick_split(splits, cfg.test_split, TEST_NAMES, "test_split")
    unusable = {}
    if val is None:
        try:
            train, val = carve_val(train, cfg)
        except DataError as e:
            unusable["val"] = str(e)
    return {"train": train, **({"val": val} if val else {}), **({"test": test} if test else {})}, unusable


def _read_items(splits: list[Split], job: tuple[int, list[int]]) -> list[tuple[int, str, int, int]]:
    """(item, sha256 of its encoded bytes, width, height) of each item of the job, from one read of its bytes
    and its header (no decode). Items that fail to read are left out: the image check names them."""
    split, out = splits[job[0]], []
    for i in job[1]:
        try:
            data = split.reader.raw(i)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except BAD_IMAGE_ERRORS:
            continue
        out.append((i, hashlib.sha256(data).hexdigest(), width, height))
    return out


def _hash_and_measure(report: Report, unique: dict[str, Split], bad: dict[str, set[int]]) -> None:
    """Fill report.duplicates, too_small and too_large from one pass over the bytes of every readable image."""
    named = list(unique.items())
    jobs = []
    for k, (name, split) in enumerate(named):
        readable = [i for i in split.indices if i not in bad[name]]
        jobs += [(k, readable[s:s + CHUNK]) for s in range(0, len(readable), CHUNK)]
    below, above = report.size_limits
    groups: dict[str, list[Item]] = {}
    results = map_chunks(_read_items, [split for _, split in named], jobs)
    for (k, _), rows in tqdm(zip(jobs, results), total=len(jobs), desc="hashing images", unit="chunk",
                             disable=None, leave=False):
        name, split = named[k]
        for i, digest, width, height in rows:
            item = Item(name, split.describe(i), report.class_names[split.labels[i]])
            groups.setdefault(digest, []).append(item)
            if min(width, height) < below:
                report.too_small.append(Sized(**asdict(item), width=width, height=height))
            elif min(width, height) > above:
                report.too_large.append(Sized(**asdict(item), width=width, height=height))
    report.duplicates = [DuplicateGroup(digest, items) for digest, items in groups.items() if len(items) > 1]


def _count(used: dict[str, Split], owner: dict[str, str], bad: dict[str, set[int]], names: list[str],
           unusable: dict[str, str]) -> list[SplitCounts]:
    """Readable images per class of each used split; a split without one joins `unusable`."""
    counts = []
    for name, split in used.items():
        per_class = Counter(split.labels[i] for i in split.indices if i not in bad[owner[name]])
        counts.append(SplitCounts(name, {c: per_class[k] for k, c in enumerate(names)}, len(bad[owner[name]])))
        if name not in unusable and not per_class:
            unusable[name] = "no readable image" if len(split) else "no images"
    return counts


def build_report(cfg: DataConfig) -> Report:
    """Index the source as a training run does and gather every problem; DataError only when it cannot be
    indexed at all (missing root or dataset, unknown split, a class name that cannot be a label), or when a
    run refuses the recipe before reading any data (data.streaming)."""
    if cfg.streaming:
        raise streaming_refusal(cfg)
    found = SOURCES[cfg.source](cfg)
    if cfg.train_split not in found.splits:
        raise DataError(f"data.train_split = {cfg.train_split!r}: no such split; available: {sorted(found.splits)}")
    try:
        names = check_class_names(found.class_names, f"data.source = {cfg.source!r}")
    except ClassNameError as e:
        raise DataError(str(e)) from None
    used, unusable = _used_splits(found.splits, cfg)
    owner: dict[str, str] = {}  # role -> the first role of the same split (val_split = test_split: one split)
    for name, split in used.items():
        owner[name] = next((n for n in owner if used[n] is split), name)
    unique = {name: split for name, split in used.items() if owner[name] == name}
    set_max_image_pixels(cfg.max_image_pixels)  # as imgcls-train's check: a larger image is unreadable
    bad_lists = dict(zip(unique, find_unreadable(list(unique.values()), cfg.cache_dir)))
    bad = {name: {i for i, _ in found_bad} for name, found_bad in bad_lists.items()}
    report = Report(
        source=cfg.source, location=cfg.dataset if cfg.source == "hub" else cfg.root,
        on_bad_image=cfg.on_bad_image, allow_rare_classes=cfg.allow_rare_classes, class_names=names,
        splits=_count(used, owner, bad, names, unusable), unusable_splits=unusable,
        working_size=working_size(Preprocess.from_data(cfg), "train", tuple(cfg.working_size) or None),
        val_carved=used["train"] is not found.splits[cfg.train_split], empty_folders=list(found.empty_folders),
        rare=rare_classes(names, found.splits) if found.first_seen is not None else {},
        first_seen=dict(found.first_seen or {}),
        unreadable=[Unreadable(name, unique[name].describe(i), names[unique[name].labels[i]], why)
                    for name, found_bad in bad_lists.items() for i, why in found_bad])
    _hash_and_measure(report, unique, bad)
    return report
