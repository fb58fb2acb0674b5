"""Class names: data that becomes folder names, so never trusted as a path.

Class names come from the user's labels and folders, from hub datasets (Fashion-MNIST has `T - shirt / top`),
and from model files (an artifact's config.json, an ONNX file's metadata), which may come from anyone. A name is
refused only when it cannot be a label at all: not a string, empty, or holding control characters. Where a name
becomes a folder (`imgcls-predict --sort-into DIR` copies into `DIR/<folder>/`), `folder_name` renders it as one
safe path component (separators and drive colons become `_`; `.` and `..` get a `_` prefix), `folder_names`
refuses two names that would share a folder, and `sort_into` still checks that every target resolves inside DIR.
Torch-free: the ONNX path of imgcls-predict imports it.

    check_class_names(config["class_names"], "runs/x/model/best/config.json")   # -> the names, or ClassNameError
    folder_name("T - shirt / top")                                               # -> "T - shirt _ top"
"""
from __future__ import annotations

import unicodedata

RULE = "a class name must be a non-empty string without control characters"
UNSAFE_IN_FOLDER = ("/", "\\", ":")


class ClassNameError(ValueError):
    """A class name that cannot be a label."""


def name_problem(name) -> str | None:
    """Why `name` cannot be a class name, or None when it can."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"contains the control character U+{ord(control):04X}"
    return None


def check_class_names(names, source: str) -> list[str]:
    """`names` as a list if every one can be a class name; else ClassNameError naming `source` and the name."""
    if not isinstance(names, (list, tuple)) or not names:
        raise ClassNameError(f"{source}: class_names must be a non-empty list of strings, found {names!r}")
    for name in names:
        problem = name_problem(name)
        if problem:
            raise ClassNameError(f"{source}: class name {name!r} {problem}; {RULE}")
    return list(names)


def folder_name(name: str) -> str:
    """`name` as one path component that stays inside its parent folder on POSIX and Windows."""
    safe = "".join("_" if c in UNSAFE_IN_FOLDER else c for c in name)
    return f"_{safe}" if safe in (".", "..") else safe


def folder_names(names: list[str]) -> dict[str, str]:
    """name -> folder for every name; ClassNameError when two names would share a folder."""
    folders: dict[str, str] = {}
    for name in names:
        other = next((n for n, f in folders.items() if f == folder_name(name)), None)
        if other is not None:
            raise ClassNameError(f"class names {other!r} and {name!r} would both be sorted into the folder "
                                 f"{folder_name(name)!r}; rename one of them")
        folders[name] = folder_name(name)
    return folders
