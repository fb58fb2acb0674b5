"""`imgcls-data check`: every problem a training run would hit, at once, each named with its image: unreadable
files, class folders without images, rare classes, per-class counts and imbalance, exact duplicates (within a
split and across splits), images far from the working size. Exit 1 only when imgcls-train would stop; 0 with
warnings; 2 when the data cannot be indexed. --json holds everything."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import write_class_folders, write_hub_layout, write_recipe
from imgcls.data.tools.cli import main

CLEAN_END = "exit 0: imgcls-train would start on this data; no problems found"


def check(capsys, target: Path, *args: str, report: bool = True) -> tuple[int, list[str], dict]:
    """Exit status, summary lines, and the --json report (written to a new folder next to the target)."""
    out = target.parent / "out" / "report.json"
    size = ["--image-size", "16", "16", "--channels", "1"] if target.is_dir() else []
    status = main(["check", str(target), *args, *size, *(["--json", str(out)] if report else [])])
    return status, capsys.readouterr().out.rstrip("\n").split("\n"), json.loads(out.read_text()) if report else {}


def truncated_jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()[:len(out.getvalue()) // 2]


def section(lines: list[str], title_start: str) -> list[str]:
    """The lines of the summary section whose title starts with `title_start`, title included."""
    start = next(k for k, line in enumerate(lines) if line.startswith(title_start))
    end = lines.index("", start)
    return lines[start:end]


@pytest.fixture
def clean(tmp_path) -> Path:
    """imgs/{train: 6, val: 2, test: 2 per class}/{a,b,c}/*.png, 16 px gray."""
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b", "c"], 6, seed=0)
    write_class_folders(root / "val", ["a", "b", "c"], 2, seed=1)
    write_class_folders(root / "test", ["a", "b", "c"], 2, seed=2)
    return root


def add_broken(root: Path) -> list[Path]:
    bad = [root / "train" / "a" / "cut.jpg", root / "train" / "b" / "x.png", root / "val" / "c" / "empty.png"]
    bad[0].write_bytes(truncated_jpeg())
    bad[1].write_bytes(b"\x89PNG but not really an image")
    bad[2].write_bytes(b"")
    return bad


def add_duplicates(root: Path) -> tuple[list[Path], list[Path]]:
    across = [root / "train" / "a" / "0001.png", root / "test" / "a" / "copy.png"]
    within = [root / "train" / "b" / "0002.png", root / "train" / "b" / "again.png"]
    shutil.copy(*across)
    shutil.copy(*within)
    return across, within


def test_a_clean_folder_exits_0_with_the_counts_table(clean, capsys):
    status, lines, report = check(capsys, clean)
    assert status == 0
    assert lines == [f'data.source = "folder": {clean}; working size 16x16 (width x height)',
                     "3 classes; readable images: train 18, val 6, test 6",
                     "class       train     val    test",
                     "a               6       2       2",
                     "b               6       2       2",
                     "c               6       2       2",
                     "imbalance    1.0x    1.0x    1.0x  (largest class / smallest class)",
                     "",
                     CLEAN_END]
    assert report["splits"]["train"] == {"images": 18, "unreadable": 0, "counts": {"a": 6, "b": 6, "c": 6},
                                         "largest": {"class": "a", "images": 6},
                                         "smallest": {"class": "a", "images": 6}, "imbalance": 1.0}
    assert report["data"] == {"source": "folder", "location": str(clean), "on_bad_image": "error",
                              "allow_rare_classes": False}
    assert report["fatal"] == [] and report["warnings"] == [] and report["exit_status"] == 0
    assert report["duplicates"] == {"across_splits": [], "within_split": []}
    assert report["unreadable"] == report["empty_folders"] == report["rare_classes"] == []
    assert [p.name for p in (clean.parent / "out").iterdir()] == ["report.json"]  # no temporary file left


def test_every_unreadable_image_with_its_error_exits_1(clean, capsys):
    cut, not_png, empty = add_broken(clean)
    status, lines, report = check(capsys, clean)
    assert status == 1
    assert [(u["split"], u["image"], u["label"]) for u in report["unreadable"]] == [
        ("train", str(cut), "a"), ("train", str(not_png), "b"), ("val", str(empty), "c")]
    errors = [u["error"] for u in report["unreadable"]]
    assert errors[0].startswith("OSError: image file is truncated")
    assert errors[1:] == [f"UnidentifiedImageError: cannot identify image file '{not_png}'",
                          f"UnidentifiedImageError: cannot identify image file '{empty}'"]
    assert [report["splits"][s]["unreadable"] for s in ("train", "val", "test")] == [2, 1, 0]
    assert report["splits"]["train"]["counts"] == {"a": 6, "b": 6, "c": 6}  # readable images only
    assert section(lines, "unreadable") == [
        'unreadable images: 3 (data.on_bad_image = "error": imgcls-train stops)',
        *(f"  {u['image']}: {u['error']}" for u in report["unreadable"])]
    assert lines[-1] == ('exit 1: imgcls-train would stop on this data: 3 unreadable images '
                         '(data.on_bad_image = "error")')


def test_unreadable_images_are_a_warning_when_a_run_skips_them(clean, capsys):
    add_broken(clean)
    recipe = write_recipe(clean.parent / "r.toml", f'source = "folder"\nroot = "{clean}"')
    status, lines, report = check(capsys, recipe, 'data.on_bad_image="skip"')
    assert status == 0 and len(report["unreadable"]) == 3
    assert lines[-1] == ('exit 0: imgcls-train would start on this data; warnings: 3 unreadable images left out '
                         '(data.on_bad_image = "skip")')


def test_a_split_without_a_readable_image_exits_1_even_when_skipping(clean, capsys):
    shutil.rmtree(clean / "test")
    (clean / "test" / "b").mkdir(parents=True)
    (clean / "test" / "b" / "only.png").write_bytes(b"")
    recipe = write_recipe(clean.parent / "r.toml", f'source = "folder"\nroot = "{clean}"\non_bad_image = "skip"')
    status, lines, report = check(capsys, recipe)
    assert status == 1 and report["unusable_splits"] == {"test": "no readable image"}
    assert report["splits"]["test"] == {"images": 0, "unreadable": 1, "counts": {"a": 0, "b": 0, "c": 0},
                                        "largest": {"class": "a", "images": 0},
                                        "smallest": {"class": "a", "images": 0}, "imbalance": None}
    assert lines[6] == "imbalance    1.0x    1.0x       -  (largest class / smallest class)"
    assert section(lines, "splits without") == ["splits without images: 1", "  test: no readable image"]
    assert lines[-1] == "exit 1: imgcls-train would stop on this data: no usable test split"


def test_an_empty_class_folder_exits_1(clean, capsys):
    (clean / "train" / "d").mkdir()
    (clean / "train" / "d" / "notes.txt").write_text("no images here")
    status, lines, report = check(capsys, clean)
    assert status == 1 and report["empty_folders"] == [str(clean / "train" / "d")]
    assert section(lines, "class folders") == ["class folders without images: 1 (imgcls-train stops)",
                                               f"  {clean / 'train' / 'd'}"]
    assert lines[-1] == ('exit 1: imgcls-train would stop on this data: 1 class folder without images '
                         '(data.on_bad_image = "error")')


def test_a_class_with_2_images_is_rare_unless_allowed(clean, capsys):
    write_class_folders(clean / "train", ["e"], 2, seed=5)
    status, lines, report = check(capsys, clean)
    assert status == 1
    assert report["rare_classes"] == [{"class": "e", "images": {"train": 2, "val": 0, "test": 0},
                                       "first_seen": str(clean / "train" / "e")}]
    assert report["splits"]["train"]["imbalance"] == 3.0 and report["splits"]["val"]["imbalance"] is None
    assert section(lines, "rare") == [
        "rare classes (fewer than 5 images, or in one split only): 1 (data.allow_rare_classes = false: "
        "imgcls-train stops)", f"  'e': train 2, val 0, test 0 (first: {clean / 'train' / 'e'})"]
    assert lines[6:8] == ["e               2       0       0",
                          "imbalance    3.0x     inf     inf  (largest class / smallest class)"]
    assert lines[-1] == "exit 1: imgcls-train would stop on this data: 1 rare class (data.allow_rare_classes = false)"

    recipe = write_recipe(clean.parent / "r.toml", f'source = "folder"\nroot = "{clean}"\nallow_rare_classes = true')
    status, lines, _ = check(capsys, recipe)
    assert status == 0
    assert lines[-1] == ("exit 0: imgcls-train would start on this data; warnings: 1 rare class "
                         "(data.allow_rare_classes = true); val has no image of 1 class; test has no image of 1 class")


def test_duplicates_within_and_across_splits_are_warnings(clean, capsys):
    across, within = add_duplicates(clean)
    status, lines, report = check(capsys, clean)
    assert status == 0
    groups = report["duplicates"]
    assert [[(i["split"], i["image"], i["label"]) for i in g["images"]] for g in groups["across_splits"]] == [
        [("train", str(across[0]), "a"), ("test", str(across[1]), "a")]]
    assert [[(i["split"], i["image"]) for i in g["images"]] for g in groups["within_split"]] == [
        [("train", str(within[0])), ("train", str(within[1]))]]
    assert groups["across_splits"][0]["sha256"] == hashlib.sha256(across[0].read_bytes()).hexdigest()
    assert section(lines, "exact duplicates across") == [
        "exact duplicates across splits (leakage: evaluated on images it trained on): 1 group",
        f"  train {across[0]} = test {across[1]}"]
    assert section(lines, "exact duplicates within") == ["exact duplicates within a split: 1 group",
                                                         f"  train {within[0]} = train {within[1]}"]
    assert lines[-1] == ("exit 0: imgcls-train would start on this data; warnings: 1 duplicate group across "
                         "splits; 1 duplicate group within a split")


def test_a_duplicate_with_another_label_says_so(clean, capsys):
    shutil.copy(clean / "train" / "a" / "0000.png", clean / "train" / "c" / "relabelled.png")
    _, lines, _ = check(capsys, clean, report=False)
    assert section(lines, "exact duplicates within")[1] == (
        f"  train {clean / 'train' / 'a' / '0000.png'} = train {clean / 'train' / 'c' / 'relabelled.png'} "
        f"(classes differ: a, c)")


def test_images_far_from_the_working_size_by_their_headers(clean, capsys):
    tiny = [clean / "train" / "c" / f"tiny{k:02d}.png" for k in range(12)]
    for k, path in enumerate(tiny):
        Image.new("L", (4, 7), k).save(path)           # shorter side 4 < 16 / 2
    Image.new("L", (8, 8)).save(clean / "train" / "a" / "half.png")   # exactly half: not flagged
    huge = clean / "val" / "b" / "huge.png"
    Image.new("L", (200, 129)).save(huge)             # shorter side 129 > 16 * 8
    Image.new("L", (128, 300)).save(clean / "val" / "b" / "eightfold.png")  # exactly 8x: not flagged
    status, lines, report = check(capsys, clean)
    assert status == 0
    sizes = report["sizes"]
    assert (sizes["working_size"], sizes["shorter_side_below"], sizes["shorter_side_above"]) == ([16, 16], 8.0, 128)
    assert [(s["split"], s["image"], s["width"], s["height"]) for s in sizes["too_small"]] == [
        ("train", str(p), 4, 7) for p in tiny]
    assert sizes["too_large"] == [{"split": "val", "image": str(huge), "label": "b", "width": 200, "height": 129}]
    out = clean.parent / "out" / "report.json"
    assert section(lines, "images far below") == [
        "images far below the working size: 12 (shorter side under 8 px, 1/2 of 16: upscaled a lot)",
        *(f"  {p}: 4x7" for p in tiny[:10]), f"  ... and 2 more (all in {out})"]
    assert section(lines, "images far above") == [
        "images far above the working size: 1 (shorter side over 128 px, 8x 16: decoded at great cost, then shrunk)",
        f"  {huge}: 200x129"]
    assert lines[-1] == ("exit 0: imgcls-train would start on this data; warnings: 12 images far below the working "
                         "size; 1 image far above the working size")


def test_counts_are_after_the_val_carve_a_run_does(tmp_path, capsys):
    root = tmp_path / "imgs"
    for seed, (name, n) in enumerate((("a", 6), ("b", 12), ("c", 6))):
        write_class_folders(root, [name], n, seed=seed)
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{root}"\nval_pick = "first"\nval_size = 4')
    status, lines, report = check(capsys, recipe)
    assert status == 0 and report["val_carved"] is True
    assert {s: v["counts"] for s, v in report["splits"].items()} == {"train": {"a": 2, "b": 12, "c": 6},
                                                                     "val": {"a": 4, "b": 0, "c": 0}}
    assert report["splits"]["train"]["imbalance"] == 6.0
    assert lines[1] == "3 classes; readable images: train 20, val 4 (val carved from train)"
    assert lines[-1] == "exit 0: imgcls-train would start on this data; warnings: val has no image of 2 classes"

    status, lines, report = check(capsys, recipe, "data.val_size=24")
    assert status == 1 and list(report["splits"]) == ["train"]
    assert report["unusable_splits"] == {"val": "data.val_size/val_fraction: carving 24 of 24 training images for "
                                                "val is impossible; give a val split or set data.val_fraction "
                                                "between 0 and 1"}
    assert lines[-1] == "exit 1: imgcls-train would stop on this data: no usable val split"


def test_more_than_20_classes_show_each_splits_extremes(tmp_path, capsys):
    root = tmp_path / "imgs"
    names = [f"c{k:02d}" for k in range(21)]
    for k, name in enumerate(names):
        write_class_folders(root / "train", [name], 5 if k == 0 else 9 if k == 20 else 6, seed=k)
        write_class_folders(root / "val", [name], 2, seed=100 + k)
    status, lines, report = check(capsys, root)
    assert status == 0
    assert lines[1:4] == ["21 classes; readable images: train 128, val 42",
                          "  train: largest 'c20' 9, smallest 'c00' 5, imbalance 1.8x",
                          "  val: largest 'c00' 2, smallest 'c00' 2, imbalance 1.0x"]
    assert report["splits"]["train"]["imbalance"] == 9 / 5 and len(report["splits"]["train"]["counts"]) == 21


def test_hub_layout_duplicated_row_across_splits(tmp_path, capsys):
    root = write_hub_layout(tmp_path / "hub", ["zero", "one"], {"train": 12, "test": 6})
    test_file = root / "data" / "test-00000-of-00001.parquet"
    train = pq.read_table(root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.concat_tables([pq.read_table(test_file), train.slice(3, 1)]), test_file)
    recipe = write_recipe(tmp_path / "r.toml", f'source = "hub"\ndataset = "{root}"\nval_pick = "first"\nval_size = 2')
    status, lines, report = check(capsys, recipe)
    assert status == 0
    assert report["duplicates"]["across_splits"][0]["images"] == [
        {"split": "train", "image": f"{root} [train] row 3", "label": "one"},
        {"split": "test", "image": f"{root} [test] row 6", "label": "one"}]
    assert report["duplicates"]["within_split"] == [] and len(report["duplicates"]["across_splits"]) == 1
    assert {s: v["counts"] for s, v in report["splits"].items()} == {
        "train": {"zero": 5, "one": 5}, "val": {"zero": 1, "one": 1}, "test": {"zero": 3, "one": 4}}
    assert lines[-1] == "exit 0: imgcls-train would start on this data; warnings: 1 duplicate group across splits"


def test_everything_at_once_in_forked_workers(clean, capsys, monkeypatch):
    monkeypatch.setattr("imgcls.data.tools.check_report.CHUNK", 2)  # many chunks: the process pool hashes them
    cut, not_png, empty = add_broken(clean)
    (clean / "train" / "d").mkdir()
    write_class_folders(clean / "train", ["e"], 2, seed=5)
    across, within = add_duplicates(clean)
    Image.new("L", (4, 6)).save(clean / "train" / "c" / "tiny.png")
    Image.new("L", (130, 200)).save(clean / "train" / "c" / "huge.png")
    status, lines, report = check(capsys, clean)
    assert status == 1
    assert [u["image"] for u in report["unreadable"]] == [str(cut), str(not_png), str(empty)]
    assert report["empty_folders"] == [str(clean / "train" / "d")]
    assert [r["class"] for r in report["rare_classes"]] == ["e"]
    duplicates = report["duplicates"]
    assert [[i["image"] for i in g["images"]] for g in duplicates["across_splits"]] == [list(map(str, across))]
    assert [[i["image"] for i in g["images"]] for g in duplicates["within_split"]] == [list(map(str, within))]
    assert [s["image"] for s in report["sizes"]["too_small"]] == [str(clean / "train" / "c" / "tiny.png")]
    assert [s["image"] for s in report["sizes"]["too_large"]] == [str(clean / "train" / "c" / "huge.png")]
    assert {s: v["counts"] for s, v in report["splits"].items()} == {
        "train": {"a": 6, "b": 7, "c": 8, "e": 2}, "val": {"a": 2, "b": 2, "c": 2, "e": 0},
        "test": {"a": 3, "b": 2, "c": 2, "e": 0}}
    assert [report["splits"][s]["imbalance"] for s in ("train", "val", "test")] == [4.0, None, None]
    assert lines[1:8] == ["4 classes; readable images: train 23, val 6, test 7",
                          "class       train     val    test",
                          "a               6       2       3",
                          "b               7       2       2",
                          "c               8       2       2",
                          "e               2       0       0",
                          "imbalance    4.0x     inf     inf  (largest class / smallest class)"]
    titles = [lines[k + 1] for k, line in enumerate(lines[:-1]) if line == ""][:-1]
    assert [t.split(":")[0] for t in titles] == [
        "unreadable images", "class folders without images", "rare classes (fewer than 5 images, or in one split "
        "only)", "exact duplicates across splits (leakage", "exact duplicates within a split",
        "images far below the working size", "images far above the working size"]
    assert report["fatal"] == ['3 unreadable images (data.on_bad_image = "error")',
                               '1 class folder without images (data.on_bad_image = "error")',
                               "1 rare class (data.allow_rare_classes = false)"]
    assert report["warnings"] == ["1 duplicate group across splits", "1 duplicate group within a split",
                                  "val has no image of 1 class", "test has no image of 1 class",
                                  "1 image far below the working size", "1 image far above the working size"]
    assert lines[-1] == "exit 1: imgcls-train would stop on this data: " + "; ".join(report["fatal"])


def test_data_that_cannot_be_indexed_goes_through_the_dispatcher(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: no such recipe file or folder\n"
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{tmp_path / "gone"}"')
    assert main(["check", str(recipe)]) == 2
    assert capsys.readouterr().err == f"error: data.root = '{tmp_path / 'gone'}': no such folder\n"
    hub = write_recipe(tmp_path / "hub.toml", f'source = "hub"\ndataset = "{tmp_path}"\nstreaming = true')
    assert main(["check", str(hub)]) == 2  # refused as imgcls-train refuses it, before anything is downloaded
    assert capsys.readouterr().err.startswith("error: data.streaming = true: imgcls resumes every run bit-exactly")
