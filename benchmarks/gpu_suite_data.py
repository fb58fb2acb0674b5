"""Data for benchmarks/gpu_suite.py: the 448-px photo folder made from CIFAR-10 (a real JPEG decode cost), and
the tiny stand-ins that `--smoke` trains on (the shipped recipes, pointed at a few generated images)."""
from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [f"c{k}" for k in range(10)]


def _write_photo(job: tuple[bytes, str, int]) -> None:
    data, path, size = job
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)


def photo_folder(parquet_files: list[Path], out: Path, n: int, size: int, val_fraction: float = 0.1) -> Path:
    """`n` images of the CIFAR-10 parquet files (columns img, label), upscaled to `size` px JPEGs in
    out/{train,val}/<label>/; every 1/val_fraction-th image of each class goes to val. Done once: an existing folder is kept."""
    done = out / ".complete"
    if done.exists():
        return out
    import pyarrow.parquet as pq

    jobs, every, seen = [], round(1 / val_fraction), {}
    for f in parquet_files:
        table = pq.read_table(f, columns=["img", "label"]).to_pylist()
        for row in table[: n - len(jobs)]:
            seen[row["label"]] = seen.get(row["label"], -1) + 1
            split = "val" if seen[row["label"]] % every == 0 else "train"
            folder = out / split / f"c{row['label']}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((row["img"]["bytes"], str(folder / f"{len(jobs):05d}.jpg"), size))
        if len(jobs) >= n:
            break
    with ProcessPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        list(pool.map(_write_photo, jobs, chunksize=64))
    done.write_text(f"{len(jobs)} images at {size} px\n")
    return out


def _picture(label: int, size: int, channels: int, rng: np.random.Generator) -> Image.Image:
    """Noise plus a bright band whose place says the class: learnable, and cheap to make."""
    a = rng.integers(0, 80, (size, size, channels), dtype=np.uint8)
    band = max(size // 10, 1)
    a[(label * band) % size:(label * band) % size + band] = 230
    return Image.fromarray(a[..., 0] if channels == 1 else a, "L" if channels == 1 else "RGB")


def hub_layout(root: Path, size: int, channels: int, image_column: str, counts: dict[str, int]) -> Path:
    """A local folder in hub layout (data/<split>-00000-of-00001.parquet), 10 ClassLabel classes: what
    `data.dataset = "<folder>"` loads as it loads ylecun/mnist or uoft-cs/cifar10."""
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({image_column: datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, n in counts.items():
        labels = [k % 10 for k in range(n)]
        images = [_picture(k, size, channels, rng) for k in labels]
        ds = datasets.Dataset.from_dict({image_column: images, "label": labels}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def smoke_data(out: Path) -> dict[str, Path]:
    """Tiny MNIST- and CIFAR-shaped hub folders, and a photo folder made from the CIFAR-shaped one."""
    mnist = hub_layout(out / "mnist", 28, 1, "image", {"train": 120, "test": 40})
    cifar = hub_layout(out / "cifar10", 32, 3, "img", {"train": 120, "test": 40})
    photos = photo_folder(sorted((cifar / "data").glob("train-*.parquet")), out / "photos", 100, 64)
    return {"mnist": mnist, "cifar10": cifar, "photos": photos}


def main(argv=None) -> int:
    """python benchmarks/gpu_suite_data.py OUT [--n 2000] [--size 224] [--shared ../shared]: a photo folder."""
    import argparse

    p = argparse.ArgumentParser(description="a folder of CIFAR-10 images upscaled to SIZE-px JPEGs, "
                                            "OUT/{train,val}/<class>/ (one in ten of each class in val)")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = p.parse_args(argv)
    files = sorted((args.shared / "data" / "cifar10" / "plain_text").glob("train-*.parquet"))
    if not files:
        p.error(f"no CIFAR-10 parquet files under {args.shared}/data/cifar10/plain_text")
    print(photo_folder(files, args.out, args.n, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
