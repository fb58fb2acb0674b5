"""Data sources and splits: image folders, list files, hub-layout parquet, the hub offline, bad input,
seeded augmentation, and the classic MNIST carve on the real data."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import SHARED_DATA, needs_real_data, pattern_image, write_class_folders, write_hub_layout, write_recipe
from helpers import only_run, train_inprocess
from imgcls.data.loaders import build_splits, make_datasets
from imgcls.recipe import DataConfig
from imgcls.errors import DataError
from imgcls.data.transforms import Preprocess

GRAY = dict(image_size=(16, 16), channels=1, mean=[0.5], std=[0.25])
RGB = dict(image_size=(16, 16), channels=3, mean=[0.5] * 3, std=[0.5] * 3)


def data_cfg(**kw) -> DataConfig:
    return DataConfig(**{**GRAY, **kw})


def paths(split) -> list[str]:
    return [split.describe(i) for i in split.indices]


def check_labels_follow_folders(split, class_names):
    for k, i in enumerate(split.indices):
        assert Path(split.describe(i)).parent.name == class_names[split.label(k)]


# ---------------------------------------------------------------- image folder
@pytest.mark.parametrize("val_dir", ["val", "validation", "valid"])
def test_folder_splits_with_val_synonyms(tmp_path, val_dir):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["dog", "cat", "emu"], 6)
    write_class_folders(root / val_dir, ["cat", "dog", "emu"], 3)
    write_class_folders(root / "test", ["emu", "cat"], 2)       # a class may be absent from test
    s = build_splits(data_cfg(source="folder", root=str(root)))
    assert s.class_names == ["cat", "dog", "emu"]
    assert (len(s.train), len(s.val), len(s.test)) == (18, 9, 4)
    assert s.sizes() == "train 18 / val 9 / test 4"
    assert Counter(s.train.labels) == {0: 6, 1: 6, 2: 6}
    assert Counter(s.test.labels) == {0: 2, 2: 2}
    assert all(f"/{val_dir}/" in p for p in paths(s.val))
    for split in (s.train, s.val, s.test):
        check_labels_follow_folders(split, s.class_names)


def test_image_folder_fixture(image_folder):
    s = build_splits(data_cfg(source="folder", root=str(image_folder)))
    assert s.class_names == ["a", "b", "c", "d"]
    assert (len(s.train), len(s.val), len(s.test)) == (160, 40, 40)


def test_val_class_not_in_train_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root / "train", ["a", "b"], 2)
    write_class_folders(root / "val", ["a", "zebra"], 2)
    with pytest.raises(DataError) as e:
        build_splits(data_cfg(source="folder", root=str(root)))
    assert str(e.value) == f"{root}/val: classes ['zebra'] are not in the train split (train has ['a', 'b'])"


@pytest.fixture
def one_folder(tmp_path) -> Path:
    """Classes directly under root (no train/): 2 x 10 images; val must be carved."""
    return write_class_folders(tmp_path / "flat", ["x", "y"], 10)


def carve(root: Path, **kw):
    return build_splits(data_cfg(source="folder", root=str(root), val_fraction=0.25, **kw))


def test_one_folder_random_val(one_folder):
    s = carve(one_folder, val_pick="random", split_seed=7)
    assert s.class_names == ["x", "y"]
    assert (len(s.train), len(s.val), s.test) == (15, 5, None)
    assert set(s.train.indices).isdisjoint(s.val.indices)
    assert sorted(s.train.indices + s.val.indices) == list(range(20))
    assert s.val.indices != list(range(5))                        # random, not the first ones
    again = carve(one_folder, val_pick="random", split_seed=7)
    assert (again.train.indices, again.val.indices) == (s.train.indices, s.val.indices)
    other = carve(one_folder, val_pick="random", split_seed=8)
    assert other.val.indices != s.val.indices
    assert len(other.val) == 5
    check_labels_follow_folders(s.val, s.class_names)


def test_one_folder_first_val(one_folder):
    s = carve(one_folder, val_pick="first")
    assert s.val.indices == [0, 1, 2, 3, 4]
    assert s.train.indices == list(range(5, 20))
    assert paths(s.val) == [str(one_folder / "x" / f"{i:04d}.png") for i in range(5)]
    assert s.val.labels[:5] == [0] * 5


def test_val_size_wins_over_fraction(one_folder):
    s = build_splits(data_cfg(source="folder", root=str(one_folder), val_size=3, val_fraction=0.5))
    assert (len(s.train), len(s.val)) == (17, 3)


def test_impossible_carve(one_folder):
    with pytest.raises(DataError) as e:
        build_splits(data_cfg(source="folder", root=str(one_folder), val_size=20))
    assert str(e.value).startswith("data.val_size/val_fraction: carving 20 of 20 training images for val is "
                                   "impossible")


@pytest.fixture
def mixed_formats(tmp_path) -> Path:
    root = tmp_path / "formats"
    exts = (".png", ".jpg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
    write_class_folders(root, ["p", "q"], len(exts), exts=exts, mode="RGB")
    Image.new("RGBA", (12, 10), (255, 0, 0, 0)).save(root / "p" / "rgba.png")           # fully transparent
    Image.new("RGB", (12, 10), (0, 200, 0)).convert("P").save(root / "p" / "palette.png")
    Image.new("I;16", (12, 10), 40000).save(root / "q" / "sixteen.png")
    (root / "q" / "readme.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("spec", [GRAY, RGB], ids=["gray", "rgb"])
def test_any_pil_format_becomes_the_model_channels(mixed_formats, spec):
    cfg = DataConfig(source="folder", root=str(mixed_formats), val_fraction=0.25, **spec)
    s = build_splits(cfg)
    every = sorted(paths(s.train) + paths(s.val))
    assert len(every) == 17                                       # 2 x 7 formats + rgba + palette + 16-bit
    assert {Path(p).suffix for p in every} == {".png", ".jpg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
    assert not any(p.endswith("readme.txt") for p in every)
    ds = make_datasets(s, cfg, seed=0)
    for name in ("train", "val"):
        for k in range(len(ds[name])):
            x, y = ds[name][k]
            assert x.shape == (spec["channels"], 16, 16) and x.dtype == torch.float32
            assert y in (0, 1)


def test_alpha_is_composited_on_white():
    pre = Preprocess.from_data(DataConfig(source="hub", dataset="a", **RGB))
    rgb = pre.convert(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    x = pre.eval_transform()(rgb)
    assert torch.equal(x, torch.ones(3, 16, 16))                  # (1 - 0.5) / 0.5


@pytest.mark.parametrize("spec, pixel", [(GRAY, 156), (RGB, (156, 156, 156))], ids=["gray", "rgb"])
def test_16_bit_gray_is_scaled_not_clipped(tmp_path, spec, pixel):
    Image.new("I;16", (4, 4), 40000).save(tmp_path / "sixteen.png")   # 40000 / 256 = 156
    pre = Preprocess.from_data(DataConfig(source="hub", dataset="a", **spec))
    with Image.open(tmp_path / "sixteen.png") as im:
        assert pre.convert(im).getpixel((0, 0)) == pixel


# ---------------------------------------------------------------- list file
@pytest.fixture
def list_root(tmp_path) -> Path:
    root = tmp_path / "ds"
    write_class_folders(root / "imgs", ["cat", "dog"], 6)
    return root


def listfile(root: Path, **kw):
    return build_splits(data_cfg(source="listfile", root=str(root), separator="----", **kw))


def test_list_file_names_and_comments(list_root):
    (list_root / "train.txt").write_text("# path----label\n\nimgs/cat/0000.png----cat\nimgs/dog/0000.png----dog\n"
                                         "  # indented comment\nimgs/cat/0001.png----cat\nimgs/dog/0001.png----dog\n"
                                         "imgs/cat/0002.png----cat\nimgs/dog/0002.png----dog\n")
    (list_root / "val.txt").write_text("imgs/dog/0003.png----dog\n\nimgs/cat/0003.png----cat\n")
    (list_root / "test.txt").write_text("imgs/cat/0004.png----cat\nimgs/dog/0004.png----dog\n")
    s = listfile(list_root, train_list="train.txt", val_list="val.txt", test_list="test.txt",
                 class_names=["cat", "dog"])
    assert s.class_names == ["cat", "dog"]
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 2)
    assert s.train.labels == [0, 1, 0, 1, 0, 1]
    assert s.val.labels == [1, 0]
    assert s.test.labels == [0, 1]
    assert paths(s.train) == [str(list_root / "imgs" / p) for p in
                              ("cat/0000.png", "dog/0000.png", "cat/0001.png", "dog/0001.png", "cat/0002.png",
                               "dog/0002.png")]


def test_list_file_index_labels_and_a_carved_val(list_root):
    (list_root / "train.txt").write_text("imgs/cat/0000.png----0\nimgs/dog/0000.png----2\nimgs/cat/0001.png----0\n"
                                         "imgs/dog/0001.png----2\n")
    s = listfile(list_root, train_list="train.txt", val_fraction=0.5, val_pick="first", labels_are_indices=True,
                 allow_rare_classes=True)
    assert s.class_names == ["0", "1", "2"]
    assert s.val.labels[:2] == [0, 2] and [s.val.label(k) for k in range(2)] == [0, 2]
    assert [s.train.label(k) for k in range(2)] == [0, 2]


def test_list_file_default_separator_is_a_space(list_root):
    (list_root / "train.txt").write_text("imgs/cat/0000.png 0\nimgs/dog/0000.png 1\n")
    (list_root / "val.txt").write_text("imgs/dog/0001.png 1\n")
    s = build_splits(data_cfg(source="listfile", root=str(list_root), train_list="train.txt", val_list="val.txt",
                              allow_rare_classes=True))
    assert s.class_names == ["0", "1"] and (s.train.labels, s.val.labels) == ([0, 1], [1])


def test_list_file_unknown_label_names_file_and_line(list_root):
    (list_root / "train.txt").write_text("imgs/cat/0000.png----cat\n\nimgs/dog/0000.png----zebra\n")
    with pytest.raises(DataError) as e:
        listfile(list_root, train_list="train.txt", class_names=["cat", "dog"])
    assert "train.txt:3: label 'zebra' is not a known class" in str(e.value)
    assert "classes: ['cat', 'dog']" in str(e.value)
    assert "data.class_names" in str(e.value)


def test_list_file_index_out_of_range(list_root):
    (list_root / "train.txt").write_text("imgs/cat/0000.png----0\nimgs/dog/0000.png----5\n")
    with pytest.raises(DataError) as e:
        listfile(list_root, train_list="train.txt", class_names=["cat", "dog"], labels_are_indices=True)
    assert str(e.value) == (f"{list_root / 'train.txt'}:2: label '5' is out of range: data.class_names has 2 "
                            f"classes (indices 0-1)")


def test_list_file_missing_image(list_root):
    (list_root / "train.txt").write_text("imgs/cat/0000.png----0\nimgs/cat/0009.png----0\n")
    with pytest.raises(DataError) as e:
        listfile(list_root, train_list="train.txt")
    assert str(e.value) == f"{list_root / 'train.txt'}:2: image {list_root / 'imgs/cat/0009.png'} does not exist"


def test_list_file_malformed_line(list_root):
    (list_root / "train.txt").write_text("imgs/cat/0000.png----0\n# ok\nimgs/cat/0001.png 0\n")
    with pytest.raises(DataError) as e:
        listfile(list_root, train_list="train.txt")
    assert str(e.value) == (f"{list_root / 'train.txt'}:3: expected '<path>----<label>', got 'imgs/cat/0001.png 0' "
                            f"(data.separator = '----')")


def test_list_file_not_found(list_root):
    with pytest.raises(DataError) as e:
        listfile(list_root, train_list="nope.txt")
    assert str(e.value) == f"list file {list_root / 'nope.txt'}: not found"


# ---------------------------------------------------------------- hub layout (local parquet)
def hub_cfg(path, **kw) -> DataConfig:
    return data_cfg(source="hub", dataset=str(path), **kw)


def test_hub_layout_columns_classes_and_carved_val(hub_folder):
    s = build_splits(hub_cfg(hub_folder, val_size=20, val_pick="first"))
    assert s.class_names == ["zero", "one", "two", "three"]
    assert (len(s.train), len(s.val), len(s.test)) == (140, 20, 40)
    assert [s.val.label(k) for k in range(20)] == [i % 4 for i in range(20)]
    assert Counter(s.test.labels) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert s.train.describe(s.train.indices[0]) == f"{hub_folder} [train] row 20"
    image = s.train.open(s.train.indices[0])
    assert image.size == (16, 16) and image.mode == "L"


def test_hub_layout_random_val_fraction(hub_folder):
    s = build_splits(hub_cfg(hub_folder, val_fraction=0.25, split_seed=3))
    assert (len(s.train), len(s.val)) == (120, 40)
    assert set(s.train.indices).isdisjoint(s.val.indices)


@pytest.mark.parametrize("key, value", [("image_column", "img"), ("label_column", "y")])
def test_hub_missing_column_names_the_columns(hub_folder, key, value):
    with pytest.raises(DataError) as e:
        build_splits(hub_cfg(hub_folder, **{key: value}))
    assert str(e.value) == (f"data.{key}: '{value}' not found in '{hub_folder}'; its columns are ['image', 'label']. "
                            f"Set data.{key} = \"<column>\".")


def test_hub_unknown_val_split_lists_splits(hub_folder):
    with pytest.raises(DataError) as e:
        build_splits(hub_cfg(hub_folder, val_split="nope"))
    assert str(e.value) == "data.val_split = 'nope': no such split; available: ['test', 'train']"


def test_hub_explicit_splits(hub_folder):
    s = build_splits(hub_cfg(hub_folder, val_split="test", test_split="test"))
    assert (len(s.train), len(s.val), len(s.test)) == (160, 40, 40)


def test_hub_local_folder_that_does_not_exist(tmp_path):
    with pytest.raises(DataError) as e:
        build_splits(hub_cfg(tmp_path / "nowhere"))
    assert str(e.value) == f"data.dataset = '{tmp_path / 'nowhere'}': no such folder"


def test_hub_unreachable_says_how_to_use_a_local_copy(monkeypatch):
    import datasets
    import huggingface_hub

    # conftest sets HF_HUB_OFFLINE=1; make sure modules imported before it see it too (no network waits)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as e:
        build_splits(hub_cfg("someone/not-cached"))
    text = str(e.value)
    assert text.startswith("data.dataset = 'someone/not-cached': could not load it from the Hugging Face hub and "
                           "it is not in the local cache")
    assert 'data.dataset="' in text and 'data.source="folder"' in text
    assert "HF_HUB_OFFLINE=1" in text
    assert "\n" not in text and "Traceback" not in text
    assert e.value.__cause__ is None and e.value.__suppress_context__


def no_offline_flag(monkeypatch, endpoint: str = "http://127.0.0.1:9") -> None:
    """As on a machine without HF_HUB_OFFLINE whose hub is unreachable: the endpoint is a local port nobody
    listens on (connection refused at once), so no test touches the network."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)


