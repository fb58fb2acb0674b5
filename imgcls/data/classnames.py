"""Class names: data that becomes folder names, so never trusted as a path.

Class names come from the user's labels and folders, from hub datasets (Fashion-MNIST has `T - shirt / top`),
and from model files (an artifact's config.json, an ONNX file's metadata), which may come from anyone. A name is
refused only when it cannot be a label at all: not a string, empty, holding control characters, or listed twice.
Where a name becomes a folder (`imgcls-predict --sort-into DIR` copies into `DIR/<folder>/`), `folder_name`
renders it as one safe path component (separators and drive colons become `_`; `.`, `..` and Windows device
names get a `_` prefix, a trailing dot or space a `_` suffix), `folder_names` refuses two names that would share
a folder (folded for case and Unicode form) and names too long for a file system, and
`imgcls.inference.sortinto` still checks every target and copies without following links.
Torch-free: the ONNX path of imgcls-predict imports it.

    check_class_names(config["class_names"], "runs/x/model/best/config.json")   # -> the names, or ClassNameError
    folder_name("T - shirt / top")                                               # -> "T - shirt _ top"
"""
from __future__ import annotations

import os
import unicodedata
from imgcls.errors import ClassNameError

RULE = "a class name must be a non-empty string without control characters"
UNSAFE_IN_FOLDER = ("/", "\\", ":")
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{port}{i}" for port in ("COM", "LPT") for i in range(1, 10))}
NAME_MAX = 255  # bytes in one path component (ext4, APFS, NTFS in UTF-16 units)


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
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        problem = name_problem(name)
        if problem:
            raise ClassNameError(f"{source}: class name {name!r} {problem}; {RULE}")
        if name in seen:
            raise ClassNameError(f"{source}: class name {name!r} is listed twice (positions {seen[name]} and {i}); "
                                 f"each class needs its own name")
        seen[name] = i
    return list(names)


def folder_name(name: str) -> str:
    """`name` as one path component that stays inside its parent folder, and means itself, on POSIX and Windows:
    separators and drive colons become `_`; `.`, `..` and Windows' device names (`CON`, `nul.txt`, `COM1`) get a
    `_` prefix; a trailing dot or space, which Windows drops, gets a `_` suffix."""
    safe = "".join("_" if c in UNSAFE_IN_FOLDER else c for c in name)
    if safe in (".", "..") or safe.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        safe = f"_{safe}"
    return f"{safe}_" if safe.endswith((".", " ")) else safe


def folded(folder: str) -> str:
    """The folder name as case-insensitive, normalisation-insensitive file systems (macOS, Windows) compare it."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", folder).casefold())


def folder_names(names: list[str]) -> dict[str, str]:
    """name -> folder for every name; ClassNameError when a folder name is too long for a file system, or when
    two names would share a folder (compared as `folded`: "Cat" and "cat" are one folder on macOS)."""
    folders: dict[str, str] = {}
    for name in names:
        folder = folder_name(name)
        size = len(os.fsencode(folder))
        if size > NAME_MAX:
            raise ClassNameError(f"class name {name[:40]!r}... is {size} bytes as a folder name; file systems allow "
                                 f"{NAME_MAX}: shorten the model's class names (its config.json or ONNX metadata)")
        other = next((n for n, f in folders.items() if folded(f) == folded(folder)), None)
        if other is not None:
            why = "" if folders[other] == folder else \
                " (names that differ only in case or Unicode form are one folder on macOS and Windows)"
            raise ClassNameError(f"class names {other!r} and {name!r} would both be sorted into the folder "
                                 f"{folder!r}{why}; rename one of them")
        folders[name] = folder
    return folders
