"""`imgcls-predict --sort-into DIR` with class names from a model file someone else wrote (#20.18): every target
is checked before anything is copied, a link planted after the check is never followed, and names that one file
system would merge or mangle are refused or made safe."""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest

from imgcls.inference.predict import sort_into


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "in" / "x.png"
    path.parent.mkdir()
    path.write_bytes(b"pixels")
    return str(path)


def rows(image: str, *answers: str) -> list[dict]:
    return [{"path": image, "prediction": a} for a in answers]


def test_a_class_name_too_long_for_a_folder_is_refused_before_anything_is_copied(image, tmp_path):
    dest = tmp_path / "sorted"
    long = "x" * 301
    with pytest.raises(ValueError) as info:
        sort_into(rows(image, "a", long), dest)
    assert str(info.value) == (f"--sort-into {dest}: class name {'x' * 40!r}... is 301 bytes as a folder name; file "
                               f"systems allow 255: shorten the model's class names (its config.json or ONNX "
                               f"metadata); nothing was copied")
    assert not dest.exists()


def test_a_file_where_a_class_folder_goes_is_refused_before_anything_is_copied(image, tmp_path):
    dest = tmp_path / "sorted"
    dest.mkdir()
    (dest / "b").write_bytes(b"mine")
    with pytest.raises(ValueError) as info:
        sort_into(rows(image, "a", "b"), dest)
    assert str(info.value) == (f"--sort-into {dest}: {dest / 'b'} is a file, not a folder; move it away or sort "
                               f"into another folder; nothing was copied")
    assert sorted(p.name for p in dest.iterdir()) == ["b"] and (dest / "b").read_bytes() == b"mine"


def test_a_link_planted_after_the_check_is_not_followed(image, tmp_path, monkeypatch):
    """The check passes; then, before the first folder is made, someone plants DIR/a -> elsewhere."""
    dest, elsewhere = tmp_path / "sorted", tmp_path / "elsewhere"
    elsewhere.mkdir()
    real_mkdir = Path.mkdir

    def mkdir_after_planting(self, *args, **kwargs):
        if not (dest / "a").is_symlink():
            os.makedirs(dest, exist_ok=True)
            (dest / "a").symlink_to(elsewhere)
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", mkdir_after_planting)
    with pytest.raises(ValueError) as info:
        sort_into(rows(image, "a", "b"), dest)
    assert str(info.value) == (f"--sort-into {dest}: {dest / 'a'} cannot be opened as a folder inside {dest} "
                               f"(it is a symbolic link, made after the check); nothing was copied")
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in dest.iterdir()) == ["a"]


def test_a_link_in_a_class_folder_is_never_written_through(image, tmp_path):
    """Held before #20 too (the name was claimed with O_EXCL): a dangling link inside DIR keeps its name."""
    dest = tmp_path / "sorted"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "x.png").symlink_to(dest / "a" / "later.png")
    assert sort_into(rows(image, "a"), dest) == 1
    assert not (dest / "a" / "later.png").exists() and (dest / "a" / "x_1.png").read_bytes() == b"pixels"


@pytest.mark.parametrize("first,second", [("Cat", "cat"), ("straße", "STRASSE"),
                                          (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"))])
def test_names_one_folder_on_macos_or_windows_are_refused(image, tmp_path, first, second):
    dest = tmp_path / "sorted"
    with pytest.raises(ValueError) as info:
        sort_into(rows(image, first, second), dest)
    a, b = sorted([first, second])
    assert str(info.value) == (f"--sort-into {dest}: class names {a!r} and {b!r} would both be sorted into the folder "
                               f"{b!r} (names that differ only in case or Unicode form are one folder on macOS and "
                               f"Windows); rename one of them; nothing was copied")
    assert not dest.exists()


def test_windows_device_names_and_trailing_dots_become_safe_folders(image, tmp_path):
    dest = tmp_path / "sorted"
    assert sort_into(rows(image, "CON", "nul.txt", "Com1", "cat.", "dog ", "console"), dest) == 6
    assert sorted(p.name for p in dest.iterdir()) == sorted(["_CON", "_nul.txt", "_Com1", "cat._", "dog _",
                                                             "console"])