def test_hub_unreachable_fails_fast_without_retries(monkeypatch):
    """huggingface_hub retries a refused connection 5 times (1+2+4+8+8 s): 23 s before our error. A 3 s probe
    of the endpoint first, then the local cache only."""
    import time

    no_offline_flag(monkeypatch)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        build_splits(hub_cfg("someone/not-cached"))
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert str(e.value).startswith("data.dataset = 'someone/not-cached': could not load it from the Hugging Face "
                                   "hub and it is not in the local cache (http://127.0.0.1:9 did not answer: "
                                   "ConnectError: ")


def test_hub_unreachable_but_cached_loads_from_the_cache(monkeypatch, tmp_path, caplog):
    import shutil

    import datasets

    from conftest import write_hub_layout

    staged = write_hub_layout(tmp_path / "stage" / "toy", ["zero", "one"], {"train": 12, "test": 4})
    datasets.load_dataset(str(staged), cache_dir=str(tmp_path / "build"))
    cache = tmp_path / "hf_datasets"
    shutil.copytree(tmp_path / "build" / "toy", cache / "someone___toy", ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    no_offline_flag(monkeypatch)
    with caplog.at_level(logging.WARNING):
        s = build_splits(hub_cfg("someone/toy", val_split="test"))
    assert s.class_names == ["zero", "one"] and s.sizes() == "train 12 / val 4 / test 4"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "imgcls.data.hub"]
    assert warning.startswith("the Hugging Face hub is not reachable (http://127.0.0.1:9 did not answer: ConnectError")
    assert warning.endswith("): loaded 'someone/toy' from the local cache, as with HF_HUB_OFFLINE=1")
    assert datasets.config.HF_HUB_OFFLINE is False                # the switch was for that load only


