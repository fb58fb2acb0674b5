"""Data sources -> indexed splits: the hub (or a local hub-layout folder), an image folder, a list file.

`SOURCES[cfg.source](cfg)` returns an `Indexed`: the source's own splits (integer labels plus a reader), the
class names, where each class first appears (for the class check in `labels.py`) and the class folders that
hold no image (for the image check in `scan.py`). Indexing reads no pixels. Folders are indexed with
os.scandir (see design.md: the `datasets` imagefolder builder is 500x slower to first batch); the hub and
parquet go through `datasets` (`hub.py`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from imgcls.data.images import check_image, open_image
from imgcls.data.labels import Entry, assign_labels, first_appearances, list_class_names
from imgcls.data.index_cache import cached_scan
from imgcls.recipe import DataConfig
from imgcls.data.split import Split
from imgcls.errors import DataError

__all__ = ["DataError", "Split", "Indexed", "FileImages", "SOURCES", "LOADERS", "VAL_NAMES", "TEST_NAMES"]

VAL_NAMES = ("val", "validation", "valid")
TEST_NAMES = ("test",)


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


@dataclass
class Indexed:
    """What a source holds, before any pixel is read."""

    splits: dict[str, Split]
    class_names: list[str]
    first_seen: dict[str, str] | None = None  # class -> where it first appears; None: the dataset's own classes
    empty_folders: list[str] = field(default_factory=list)


class FileImages:
    """Images stored as files: item i is `paths[i]`."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def open(self, i: int, draft: tuple[int, int] | None = None) -> Image.Image:
        return open_image(self.paths[i], draft)

    def describe(self, i: int) -> str:
        return self.paths[i]

    def check(self, i: int) -> None:
        check_image(self.paths[i])

    def raw(self, i: int) -> bytes:
        return Path(self.paths[i]).read_bytes()


# ---------------------------------------------------------------- image folder
def empty_folder_message(path: str) -> str:
    return (f"{path}: class folder has no images ({', '.join(sorted(image_extensions())[:6])}, ...); "
            f"add images or remove the folder")


def _scan_classes(folder: Path, exts: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Class folder name -> its image files (sorted), and the class folders that hold no image."""
    with os.scandir(folder) as it:
        class_dirs = sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    classes, empty = {}, []
    for entry in class_dirs:
        files = []
        for dirpath, _, names in os.walk(entry.path):
            files += [os.path.join(dirpath, n) for n in names if os.path.splitext(n)[1].lower() in exts]
        if files:
            classes[entry.name] = sorted(files)
        else:
            empty.append(entry.path)
    if not classes:
        held = f"its class folders {[Path(p).name for p in empty]} hold no image" if empty else "no class folders found"
        raise DataError(f"{folder}: {held}; expected {folder}/<class>/<image files>")
    return classes, empty


def _split_dirs(root: Path, cfg: DataConfig) -> dict[str, Path]:
    """Split name -> folder: root/train (+ val/validation/valid, test) or, without a train folder, root itself."""
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train_dir = subdirs.get(cfg.train_split.lower()) or subdirs.get("train")
    if train_dir is None:  # one folder of classes; val is carved from it
        return {cfg.train_split: root}
    dirs = {cfg.train_split: train_dir}
    for split, names in (("val", VAL_NAMES), ("test", TEST_NAMES)):
        d = next((subdirs[n] for n in names if n in subdirs), None)
        if d is not None:
            dirs[split] = d
    return dirs


def index_folder(cfg: DataConfig) -> Indexed:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root = {cfg.root!r}: no such folder")
    exts = image_extensions()
    dirs = _split_dirs(root, cfg)
    found = {split: cached_scan(d, exts, _scan_classes, cfg.cache_dir) for split, d in dirs.items()}
    class_names = list(found[cfg.train_split][0])
    splits, first_seen, empty = {}, {}, []
    for split, (classes, no_images) in found.items():
        unknown = set(classes) - set(class_names)
        if unknown:
            raise DataError(f"{root}/{split}: classes {sorted(unknown)} are not in the train split "
                            f"(train has {class_names})")
        paths = [p for c in class_names for p in classes.get(c, [])]
        labels = [i for i, c in enumerate(class_names) for _ in classes.get(c, [])]
        splits[split] = Split(split, labels, FileImages(paths))
        for c in classes:
            first_seen.setdefault(c, str(dirs[split] / c))
        empty += no_images
    return Indexed(splits, class_names, first_seen, empty)


# ---------------------------------------------------------------- list file
def _read_list(list_path: Path, root: Path, sep: str) -> list[Entry]:
    if not list_path.is_file():
        raise DataError(f"list file {list_path}: not found")
    entries = []
    for n, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, found, label = line.rstrip().rpartition(sep) if sep.strip() else line.strip().rpartition(sep)
        if not found or not path:
            raise DataError(f"{list_path}:{n}: expected '<path>{sep}<label>', got {line!r} "
                            f"(data.separator = {sep!r})")
        full = root / path.strip()
        if not full.is_file():
            raise DataError(f"{list_path}:{n}: image {full} does not exist")
        entries.append(Entry(str(full), label.strip(), f"{list_path}:{n}"))
    if not entries:
        raise DataError(f"list file {list_path}: no entries")
    return entries


def index_listfile(cfg: DataConfig) -> Indexed:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root = {cfg.root!r}: no such folder")
    lists = {"train": cfg.train_list, "val": cfg.val_list, "test": cfg.test_list}
    entries = {split: _read_list(root / f if not Path(f).is_absolute() else Path(f), root, cfg.separator)
               for split, f in lists.items() if f}
    names = list_class_names(cfg, entries)
    splits = {}
    for split, rows in entries.items():
        labels = assign_labels(rows, names, cfg.labels_are_indices)
        splits[cfg.train_split if split == "train" else split] = Split(split, labels,
                                                                        FileImages([e.path for e in rows]))
    return Indexed(splits, names, first_appearances(entries, names, cfg.labels_are_indices))


def index_hub(cfg: DataConfig) -> Indexed:
    from imgcls.data.hub import load_hub

    splits, names = load_hub(cfg)
    return Indexed(splits, names)


def index_shards(cfg: DataConfig) -> Indexed:
    from imgcls.data.shards import load_shards

    splits, names = load_shards(cfg)
    return Indexed(splits, names)


SOURCES = {"hub": index_hub, "folder": index_folder, "listfile": index_listfile, "shards": index_shards}


def _without_empty_folders(index):
    def load(cfg: DataConfig) -> tuple[dict, list[str]]:
        found = index(cfg)
        if found.empty_folders:
            raise DataError(empty_folder_message(found.empty_folders[0]))
        return found.splits, found.class_names
    return load


# (splits, class names) with an empty class folder as an error: for callers that read one folder as it is
# (imgcls-eval --data FOLDER); training goes through SOURCES and the image check.
LOADERS = {name: _without_empty_folders(index) for name, index in SOURCES.items()}
