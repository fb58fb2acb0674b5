"""Data sources -> indexed splits: the hub (or a local hub-layout folder), an image folder, a list file.

Each source yields `Split`s: a reader that opens image i as PIL plus the integer labels, and the class names.
Folders are indexed with os.scandir (see design.md: the `datasets` imagefolder builder is 500x slower to
first batch); the hub and parquet go through `datasets`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from .recipe import DataConfig

VAL_NAMES = ("val", "validation", "valid")
TEST_NAMES = ("test",)


class DataError(ValueError):
    """A data problem the user must fix; the message names the file, folder or key."""


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


@dataclass
class Split:
    """`open(i)` returns the PIL image of item i; `describe(i)` names it in errors (a path or a row)."""

    name: str
    labels: list[int]
    open: Callable[[int], Image.Image]
    describe: Callable[[int], str]
    indices: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.indices:
            self.indices = list(range(len(self.labels)))

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, name: str, positions: Sequence[int]) -> "Split":
        return Split(name, self.labels, self.open, self.describe, [self.indices[p] for p in positions])

    def label(self, k: int) -> int:
        return self.labels[self.indices[k]]


def _file_split(name: str, paths: list[str], labels: list[int]) -> Split:
    def open_file(i: int) -> Image.Image:
        with Image.open(paths[i]) as im:
            im.load()
            return im
    return Split(name, labels, open_file, lambda i: paths[i])


# ---------------------------------------------------------------- hub / local hub layout
def _hub_unreachable(cfg: DataConfig, err: Exception) -> DataError:
    return DataError(
        f"data.dataset = {cfg.dataset!r}: could not load it from the Hugging Face hub and it is not in the local "
        f"cache ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). If this machine is "
        f"offline, point the recipe at a local copy: a folder in hub layout (parquet files + README.md), e.g. "
        f"`data.dataset=\"/data/mnist\"`; or an image folder with `data.source=\"folder\" data.root=\"/data/imgs\"`; "
        f"or run once where the hub is reachable so the dataset is cached, then use HF_HUB_OFFLINE=1."
    )


def load_hub(cfg: DataConfig) -> tuple[dict, list[str]]:
    """Splits of a hub dataset or local hub-layout folder, plus class names from its ClassLabel."""
    import datasets

    local = Path(cfg.dataset).expanduser()
    looks_local = cfg.dataset.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise DataError(f"data.dataset = {cfg.dataset!r}: no such folder")
    kwargs = {"name": cfg.config or None, "revision": cfg.revision or None}
    try:
        dsd = datasets.load_dataset(str(local) if looks_local else cfg.dataset, **kwargs)
    except (ConnectionError, TimeoutError) as e:
        raise _hub_unreachable(cfg, e) from None
    except Exception as e:  # datasets wraps network failures in several types; name them all the same way
        text = str(e)
        if "Couldn't reach" in text or "offline" in text.lower() or "ConnectTimeout" in text or "resolve" in text:
            raise _hub_unreachable(cfg, e) from None
        raise DataError(f"data.dataset = {cfg.dataset!r}: {type(e).__name__}: {text}") from None
    first = next(iter(dsd.values()))
    image_col, label_col = _hub_columns(cfg, first.features)
    names = _hub_class_names(first, label_col)
    splits = {}
    for split_name, ds in dsd.items():
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        splits[split_name] = _hub_split(split_name, ds, image_col, label_col, cfg.dataset)
    return splits, names


def _hub_columns(cfg: DataConfig, features) -> tuple[str, str]:
    import datasets

    cols = list(features)
    image_col = cfg.image_column or next((c for c in cols if isinstance(features[c], datasets.Image)), "")
    label_col = cfg.label_column or next((c for c in cols if isinstance(features[c], datasets.ClassLabel)), "")
    label_col = label_col or next((c for c in ("label", "labels", "target") if c in cols), "")
    for key, col in (("image_column", image_col), ("label_column", label_col)):
        if not col or col not in cols:
            raise DataError(f"data.{key}: {f'{col!r} not found' if col else 'no column found'} in {cfg.dataset!r}; "
                            f"its columns are {cols}. "
                            f"Set data.{key} = \"<column>\".")
    return image_col, label_col


def _hub_class_names(ds, label_col: str) -> list[str]:
    import datasets

    feature = ds.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(max(ds[label_col]) + 1)]


def _hub_split(name: str, ds, image_col: str, label_col: str, dataset: str) -> Split:
    labels = [int(v) for v in ds[label_col]]
    column = ds.with_format(None)

    def open_row(i: int) -> Image.Image:
        cell = column[i][image_col]
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
        with Image.open(source) as im:
            im.load()
            return im
    return Split(name, labels, open_row, lambda i: f"{dataset} [{name}] row {i}")


# ---------------------------------------------------------------- image folder
def _scan_classes(folder: Path, exts: set[str]) -> dict[str, list[str]]:
    classes = {}
    with os.scandir(folder) as it:
        class_dirs = sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
    for entry in class_dirs:
        files = []
        for dirpath, _, names in os.walk(entry.path):
            files += [os.path.join(dirpath, n) for n in names if os.path.splitext(n)[1].lower() in exts]
        if not files:
            raise DataError(f"{entry.path}: class folder has no images ({', '.join(sorted(exts)[:6])}, ...); "
                            f"add images or remove the folder")
        classes[entry.name] = sorted(files)
    if not classes:
        raise DataError(f"{folder}: no class folders found; expected {folder}/<class>/<image files>")
    return classes


def load_folder(cfg: DataConfig) -> tuple[dict, list[str]]:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root = {cfg.root!r}: no such folder")
    exts = image_extensions()
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train_dir = subdirs.get(cfg.train_split.lower()) or subdirs.get("train")
    if train_dir is None:  # one folder of classes; val is carved from it
        found = {cfg.train_split: _scan_classes(root, exts)}
    else:
        found = {cfg.train_split: _scan_classes(train_dir, exts)}
        for split, names in (("val", VAL_NAMES), ("test", TEST_NAMES)):
            d = next((subdirs[n] for n in names if n in subdirs), None)
            if d is not None:
                found[split] = _scan_classes(d, exts)
    class_names = list(found[cfg.train_split])
    splits = {}
    for split, classes in found.items():
        unknown = set(classes) - set(class_names)
        if unknown:
            raise DataError(f"{root}/{split}: classes {sorted(unknown)} are not in the train split "
                            f"(train has {class_names})")
        paths = [p for c in class_names for p in classes.get(c, [])]
        labels = [i for i, c in enumerate(class_names) for _ in classes.get(c, [])]
        splits[split] = _file_split(split, paths, labels)
    return splits, class_names


# ---------------------------------------------------------------- list file
def _read_list(list_path: Path, root: Path, sep: str) -> list[tuple[str, str, int]]:
    if not list_path.is_file():
        raise DataError(f"list file {list_path}: not found")
    rows = []
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
        rows.append((str(full), label.strip(), n))
    if not rows:
        raise DataError(f"list file {list_path}: no entries")
    return rows


def _list_class_names(cfg: DataConfig, rows: list[tuple[str, str, int]]) -> list[str]:
    if cfg.class_names:
        return list(cfg.class_names)
    labels = [label for _, label, _ in rows]
    if all(lb.isdigit() for lb in labels):
        return [str(i) for i in range(max(int(lb) for lb in labels) + 1)]
    return sorted(set(labels))


def _label_index(label: str, names: list[str], where: str) -> int:
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < len(names):
        return int(label)
    raise DataError(f"{where}: label {label!r} is not a known class (classes: {names[:20]}"
                    f"{' ...' if len(names) > 20 else ''}); fix the line or set data.class_names")


def load_listfile(cfg: DataConfig) -> tuple[dict, list[str]]:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root = {cfg.root!r}: no such folder")
    lists = {"train": cfg.train_list, "val": cfg.val_list, "test": cfg.test_list}
    rows = {s: _read_list(root / f if not Path(f).is_absolute() else Path(f), root, cfg.separator)
            for s, f in lists.items() if f}
    names = _list_class_names(cfg, rows["train"])
    splits = {}
    for split, entries in rows.items():
        list_path = lists[split]
        labels = [_label_index(lb, names, f"{list_path}:{n}") for _, lb, n in entries]
        splits[split if split != "train" else cfg.train_split] = _file_split(split, [p for p, _, _ in entries],
                                                                            labels)
    return splits, names


LOADERS = {"hub": load_hub, "folder": load_folder, "listfile": load_listfile}