def raise_from_load_dataset(monkeypatch, error: Exception) -> None:
    import datasets
    import huggingface_hub

    def load_dataset(*args, **kwargs):
        raise error
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_dataset_not_found_is_named_by_type(monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    raise_from_load_dataset(monkeypatch, DatasetNotFoundError("Dataset 'someone/typo' doesn't exist on the Hub or "
                                                              "cannot be accessed."))
    with pytest.raises(DataError) as e:
        build_splits(hub_cfg("someone/typo"))
    assert str(e.value) == ("data.dataset = 'someone/typo': DatasetNotFoundError: Dataset 'someone/typo' doesn't "
                            "exist on the Hub or cannot be accessed. Check data.dataset, data.config and "
                            "data.revision; a gated or private dataset needs `hf auth login` first.")


def test_hub_unknown_config_is_named(hub_folder):
    with pytest.raises(DataError) as e:
        build_splits(hub_cfg(hub_folder, config="nope"))
    assert str(e.value) == (f"data.dataset = '{hub_folder}': ValueError: BuilderConfig 'nope' not found. Available: "
                            f"['default']. Check data.dataset, data.config and data.revision; a gated or private "
                            f"dataset needs `hf auth login` first.")


def test_hub_unexpected_errors_are_not_swallowed(monkeypatch):
    raise_from_load_dataset(monkeypatch, KeyError("a bug somewhere"))
    with pytest.raises(KeyError, match="a bug somewhere"):
        build_splits(hub_cfg("someone/x"))


def test_a_hub_warning_prints_once(tmp_path, hub_folder):
    """datasets and huggingface_hub each have a stderr handler and also pass records to the root logger: with
    the application logging (imgcls-train does), each warning printed twice. Once we loaded data, once."""
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(format='%(name)s: %(message)s');"
            "from imgcls.data.loaders import build_splits; from imgcls.recipe import DataConfig;"
            f"build_splits(DataConfig(source='hub', dataset={str(hub_folder)!r}, channels=1, mean=[0.5], std=[0.5]));"
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].');"
            "logging.getLogger('datasets.load').warning('a datasets warning')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Retrying in 1s [Retry 1/5].") == 1, done.stderr
    assert done.stderr.count("a datasets warning") == 1, done.stderr
    assert "huggingface_hub.utils._http: Retrying in 1s [Retry 1/5]." in done.stderr   # through the app's format


