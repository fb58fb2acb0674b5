"""The loader alone: images/s of imgcls's input path against torchvision's `ImageFolder` + `DataLoader` on the same
class-folder tree with the same augmentation (pad-4 random crop + horizontal flip, normalize), interleaved
A, B, A, B in one run. No model: this is the rate at which each path can feed one.

    python benchmarks/loader.py /tmp/cifar10_folder [--size 32] [--batches 150] [--workers 2] [--rounds 2]

torchvision: PIL decode + v2 transforms per image in `--workers` worker processes, float32 batches.
imgcls, cache "none": decode + resize to the working size in the workers, uint8 batches, then the batched
per-sample augmentation (`Images.model_input`) in the main process, as the trainer does.
imgcls, cache "memory": the same, from the uint8 store (filled once before timing; the fill time is printed).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from imgcls.data.loaders import build_splits, make_datasets, make_loader
from imgcls.recipe import AugmentConfig, DataConfig

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def rate(batches, count: int, step=lambda batch: batch) -> float:
    """Images/s over `count` batches after 5 warm-up batches (worker start-up excluded)."""
    it = iter(batches)
    for batch in itertools.islice(it, 5):
        step(batch)
    start, images = time.perf_counter(), 0
    for batch in itertools.islice(it, count):
        images += len(step(batch)[0])
    return images / (time.perf_counter() - start)


def torchvision_loader(root: str, size: int, workers: int) -> DataLoader:
    transform = v2.Compose([v2.ToImage(), v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    dataset = ImageFolder(f"{root}/train", transform=transform)
    return DataLoader(dataset, batch_size=128, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0)


def imgcls_loader(root: str, size: int, workers: int, cache: str):
    cfg = DataConfig(source="folder", root=root, image_size=(size, size), channels=3, mean=MEAN, std=STD,
                     cache=cache, workers=workers, augment=AugmentConfig(crop_padding=4, hflip=0.5))
    start = time.perf_counter()
    train = make_datasets(build_splits(cfg), cfg, seed=0)["train"]
    ready = time.perf_counter() - start
    loader = make_loader(train, 128, cfg, train=True, seed=0)
    return loader, (lambda batch: (train.model_input(batch[0], batch[2]), batch[1])), ready


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    tv = torchvision_loader(args.root, args.size, args.workers)
    ours_files, step_files, ready_files = imgcls_loader(args.root, args.size, args.workers, "none")
    ours_mem, step_mem, ready_mem = imgcls_loader(args.root, args.size, 0, "memory")
    print(f"imgcls set-up: cache none {ready_files:.1f} s (index + image check), cache memory {ready_mem:.1f} s "
          f"(+ decode into the store)")
    for k in range(args.rounds):
        a = rate(tv, args.batches)
        b = rate(ours_files, args.batches, step_files)
        c = rate(ours_mem, args.batches, step_mem)
        print(f"round {k}: torchvision ImageFolder {a:,.0f} images/s | imgcls files {b:,.0f} ({b / a:.2f}x) | "
              f"imgcls memory {c:,.0f} ({c / a:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
