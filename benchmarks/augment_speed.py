"""Train-time augmentation speed on CPU: BatchAugment on a whole uint8 batch vs today's per-image path.

    python benchmarks/augment_speed.py
    python benchmarks/augment_speed.py --batch 256 --rounds 20 --threads 2

For a [B,3,32,32] and a [B,1,28,28] batch of random pixels, and two augmentation settings each (the recipes'
light one, and every op on), times `BatchAugment(images, index, epoch, seed)` against
`Preprocess.train_transform(aug)` (torchvision v2 Compose) applied image by image to the same pixels as PIL
images (what the dataset hands it today) and stacked, as the DataLoader's collate does. The per-image
generator seeding of ImageDataset is left out. The two are timed interleaved (A, B, A, B, ...) so load on a
shared machine hits both alike; prints the median images/s of each as a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from imgcls.data.augment import BatchAugment
from imgcls.recipe import AugmentConfig
from imgcls.data.transforms import Preprocess

CASES = [  # name, (channels, size), augment settings
    ("cifar-like 3x32x32, pad 4 + flip", (3, 32), AugmentConfig(crop_padding=4, hflip=0.5)),
    ("cifar-like 3x32x32, every op", (3, 32), AugmentConfig(random_resized_crop=True, crop_padding=4, hflip=0.5,
                                                             rotation=15.0, color_jitter=0.4)),
    ("mnist-like 1x28x28, pad 2", (1, 28), AugmentConfig(crop_padding=2)),
    ("mnist-like 1x28x28, every op", (1, 28), AugmentConfig(random_resized_crop=True, crop_padding=2, hflip=0.5,
                                                             rotation=15.0, color_jitter=0.4)),
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(channels: int, size: int, aug: AugmentConfig, batch: int, rounds: int) -> tuple[float, float]:
    pre = Preprocess((size, size), channels, (0.5,) * channels, (0.25,) * channels, "bilinear")
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    index = torch.arange(batch)
    pil = [Image.fromarray(im.permute(1, 2, 0).squeeze(-1).numpy(), pre.mode) for im in images]
    batched, per_image = BatchAugment.from_preprocess(aug, pre), pre.train_transform(aug)
    epoch = iter(range(10 ** 9))

    def a():
        batched(images, index, next(epoch), 0)

    def b():
        torch.stack([per_image(im) for im in pil])

    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(rounds):
        times_a.append(timed(a))
        times_b.append(timed(b))
    return batch / statistics.median(times_a), batch / statistics.median(times_b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10, help="timed A,B pairs per case (the median is reported)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}, median of {args.rounds}\n")
    print("| case | BatchAugment images/s | per-image v2 images/s | speed-up |\n|---|---:|---:|---:|")
    for name, (channels, size), aug in CASES:
        fast, slow = run_case(channels, size, aug, args.batch, args.rounds)
        print(f"| {name} | {fast:,.0f} | {slow:,.0f} | {fast / slow:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