# ---------------------------------------------------------------- bad input
def test_root_that_does_not_exist(tmp_path):
    for source, extra in (("folder", {}), ("listfile", {"train_list": "t.txt"})):
        with pytest.raises(DataError) as e:
            build_splits(data_cfg(source=source, root=str(tmp_path / "missing"), **extra))
        assert str(e.value) == f"data.root = '{tmp_path / 'missing'}': no such folder"


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "flat" / "loose.png")
    with pytest.raises(DataError) as e:
        build_splits(data_cfg(source="folder", root=str(tmp_path / "flat")))
    assert str(e.value) == (f"{tmp_path / 'flat'}: no class folders found; "
                            f"expected {tmp_path / 'flat'}/<class>/<image files>")


# ---------------------------------------------------------------- framing: train as eval
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_train_without_augmentation_frames_like_eval(crop_pct):
    """random_resized_crop = false: train frames as eval does (it used to resize straight to size: a 14 %
    framing mismatch at 0.875), a 4:3 photo included (both keep its aspect ratio and cut the centre)."""
    from imgcls.recipe import AugmentConfig

    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    pre = Preprocess.from_data(DataConfig(source="hub", dataset="a", crop_pct=crop_pct, **RGB))
    train, evaluate = pre.train_transform(AugmentConfig())(square), pre.eval_transform()(square)
    assert train.shape == (3, 16, 16) and torch.equal(train, evaluate)
    photo = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    assert torch.equal(pre.train_transform(AugmentConfig())(photo), pre.eval_transform()(photo))


