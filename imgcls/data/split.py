"""`Split`: the images of one split as integer labels plus a reader; and `DataError`.

A reader is a small object with `open(i)` (the PIL image of item i, upright), `describe(i)` (a path or a row,
for messages) and `check(i)` (decode cheaply; raise one of `images.BAD_IMAGE_ERRORS` if item i is broken).
Readers hold plain data (paths, a `datasets.Dataset`, arrays), never closures, so a Split pickles: DataLoader
workers started by spawn (macOS, Windows) or forkserver (Python 3.14's Linux default) receive it by pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from PIL import Image


class Reader(Protocol):
    def open(self, i: int, draft: tuple[int, int] | None = None) -> Image.Image: ...

    def describe(self, i: int) -> str: ...

    def check(self, i: int) -> None: ...


@dataclass
class Split:
    """Items `indices` of a reader, with `labels[i]` the class index of item i."""

    name: str
    labels: list[int]
    reader: Reader
    indices: list[int] | None = None  # None: all items; [] is an empty split

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = list(range(len(self.labels)))

    def __len__(self) -> int:
        return len(self.indices)

    def open(self, i: int, draft: tuple[int, int] | None = None) -> Image.Image:
        """Item i, upright; `draft` (width, height) lets a large JPEG decode at a reduced scale (see
        `images.open_image`)."""
        return self.reader.open(i, draft)

    def describe(self, i: int) -> str:
        return self.reader.describe(i)

    def subset(self, name: str, positions: Sequence[int]) -> "Split":
        return Split(name, self.labels, self.reader, [self.indices[p] for p in positions])

    def label(self, k: int) -> int:
        return self.labels[self.indices[k]]
