"""Classes are decided once, from data.class_names or from the labels of every split, and every class must be
real: a mistyped label (a class with a handful of images, or in one split only) is an error naming the class,
its count per split and where it first appears. Digit labels are names unless data.labels_are_indices."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import REPO, write_class_folders
from imgcls.data.loaders import build_splits
from imgcls.recipe import DataConfig
from imgcls.errors import DataError

GRAY = dict(image_size=(16, 16), channels=1, mean=[0.5], std=[0.25])
FOOTER = "Fix these labels, or set data.allow_rare_classes = true to train with these classes."


def lists(root: Path, train: list[str], val: list[str], **kw):
    (root / "train.txt").write_text("".join(f"{line}\n" for line in train))
    (root / "val.txt").write_text("".join(f"{line}\n" for line in val))
    return build_splits(DataConfig(source="listfile", root=str(root), train_list="train.txt", val_list="val.txt",
                                   separator="----", **GRAY, **kw))


@pytest.fixture
def pets(tmp_path) -> Path:
    """imgs/{cat,dog,emu}/0000..0007.png; train lists 0-5 of each class, val 6-7."""
    write_class_folders(tmp_path / "imgs", ["cat", "dog", "emu"], 8)
    return tmp_path


def rows(classes: str, numbers: range, label=lambda c: c) -> list[str]:
    return [f"imgs/{c}/{i:04d}.png----{label(c)}" for c in classes.split() for i in numbers]


def test_the_threshold_is_a_handful():
    from imgcls.data.labels import MIN_IMAGES_PER_CLASS

    assert MIN_IMAGES_PER_CLASS == 5


def test_names_come_from_the_union_of_all_splits(pets):
    s = lists(pets, rows("cat dog emu", range(6)), rows("emu dog cat", range(6, 8)))
    assert s.class_names == ["cat", "dog", "emu"]
    assert s.train.labels == [0] * 6 + [1] * 6 + [2] * 6 and s.val.labels == [2, 2, 1, 1, 0, 0]


def test_a_typo_in_the_train_list_is_an_error_not_a_new_class(pets):
    train = rows("cat dog emu", range(6))
    train[10] = "imgs/dog/0004.png----kitten"                      # line 11
    with pytest.raises(DataError) as e:
        lists(pets, train, rows("cat dog emu", range(6, 8)))
    assert str(e.value) == (
        "data: 1 class has fewer than 5 images or appears in one split only (a mistyped label makes such a class):\n"
        f"  'kitten': train 1, val 0 (first: {pets / 'train.txt'}:11)\n" + FOOTER)


def test_a_typo_in_the_val_list_is_the_same_error(pets):
    val = rows("cat dog emu", range(6, 8))
    val[1] = "imgs/cat/0007.png----ct"
    with pytest.raises(DataError) as e:
        lists(pets, rows("cat dog emu", range(6)), val)
    assert f"  'ct': train 0, val 1 (first: {pets / 'val.txt'}:2)\n" in str(e.value)


def test_every_rare_or_one_split_class_is_listed(pets):
    write_class_folders(pets / "imgs", ["fox"], 3)
    train = rows("cat dog emu", range(6)) + rows("fox", range(2))
    val = rows("cat dog", range(6, 8)) + rows("fox", range(2, 3))    # emu: train only; fox: 3 images
    with pytest.raises(DataError) as e:
        lists(pets, train, val)
    assert str(e.value) == (
        "data: 2 classes have fewer than 5 images or appear in one split only (a mistyped label makes such a "
        "class):\n"
        f"  'emu': train 6, val 0 (first: {pets / 'train.txt'}:13)\n"
        f"  'fox': train 2, val 1 (first: {pets / 'train.txt'}:19)\n" + FOOTER)


def test_allow_rare_classes_keeps_them_and_says_so(pets, caplog):
    train = rows("cat dog emu", range(6)) + ["imgs/dog/0006.png----kitten"]
    with caplog.at_level(logging.WARNING):
        s = lists(pets, train, rows("cat dog emu", range(6, 8)), allow_rare_classes=True)
    assert s.class_names == ["cat", "dog", "emu", "kitten"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "data: 1 class has fewer than 5 images or appears in one split only (a mistyped label makes such a class):\n"
        f"  'kitten': train 1, val 0 (first: {pets / 'train.txt'}:19)\n"
        "data.allow_rare_classes = true: training with them."]


def test_digit_labels_are_names_not_indices(pets):
    numbered = {"cat": "3070", "dog": "101", "emu": "20"}
    s = lists(pets, rows("cat dog emu", range(6), numbered.get), rows("cat dog emu", range(6, 8), numbered.get))
    assert s.class_names == ["20", "101", "3070"]                  # numeric order, 3 classes (not 3071)
    assert s.train.labels == [2] * 6 + [1] * 6 + [0] * 6


def test_labels_are_indices_into_class_names(pets):
    index = {"cat": "0", "dog": "1", "emu": "2"}
    s = lists(pets, rows("cat dog emu", range(6), index.get), rows("emu dog cat", range(6, 8), index.get),
              labels_are_indices=True, class_names=["cat", "dog", "emu"])
    assert s.class_names == ["cat", "dog", "emu"]
    assert s.train.labels == [0] * 6 + [1] * 6 + [2] * 6 and s.val.labels == [2, 2, 1, 1, 0, 0]


def test_labels_are_indices_without_names_counts_up_to_the_largest(pets):
    index = {"cat": "0", "dog": "1", "emu": "3"}                   # no image has label 2
    with pytest.raises(DataError) as e:
        lists(pets, rows("cat dog emu", range(6), index.get), rows("cat dog emu", range(6, 8), index.get),
              labels_are_indices=True)
    assert f"  '2': train 0, val 0 (no image has this label)\n" in str(e.value)
    s = lists(pets, rows("cat dog emu", range(6), index.get), rows("cat dog emu", range(6, 8), index.get),
              labels_are_indices=True, allow_rare_classes=True)
    assert s.class_names == ["0", "1", "2", "3"] and s.val.labels == [0, 0, 1, 1, 3, 3]


def test_an_index_out_of_range_names_file_and_line(pets):
    index = {"cat": "0", "dog": "1", "emu": "2"}
    with pytest.raises(DataError) as e:
        lists(pets, rows("cat dog emu", range(6), index.get), rows("cat dog emu", range(6, 8), index.get),
              labels_are_indices=True, class_names=["cat", "dog"])
    assert str(e.value) == (f"{pets / 'train.txt'}:13: label '2' is out of range: data.class_names has 2 classes "
                            f"(indices 0-1)")


def test_a_name_where_an_index_is_expected_names_file_and_line(pets):
    index = {"cat": "0", "dog": "dog", "emu": "2"}
    with pytest.raises(DataError) as e:
        lists(pets, rows("cat dog emu", range(6), index.get), rows("cat", range(6, 8), index.get),
              labels_are_indices=True)
    assert str(e.value) == (f"{pets / 'train.txt'}:7: label 'dog' is not a class index (data.labels_are_indices "
                            f"= true: labels are 0, 1, 2, ...)")


def test_with_class_names_a_digit_label_is_a_name(pets):
    with pytest.raises(DataError) as e:
        lists(pets, rows("cat dog", range(6)) + ["imgs/emu/0000.png----1"], rows("cat dog", range(6, 8)),
              class_names=["cat", "dog"])
    assert str(e.value) == (f"{pets / 'train.txt'}:13: label '1' is not a known class (classes: ['cat', 'dog']); "
                            f"fix the line, or add the class to data.class_names, or set data.labels_are_indices = "
                            f"true if the labels are class indices")


def test_a_named_class_without_images_is_rare(pets):
    with pytest.raises(DataError) as e:
        lists(pets, rows("cat dog", range(6)), rows("cat dog", range(6, 8)), class_names=["cat", "dog", "emu"])
    assert "  'emu': train 0, val 0 (no image has this label)\n" in str(e.value)


# ---------------------------------------------------------------- image folders
def test_a_class_folder_in_one_split_or_with_few_images_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b", "c"], 6)
    write_class_folders(root / "train", ["e"], 3)
    write_class_folders(root / "val", ["a", "b"], 2)
    write_class_folders(root / "val", ["e"], 1)
    write_class_folders(root / "test", ["a", "b"], 2)
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(source="folder", root=str(root), **GRAY))
    assert str(e.value) == (
        "data: 2 classes have fewer than 5 images or appear in one split only (a mistyped label makes such a "
        "class):\n"
        f"  'c': train 6, val 0, test 0 (first: {root / 'train' / 'c'})\n"
        f"  'e': train 3, val 1, test 0 (first: {root / 'train' / 'e'})\n" + FOOTER)
    s = build_splits(DataConfig(source="folder", root=str(root), allow_rare_classes=True, **GRAY))
    assert s.class_names == ["a", "b", "c", "e"] and s.sizes() == "train 21 / val 5 / test 4"


# ---------------------------------------------------------------- the shipped recipe
def test_listfile_recipe_dry_run_stops_on_a_typo(tmp_path, capsys):
    """recipes/listfile.toml as shipped (no class_names): a mistyped train label used to become an 11th class."""
    from imgcls.train import main as train_main

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_class_folders(tmp_path / "train", classes, 6)
    write_class_folders(tmp_path / "test", classes, 2)
    train = [f"train/{c}/{i:04d}.png----{c}" for c in classes for i in range(6)]
    train[27] = "test/deer/0001.png----kitten"
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "val.txt").write_text("".join(f"test/{c}/{i:04d}.png----{c}\n" for c in classes for i in range(2)))
    args = [str(REPO / "recipes" / "listfile.toml"), f"data.root={tmp_path}", "data.image_size=[16, 16]"]
    assert train_main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"  'kitten': train 1, val 0 (first: {tmp_path / 'train.txt'}:28)\n" in err
    train[27] = "test/deer/0001.png----deer"
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    assert train_main([*args, "--dry-run"]) == 0
    assert "listfile: 10 classes, train 60 / val 20 / test 0" in capsys.readouterr().out


def test_a_class_name_that_cannot_be_a_label_is_refused_before_training(tmp_path):
    """Refused at the start, not at the first artifact save."""
    from PIL import Image

    from imgcls.data.loaders import build_splits
    from imgcls.recipe import DataConfig
    from imgcls.errors import DataError

    lines = []
    for k in range(12):
        Image.new("L", (8, 8), k * 10).save(tmp_path / f"{k}.png")
        lines.append(f"{k}.png " + ("cat\x07" if k % 2 else "dog"))
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="listfile", root=str(tmp_path), train_list="train.txt", image_size=(8, 8), channels=1,
                     mean=[0.5], std=[0.5])
    with pytest.raises(DataError) as e:
        build_splits(cfg)
    assert str(e.value) == ("data.source = 'listfile': class name 'cat\\x07' contains the control character U+0007; "
                            "a class name must be a non-empty string without control characters")