def test_train_padding_crop_frames_like_eval_first():
    """With crop_padding the random crop is taken from the eval framing (aspect ratio kept to cover size /
    crop_pct, its centre), padded."""
    from imgcls.recipe import AugmentConfig

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    pre = Preprocess.from_data(DataConfig(source="hub", dataset="a", crop_pct=0.5, **RGB))
    framed = v2.CenterCrop(32)(v2.Resize(32, antialias=True)(image))  # 16 / 0.5; 30 x 40 -> 32 x 42 -> 32 x 32
    window = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(RGB["mean"], RGB["std"])])
    padded = window(v2.Pad(2)(framed))
    torch.manual_seed(0)
    x = pre.train_transform(AugmentConfig(crop_padding=2))(image)
    hits = [(dy, dx) for dy in range(21) for dx in range(21) if torch.equal(x, padded[:, dy:dy + 16, dx:dx + 16])]
    assert len(hits) == 1


# ---------------------------------------------------------------- workers under spawn
def test_datasets_load_the_same_in_spawned_workers(tmp_path, hub_folder):
    """Splits pickle (no closures): spawn (macOS, Windows) and forkserver (Python 3.14's Linux default) workers
    give the same tensors as loading in the main process, for folder, list file, hub-layout and memory-cached
    splits, with seeded train augmentation."""
    from torch.utils.data import ConcatDataset, DataLoader

    root = write_class_folders(tmp_path / "imgs", ["a", "b"], 6)
    (tmp_path / "train.txt").write_text("".join(f"imgs/{c}/{i:04d}.png {c}\n" for c in "ab" for i in range(6)))
    aug = {"crop_padding": 2, "hflip": 0.5}
    configs = [data_cfg(source="folder", root=str(root), val_size=4, augment=aug),
               data_cfg(source="listfile", root=str(tmp_path), train_list="train.txt", val_size=4, augment=aug),
               hub_cfg(hub_folder, augment=aug),
               data_cfg(source="folder", root=str(root), val_size=4, cache="memory", augment=aug)]
    parts = []
    for cfg in configs:
        ds = make_datasets(build_splits(cfg), cfg, seed=3)
        parts += [ds["train"], ds["val"]]
    whole = ConcatDataset(parts)
    assert len(whole) == 3 * 12 + 160

    def batches(**kw) -> list:
        return list(DataLoader(whole, batch_size=32, **kw))
    here, spawned = batches(num_workers=0), batches(num_workers=2, multiprocessing_context="spawn")
    assert len(here) == len(spawned) == 7
    for (x0, y0), (x1, y1) in zip(here, spawned):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ---------------------------------------------------------------- real MNIST
