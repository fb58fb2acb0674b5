"""The input path's guarantee: the pixels a training sample gets depend only on (seed, epoch, sample), never on
batch size, DataLoader workers, the number of processes, the cache mode or a resume; evaluation pixels are
today's eval transform, bit for bit."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from conftest import write_class_folders
from helpers import subprocess_env
from imgcls.data.loaders import build_splits, make_datasets, make_loader
from imgcls.recipe import AugmentConfig, DataConfig
from imgcls.data.transforms import Preprocess

SAMPLE, EPOCH = 5, 1
AUGMENT = AugmentConfig(crop_padding=2, hflip=0.5, rotation=10.0, color_jitter=0.3)


WORKING = [24, 24]  # stored train size: the 64 px images are resized, and the JPEGs (>= 2x) decoded in draft mode


@pytest.fixture
def rgb_folder(tmp_path):
    root = tmp_path / "imgs"
    for split, n in (("train", 40), ("val", 10)):
        write_class_folders(root / split, ["a", "b", "c", "d"], n, size=64, seed=len(split), mode="RGB",
                            exts=(".png", ".jpg"))
    return root


def _config(root, tmp_path, cache: str, workers: int = 0) -> DataConfig:
    return DataConfig(source="folder", root=str(root), image_size=(16, 16), channels=3, cache=cache,
                      cache_dir=str(tmp_path / "cache"), workers=workers, augment=AUGMENT, working_size=WORKING)


def _sample_pixels(cfg: DataConfig, batch: int) -> dict[int, torch.Tensor]:
    """Model input of every training sample at EPOCH, fetched through the loader in shuffled batches."""
    train = make_datasets(build_splits(cfg), cfg, seed=0)["train"]
    train.set_augment_epoch(EPOCH)
    loader = make_loader(train, batch, cfg, train=True, seed=0)
    seen = {}
    for images, labels, positions in loader:
        assert images.dtype == torch.uint8  # uint8 crosses the worker boundary: a quarter of float32's bytes
        for row, k in zip(train.model_input(images, positions), positions.tolist()):
            seen[k] = row
    return seen


def test_a_samples_pixels_do_not_depend_on_batch_size_workers_or_cache(rgb_folder, tmp_path):
    cfg = _config(rgb_folder, tmp_path, "none")
    framer = make_datasets(build_splits(cfg), cfg, seed=0)["train"].pixels.framer
    assert framer.draft == (24, 24) and framer.shape == (3, 24, 24)  # the draft and resize paths run
    reference = _sample_pixels(cfg, 1)
    assert len(reference) == 160
    for cache in ("none", "memory", "disk"):
        for workers in (0, 2):
            for batch in (1, 8, 160):  # each divides 160: with drop_last, every sample is still checked
                got = _sample_pixels(_config(rgb_folder, tmp_path, cache, workers), batch)
                assert sorted(got) == list(range(160)), (cache, workers, batch)
                different = [k for k in got if not torch.equal(got[k], reference[k])]
                assert not different, (cache, workers, batch, different[:5])
    other_epoch = make_datasets(build_splits(_config(rgb_folder, tmp_path, "memory")),
                                _config(rgb_folder, tmp_path, "memory"), seed=0)["train"]
    other_epoch.set_augment_epoch(EPOCH + 1)
    assert not torch.equal(other_epoch[SAMPLE][0], reference[SAMPLE])  # the epoch does change it


def test_evaluation_pixels_are_the_eval_transform_bit_for_bit(rgb_folder, tmp_path):
    cfg = _config(rgb_folder, tmp_path, "memory")
    val = make_datasets(build_splits(cfg), cfg, seed=0)["val"]
    pre = Preprocess.from_data(cfg)
    files = sorted((rgb_folder / "val").rglob("*.*"))
    expected = torch.stack([pre.eval_transform()(pre.convert(Image.open(f))) for f in files])
    got = torch.stack([val[k][0] for k in range(len(val))])
    assert torch.equal(got, expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_each_sample_the_pixels_one_process_gives(rgb_folder, tmp_path):
    """Each process of a 2-process gloo job augments its own shard of every batch: sample k's pixels must
    equal the single-process ones."""
    script = tmp_path / "dump.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        from accelerate import Accelerator
        from imgcls.data.loaders import build_splits, make_datasets, make_loader
        from imgcls.recipe import AugmentConfig, DataConfig
        cfg = DataConfig(source="folder", root={str(rgb_folder)!r}, image_size=(16, 16), channels=3,
                         cache="memory", working_size={WORKING!r}, augment=AugmentConfig(crop_padding=2, hflip=0.5, rotation=10.0,
                         color_jitter=0.3))
        acc = Accelerator()
        train = make_datasets(build_splits(cfg), cfg, seed=0)["train"]
        train.set_augment_epoch({EPOCH})
        loader = acc.prepare(make_loader(train, 8, cfg, train=True, seed=0))
        seen = {{}}
        for images, labels, positions in loader:
            for row, k in zip(train.model_input(images, positions), positions.tolist()):
                seen[k] = row
        torch.save(seen, f"{tmp_path}/rank{{acc.process_index}}.pt")
    """))
    env = subprocess_env()
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(_free_port()), str(script)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])  # each process its own samples
    reference = _sample_pixels(_config(rgb_folder, tmp_path, "memory"), 16)
    both = {**ranks[0], **ranks[1]}
    assert len(both) == 160
    assert all(torch.equal(both[k], reference[k]) for k in both)
