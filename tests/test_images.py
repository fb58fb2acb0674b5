"""EXIF orientation: a photo whose pixels are stored sideways and tagged "rotate 90 clockwise" (orientation 6)
is seen upright by training (folder, list file, hub rows), evaluation transforms, imgcls-predict and the export
parity images, exactly (PNG: lossless, so the upright array is known)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_class_folders
from imgcls.data.loaders import build_splits, make_datasets
from imgcls.data.images import check_image, open_image
from imgcls.recipe import DataConfig
from imgcls.data.transforms import Preprocess

ORIENTATION = 0x0112
SPEC = dict(image_size=(8, 8), channels=3, mean=[0.5] * 3, std=[0.5] * 3)


def upright() -> np.ndarray:
    """12 x 20 RGB, every pixel different (red counts 0..239), so any rotation or flip changes the array."""
    rows, cols = np.mgrid[0:12, 0:20]
    return np.stack([rows * 20 + cols, rows * 10, cols * 10], axis=-1).astype(np.uint8)


def sideways_bytes(fmt: str = "PNG") -> bytes:
    """The upright picture stored turned 90 degrees counter-clockwise, tagged orientation 6 ("turn it 90
    degrees clockwise to show it"), as a phone held sideways writes it."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    out = io.BytesIO()
    Image.fromarray(np.rot90(upright()).copy()).save(out, fmt, exif=exif)
    return out.getvalue()


@pytest.fixture
def sideways_png(tmp_path) -> Path:
    path = tmp_path / "phone.png"
    path.write_bytes(sideways_bytes())
    with Image.open(path) as raw:  # the file really is stored sideways and tagged
        assert raw.size == (12, 20) and raw.getexif()[ORIENTATION] == 6
    return path


def test_open_image_turns_paths_and_bytes_upright(sideways_png):
    assert np.array_equal(np.asarray(open_image(sideways_png)), upright())
    assert np.array_equal(np.asarray(open_image(sideways_png.read_bytes())), upright())
    jpeg = open_image(sideways_bytes("JPEG"))
    assert jpeg.size == (20, 12)  # width 20, height 12: upright
    check_image(sideways_png)


def eval_pixels(image: np.ndarray) -> torch.Tensor:
    pre = Preprocess.from_data(DataConfig(source="hub", dataset="x", **SPEC))
    return pre.eval_transform()(pre.convert(Image.fromarray(image)))


def test_training_data_is_upright_from_folder_list_and_hub_rows(tmp_path, sideways_png):
    import datasets

    root = write_class_folders(tmp_path / "imgs", ["a", "b"], 5, mode="RGB")
    (root / "a" / "0000.png").write_bytes(sideways_png.read_bytes())
    (tmp_path / "train.txt").write_text("".join(f"imgs/{c}/{i:04d}.png {c}\n" for c in "ab" for i in range(5)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"image": [{"bytes": sideways_bytes(), "path": None}], "label": [0]},
                               features=features).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    configs = {"folder": DataConfig(source="folder", root=str(root), val_size=1, val_pick="first", **SPEC),
               "list": DataConfig(source="listfile", root=str(tmp_path), train_list="train.txt", val_size=1,
                                  val_pick="first", **SPEC),
               "hub": DataConfig(source="hub", dataset=str(tmp_path / "hub"), val_split="train", **SPEC)}
    for name, cfg in configs.items():
        splits = build_splits(cfg)
        val = splits.val
        assert np.array_equal(np.asarray(val.open(val.indices[0])), upright()), name
        x, y = make_datasets(splits, cfg, seed=0)["val"][0]
        assert y == 0 and torch.equal(x, eval_pixels(upright())), name


def test_predict_preprocessing_sees_the_photo_upright(sideways_png):
    from imgcls.inference.preprocess import prepare, read_views

    pre = Preprocess.from_data(DataConfig(source="hub", dataset="x", **SPEC)).to_dict()
    views = read_views(str(sideways_png), pre)
    assert views.shape == (1, 3, 8, 8)
    assert np.array_equal(views[0], prepare(Image.fromarray(upright()), pre))


def test_export_parity_images_are_upright(tmp_path, sideways_png):
    from imgcls.inference.export import parity_images

    (tmp_path / "parity").mkdir()
    sideways_png.rename(tmp_path / "parity" / "phone.png")
    images, where = parity_images(None, str(tmp_path / "parity"), 4)
    assert where == f"folder {tmp_path / 'parity'}" and len(images) == 1
    assert np.array_equal(np.asarray(images[0]), upright())