@needs_real_data
def test_mnist_classic_carve_first_5000():
    s = build_splits(DataConfig(source="hub", dataset=str(SHARED_DATA / "mnist"), val_size=5000, val_pick="first",
                                image_size=(28, 28), channels=1, mean=[0.1307], std=[0.3081]))
    assert (len(s.train), len(s.val), len(s.test)) == (55000, 5000, 10000)
    assert s.class_names == [str(d) for d in range(10)]
    assert s.val.indices == list(range(5000))
    assert s.train.indices == list(range(5000, 60000))
    val = Counter(s.val.label(k) for k in range(len(s.val)))
    assert [val[c] for c in range(10)] == [479, 563, 488, 493, 535, 434, 501, 550, 462, 495]
    test = Counter(s.test.labels[i] for i in s.test.indices)
    assert [test[c] for c in range(10)] == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    train = Counter(s.train.label(k) for k in range(len(s.train)))
    full = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert [train[c] for c in range(10)] == [f - v for f, v in zip(full, [val[c] for c in range(10)])]


def test_hub_streaming_is_refused_because_it_cannot_resume_exactly(tmp_path):
    """A `datasets` streaming dataset loses its shuffle buffer on resume; the refusal says so and names the
    way that does resume exactly (shards)."""
    root = write_hub_layout(tmp_path / "hub", ["a", "b"], {"train": 10, "test": 10})
    cfg = DataConfig(source="hub", dataset=str(root), streaming=True, image_size=(16, 16), channels=1,
                     mean=[0.5], std=[0.25])
    with pytest.raises(DataError) as e:
        build_splits(cfg)
    text = str(e.value)
    assert text.startswith("data.streaming = true: imgcls resumes every run bit-exactly, and a `datasets` streaming "
                           "dataset cannot: its state_dict keeps the shard and example position but not the shuffle "
                           "buffer's content")
    assert f"To train on {root} without downloading it on every training machine" in text
    assert 'train with data.source = "shards"' in text and text.endswith("into the datasets cache.")


