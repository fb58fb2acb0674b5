"""The input path on a CUDA device: nvJPEG decode against the CPU decode, the augmentation's per-sample
parameters and pixels on CUDA against the CPU's, and a whole run with data.decode = "gpu".

Never run on the machines imgcls is developed on (no GPU): see docs/gpu.md."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_class_folders
from gpu_common import CUDA, read_json, tiny_recipe
from helpers import only_run, run_train
from imgcls.data.augment import BatchAugment, counter_uniform
from imgcls.data.gpu_decode import EncodedImages, decode_batch
from imgcls.data.loaders import build_splits
from imgcls.data.store import DecodingImages
from imgcls.data.transforms import Preprocess
from imgcls.recipe import AugmentConfig, DataConfig

pytestmark = CUDA
CUDA_DEVICE = torch.device("cuda")


def photo(seed: int, size: int = 64) -> Image.Image:
    """Smooth colour gradients plus mild noise: JPEG blocks with real content, not only flat or random ones."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(100, 250, 3)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def jpegs(tmp_path) -> Path:
    """2 classes x 8 JPEGs, 4:4:4 (no chroma subsampling: the decoders' chroma upsampling is not compared)."""
    for label in ("a", "b"):
        folder = tmp_path / "jpegs" / "train" / label
        folder.mkdir(parents=True)
        for i in range(8):
            photo(10 * (label == "b") + i).save(folder / f"{i}.jpg", quality=90, subsampling=0)
    return tmp_path / "jpegs"


def folder_cfg(root: Path, channels: int = 3) -> DataConfig:
    return DataConfig(source="folder", root=str(root), image_size=(64, 64), channels=channels,
                      mean=[0.5] * channels, std=[0.25] * channels, val_size=2, val_pick="first",
                      allow_rare_classes=True)


@pytest.mark.parametrize("channels", [3, 1])
def test_nvjpeg_decode_is_within_idct_rounding_of_the_cpu_decode(jpegs, channels):
    """nvJPEG's inverse DCT is not libjpeg-turbo's (PIL's): a level or two per pixel, never a different image."""
    pytest.importorskip("torchcodec.decoders", reason="data.decode = 'gpu' needs torchcodec (imgcls[gpu-decode])")
    c = folder_cfg(jpegs, channels)
    train, pre = build_splits(c).train, Preprocess.from_data(c)
    positions = torch.arange(len(train))
    encoded, _, _ = EncodedImages(train, pre).__getitems__(positions.tolist())
    assert all(isinstance(item, bytes) for item in encoded.items)  # every one goes to nvJPEG
    on_gpu = decode_batch(encoded, CUDA_DEVICE, (64, 64), pre)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == (len(train), channels, 64, 64)
    on_cpu, _ = DecodingImages(train, pre, "train").batch(positions)
    diff = (on_gpu.cpu().float() - on_cpu.float()).abs()
    assert diff.mean().item() < 0.5 and diff.max().item() <= 6


FULL = AugmentConfig(random_resized_crop=True, rotation=15.0, hflip=0.5, color_jitter=0.4,
                     auto_augment="randaugment", random_erasing=0.25)


def test_augmentation_parameters_on_cuda_equal_the_cpu_ones():
    """The uniforms are integer hashes until one exact conversion: equal bits. The parameters made of them
    (a resized-crop box through exp and sqrt in float64, angles, factors) equal, floats to float64 rounding."""
    index = torch.arange(4096, dtype=torch.int64) * 7 + 3
    assert torch.equal(counter_uniform(5, 2, index.to(CUDA_DEVICE), 3, 22).cpu(), counter_uniform(5, 2, index, 3, 22))
    aug = BatchAugment(FULL, (32, 32), 3, [0.5] * 3, [0.25] * 3, "bilinear")
    cpu = aug.params(index, epoch=2, seed=5, in_size=(48, 40))
    gpu = aug.params(index.to(CUDA_DEVICE), epoch=2, seed=5, in_size=(48, 40))
    for name in ("box", "angle", "flip", "jitter", "policy_ops", "policy_magnitude", "erase"):
        a, b = getattr(cpu, name), getattr(gpu, name)
        assert b.device.type == "cuda", name
        if a.is_floating_point():
            torch.testing.assert_close(b.cpu(), a, rtol=1e-12, atol=0, msg=name)
        else:
            assert torch.equal(b.cpu(), a), name


def test_augmented_pixels_on_cuda_equal_the_cpu_ones_to_float32_rounding():
    """Same uint8 batch, same parameters: resampling, rotation and jitter in float32 on either device."""
    aug_cfg = AugmentConfig(random_resized_crop=True, rotation=15.0, hflip=0.5, color_jitter=0.4)
    aug = BatchAugment(aug_cfg, (32, 32), 3, [0.5] * 3, [0.25] * 3, "bilinear")
    images = torch.randint(0, 256, (64, 3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    index = torch.arange(64, dtype=torch.int64)
    on_cpu = aug(images, index, 1, 0)
    on_gpu = aug(images.to(CUDA_DEVICE), index.to(CUDA_DEVICE), 1, 0)
    assert on_gpu.shape == on_cpu.shape == (64, 3, 32, 32)
    assert (on_gpu.cpu() - on_cpu).abs().max().item() <= 1e-4  # values in about [-2, 2] after normalize


def test_a_run_with_gpu_decode_trains_on_the_device(tmp_path):
    pytest.importorskip("torchcodec.decoders", reason="data.decode = 'gpu' needs torchcodec (imgcls[gpu-decode])")
    root = tmp_path / "photos"
    for split, n, seed in (("train", 40, 0), ("val", 10, 1), ("test", 10, 2)):
        write_class_folders(root / split, ["a", "b", "c", "d"], n, seed=seed, exts=(".jpg",), mode="RGB")
    recipe = tiny_recipe(tmp_path, root, "a", data='decode = "gpu"')
    done = run_train(recipe)
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path / "a")
    assert read_json(run / "env.json")["device"].startswith("cuda")
    assert read_json(run / "results.json")["test"]["top1"] >= 0.9  # 4 classes: chance is 0.25
