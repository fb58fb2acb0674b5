"""Class names read from or written into a model file are untrusted input: they become folder names.

`imgcls-predict --sort-into DIR` copies each image into `DIR/<class name>/`, so a class name such as
`../../x` in an artifact's config.json or an ONNX file's metadata would write outside DIR. Every place that
reads or writes class names (`checkpoint.save_artifact`, `checkpoint.read_artifact_config`,
`predict.from_metadata`) checks them here. Torch-free: the ONNX path of imgcls-predict imports it.

    check_class_names(config["class_names"], "runs/x/model/best/config.json")   # -> the names, or ClassNameError
"""
from __future__ import annotations

import unicodedata
from pathlib import PureWindowsPath

RULE = ("class names become folder names (imgcls-predict --sort-into DIR makes DIR/<class name>/), so a class "
        "name must not be empty, '.' or '..', and must not hold '/', '\\', a drive letter or control characters")


class ClassNameError(ValueError):
    """A class name that cannot safely be a folder name."""


def name_problem(name) -> str | None:
    """Why `name` cannot be a folder name inside another folder, or None when it can."""
    if not isinstance(name, str):
        return "is not a string"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a reference to a folder, not a name"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if PureWindowsPath(name).drive:  # "C:x" is relative to drive C's working folder, not to DIR
        return "starts with a drive letter (an absolute path on Windows)"
    control = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"contains the control character U+{ord(control):04X}"
    return None


def check_class_names(names, source: str) -> list[str]:
    """`names` as a list if every one is a safe folder name; else ClassNameError naming `source` and the name."""
    if not isinstance(names, (list, tuple)) or not names:
        raise ClassNameError(f"{source}: class_names must be a non-empty list of strings, found {names!r}")
    for name in names:
        problem = name_problem(name)
        if problem:
            raise ClassNameError(f"{source}: class name {name!r} {problem}; {RULE}")
    return list(names)