def _write_hub_split(root: Path, split: str, labels: list[int], features) -> None:
    import datasets

    rng = np.random.default_rng(len(labels))
    images = [pattern_image(max(k, 0), 16, rng) for k in labels]
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))


def test_an_unlabelled_hub_test_split_is_left_out_with_a_warning_and_the_run_finishes(tmp_path, caplog):
    """#19.2: imagenet-1k's test split has label -1 on every row. It passed every check, the run trained, then
    finish() crashed (IndexError) with no results.json. Now it is left out up front, and the log says so."""
    import datasets

    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    _write_hub_split(root, "train", [0, 1] * 40, features)
    _write_hub_split(root, "validation", [0, 1] * 10, features)
    _write_hub_split(root, "test", [-1] * 12, features)
    recipe = write_recipe(tmp_path / "r.toml", f'source = "hub"\ndataset = "{root}"')
    recipe.write_text(recipe.read_text().replace("epochs = 3", "epochs = 1"))
    with caplog.at_level(logging.WARNING):
        assert train_inprocess(recipe) == 0
    assert ("data: split 'test' of " + str(root) + " has no labels (label -1 on all 12 rows, as a hub test split "
            "whose answers are withheld): it is left out, so this run has no test result") in caplog.text
    results = json.loads((only_run(tmp_path / "runs") / "results.json").read_text())
    assert "test" not in results and results["val"]["n"] == 20


def test_hub_labels_outside_the_class_names_or_partly_missing_are_refused(tmp_path):
    """A split with some rows unlabelled, and integer labels whose largest value is in another split than the
    first (the class count was taken from the first split only)."""
    import datasets

    root = tmp_path / "hub"
    (root / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    _write_hub_split(root, "train", [0, 1] * 10, features)
    _write_hub_split(root, "test", [0, -1, 1], features)
    with pytest.raises(DataError) as e:
        build_splits(DataConfig(source="hub", dataset=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25]))
    assert str(e.value) == (f"data: split 'test' of {root} has 1 of 3 rows without a label (-1); label every row, "
                            "or leave the split out of the dataset")

    plain = tmp_path / "plain"
    (plain / "data").mkdir(parents=True)
    ints = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    _write_hub_split(plain, "train", [0, 1] * 10, ints)
    _write_hub_split(plain, "test", [0, 1, 2], ints)
    found = build_splits(DataConfig(source="hub", dataset=str(plain), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25]))
    assert found.class_names == ["0", "1", "2"]
