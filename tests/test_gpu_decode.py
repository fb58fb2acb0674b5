"""data.decode = "gpu" (imgcls/data/gpu_decode.py): workers hand over JPEG bytes, the main process decodes a batch on
the device. Everything but nvJPEG itself runs here on the CPU: which items travel as bytes, that the batch
decoded with torchcodec equals the CPU path's pixels where no resize is needed, and the refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_recipe
from imgcls.data.loaders import build_splits, make_datasets
from imgcls.data.gpu_decode import EncodedBatch, EncodedImages, decode_batch
from imgcls.recipe import DataConfig, load_recipe
from imgcls.errors import RecipeError
from imgcls.data.store import DecodingImages
from imgcls.train import main as train_main
from imgcls.data.transforms import Preprocess

pytest.importorskip("torchcodec.decoders", reason="torchcodec is in the dev extra (pip install -e '.[dev]')")


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def save(image: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)


@pytest.fixture
def kinds(tmp_path) -> Path:
    """train/a: plain RGB JPEGs and a gray JPEG; train/b: a PNG, a CMYK JPEG, a JPEG tagged "rotate 90"."""
    root = tmp_path / "imgs"
    for n in range(5):
        save(noise(24, 24, n), root / "train" / "a" / f"rgb{n}.jpg", "JPEG", quality=90)
    save(noise(24, 24, 9).convert("L"), root / "train" / "a" / "zgray.jpg", "JPEG")
    for n in range(3):
        save(noise(24, 24, 10 + n), root / "train" / "b" / f"png{n}.png", "PNG")
    save(noise(24, 24, 20).convert("CMYK"), root / "train" / "b" / "cmyk.jpg", "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(noise(24, 16, 21), root / "train" / "b" / "turned.jpg", "JPEG", exif=exif.tobytes())
    return root


def cfg(root: Path, size=(24, 24), **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), image_size=size, channels=3, mean=[0.5] * 3,
                      std=[0.25] * 3, val_size=2, val_pick="first", allow_rare_classes=True, **kw)


def test_jpegs_nvjpeg_takes_travel_as_bytes_the_rest_as_cpu_pixels(kinds):
    c = cfg(kinds)
    train = build_splits(c).train
    images = EncodedImages(train, Preprocess.from_data(c))
    batch, labels, positions = images.__getitems__(list(range(len(train))))
    names = [Path(train.describe(train.indices[k])).name for k in range(len(train))]
    as_bytes = {name for name, item in zip(names, batch.items) if isinstance(item, bytes)}
    as_pixels = {name for name, item in zip(names, batch.items) if isinstance(item, torch.Tensor)}
    assert as_bytes == {"rgb2.jpg", "rgb3.jpg", "rgb4.jpg", "zgray.jpg"}  # rgb0, rgb1 are the carved val images
    assert as_pixels == {"png0.png", "png1.png", "png2.png", "cmyk.jpg", "turned.jpg"}
    assert positions.tolist() == list(range(len(train))) and labels.tolist() == [train.label(k) for k in
                                                                                   range(len(train))]


@pytest.mark.parametrize("channels", [1, 3])
def test_a_batch_decoded_with_torchcodec_equals_the_cpu_path_without_a_resize(kinds, channels):
    c = cfg(kinds).model_copy(update={"channels": channels, "mean": [0.5] * channels, "std": [0.25] * channels})
    train, pre = build_splits(c).train, Preprocess.from_data(c)
    positions = torch.arange(len(train))
    encoded, _, _ = EncodedImages(train, pre).__getitems__(positions.tolist())
    expected, _ = DecodingImages(train, pre, "train").batch(positions)
    got = decode_batch(encoded, torch.device("cpu"), (24, 24), pre)
    assert torch.equal(got, expected)


def test_a_resize_on_the_device_stays_within_rounding_of_the_cpu_path(kinds):
    c = cfg(kinds, size=(16, 16))
    train, pre = build_splits(c).train, Preprocess.from_data(c)
    positions = torch.arange(len(train))
    encoded, _, _ = EncodedImages(train, pre).__getitems__(positions.tolist())
    got = decode_batch(encoded, torch.device("cpu"), (16, 16), pre)
    expected, _ = DecodingImages(train, pre, "train").batch(positions)
    assert got.shape == expected.shape == (len(train), 3, 16, 16) and got.dtype == torch.uint8
    assert (got.float() - expected.float()).abs().mean() < 2.0


def test_the_train_dataset_decodes_where_its_positions_are(kinds):
    c = cfg(kinds, decode="gpu")
    datasets = make_datasets(build_splits(c), c, seed=0)
    cpu = make_datasets(build_splits(cfg(kinds)), cfg(kinds), seed=0)
    assert isinstance(datasets["train"].pixels, EncodedImages)
    assert not isinstance(datasets["val"].pixels, EncodedImages)  # eval keeps imgcls-predict's pixels
    batch, _, positions = datasets["train"].__getitems__([0, 3, 5])
    assert isinstance(batch, EncodedBatch)
    expected = cpu["train"].model_input(*cpu["train"].__getitems__([0, 3, 5])[::2])
    assert torch.equal(datasets["train"].model_input(batch, positions), expected)


def test_gpu_decode_needs_cache_none(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{tmp_path}"')
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ['data.decode="gpu"', 'data.cache="memory"'])
    assert ("decode = 'gpu' decodes the files of each batch on the device: it needs cache = 'none' (a 'memory' "
            "store already holds decoded pixels)") in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_decode_without_cuda_is_refused_before_anything_starts(image_folder, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    assert train_main([str(recipe), 'data.decode="gpu"']) == 2
    err = capsys.readouterr().err
    assert ('error: data.decode = "gpu" decodes training JPEGs with nvJPEG on a CUDA device, and this process '
            'computes on cpu: no CUDA device here (torch.cuda.is_available() is False). Use data.decode = "cpu" '
            '(the default: DataLoader workers decode), or run on a CUDA machine.') in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_batch_matches_the_cpu_decode_closely(kinds):
    c = cfg(kinds)
    train, pre = build_splits(c).train, Preprocess.from_data(c)
    encoded, _, _ = EncodedImages(train, pre).__getitems__(list(range(len(train))))
    on_gpu = decode_batch(encoded, torch.device("cuda"), (24, 24), pre).cpu()
    on_cpu = decode_batch(encoded, torch.device("cpu"), (24, 24), pre)
    assert (on_gpu.float() - on_cpu.float()).abs().mean() < 1.0  # nvJPEG's IDCT differs from libjpeg-turbo's
