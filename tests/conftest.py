"""Shared fixtures: small, learnable image data built in tmp dirs (image folders, list files, hub-layout
parquet), tiny recipes, and the location of the real data when it is present."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
needs_real_data = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                     reason=f"real data not found at {SHARED_DATA} (only CI and dev machines have it)")


def pattern_image(label: int, size: int, rng: np.random.Generator, mode: str = "L") -> Image.Image:
    """A learnable picture: class k is a bright bar at row band k (plus noise)."""
    a = rng.integers(0, 60, (size, size)).astype(np.uint8)
    band = size // 4
    top = (label % 4) * band
    if label < 4:
        a[top:top + band, :] = 230
    else:
        a[:, top:top + band] = 230
    img = Image.fromarray(a, "L")
    return img.convert(mode) if mode != "L" else img


def write_class_folders(root: Path, classes: list[str], n: int, size: int = 16, seed: int = 0,
                        exts: tuple[str, ...] = (".png",), mode: str = "L") -> Path:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = exts[i % len(exts)]
            pattern_image(k, size, rng, mode).save(d / f"{i:04d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """tmp/imgs/{train,val,test}/<class>/*.png with 4 learnable classes."""
    root = tmp_path / "imgs"
    classes = ["a", "b", "c", "d"]
    write_class_folders(root / "train", classes, 40, seed=0)
    write_class_folders(root / "val", classes, 10, seed=1)
    write_class_folders(root / "test", classes, 10, seed=2)
    return root


def write_hub_layout(root: Path, names: list[str], sizes: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """A local folder in hub layout: data/<split>-00000-of-00001.parquet with image + ClassLabel columns."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        labels = [i % len(names) for i in range(n)]
        images = [pattern_image(k, size, rng) for k in labels]
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def hub_folder(tmp_path) -> Path:
    return write_hub_layout(tmp_path / "hub", ["zero", "one", "two", "three"], {"train": 160, "test": 40})


def write_recipe(path: Path, data: str, extra: str = "", name: str = "tiny", output_dir: Path | None = None,
                 augment: str = "") -> Path:
    """A tiny, fast recipe: 16 px gray images, small_cnn width 8, 3 epochs. `extra` goes into [checkpoint],
    `augment` into [data.augment]."""
    out = output_dir or path.parent / "runs"
    path.write_text(f'''name = "{name}"
seed = 0
[data]
{data}
image_size = [16, 16]
channels = 1
mean = [0.5]
std = [0.25]
[data.augment]
{augment}
[model]
name = "small_cnn"
args = {{ width = 8, dropout = 0.0 }}
[optim]
name = "sgd"
lr = 0.1
momentum = 0.9
[schedule]
name = "cosine"
[train]
epochs = 3
global_batch_size = 16
eval_batch_size = 32
log_every_steps = 5
[checkpoint]
output_dir = "{out}"
{extra}
''')
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; tests that train in-process start from a clean state."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test touches the network or the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "imgcls_cache"))  # data.cache = "disk", folder index
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)


@pytest.fixture(scope="session")
def _tiny_run_trained_once(tmp_path_factory) -> Path:
    """One tiny model trained for one epoch per test session (good, not perfect: the temperature has something
    to fit): <root>/imgs/{train,val,test}/<4 classes>/ (40/10/10 a class, 16 px) and <root>/runs/tiny/<run>/."""
    from helpers import train_inprocess

    root = tmp_path_factory.mktemp("tiny_trained")
    for split, n, seed in (("train", 40, 0), ("val", 10, 1), ("test", 10, 2)):
        write_class_folders(root / "imgs" / split, ["a", "b", "c", "d"], n, seed=seed)
    recipe = write_recipe(root / "tiny.toml", f'source = "folder"\nroot = "{root / "imgs"}"')
    assert train_inprocess(recipe, "train.epochs=1", "tracking.plots=false") == 0
    return root


@pytest.fixture(scope="module")
def tiny_run(_tiny_run_trained_once, tmp_path_factory) -> Path:
    """This test module's own copy of the session's trained run folder (what one module writes into it, such
    as an export, another never sees); its recipe still reads the session's images."""
    import shutil

    from helpers import only_run

    run = only_run(_tiny_run_trained_once / "runs")
    return Path(shutil.copytree(run, tmp_path_factory.mktemp("tiny_run") / run.name))


@pytest.fixture(scope="session")
def tiny_images(_tiny_run_trained_once) -> Path:
    """The session's image folder (imgs/ with train, val, test): read it, do not write into it."""
    return _tiny_run_trained_once / "imgs"
