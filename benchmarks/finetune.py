"""Probe, plain fine-tune and probe-then-fine-tune side by side on one photo folder and seed: test top-1 and the
whole command's wall time (`accelerate launch -m imgcls.train ...`, start-up and the final test included).

    python benchmarks/finetune.py --root ../shared/data/flowers --weights lite0.safetensors \
        [--model timm:tf_efficientnet_lite0] [--out benchmarks/out/finetune_flowers.json] [--set key=value ...]

- probe:        recipes/probe_folder.toml (stage 1 alone: a head fitted on the frozen backbone's cached features)
- plain:        recipes/finetune_folder.toml without the probe, as one fine-tunes without it: a fresh head at
                lr 0.01, the backbone at 0.001 (backbone_lr_scale 0.1), BatchNorm statistics training; the same
                epochs, augmentation and schedule. With BatchNorm frozen, a fresh head's first gradients wreck the
                backbone: head 0.05 / backbone 0.003 and head 0.01 / backbone 0.003 both ended at chance on flowers
                (20.4 %, 20.8 % test), which is the distortion the probe's head avoids.
- probe+ft:     recipes/finetune_folder.toml as shipped (probe, then fine-tune)

`--cifar-subset DIR` (with `--cifar-per-class N`, N train images of each class instead of 50) first writes the README's 500-image CIFAR-10 subset as class folders (the first 50 train
images of each class, in the hub file's order; the first 100 test images of each class) from
../shared/data/cifar10, then runs on it (add `--set 'data.image_size=[128,128]' data.crop_pct=1.0`).

Runs one after another (never two at once on 2 cores), each with its own empty cache folder, so every run
computes its features (a cache hit would make the probe look faster than a first run). `--weights` is a
converted file (`python -m imgcls.convert ...`, carrying its preprocessing); without it the recipes' own
`pretrained = true` is used (needs the hub or its cache).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARMS = {
    "probe": ("recipes/probe_folder.toml", []),
    "plain": ("recipes/finetune_folder.toml", ["probe.enabled=false", "model.freeze_bn=false", "optim.lr=0.01",
                                               "optim.backbone_lr_scale=0.1"]),
    "probe+ft": ("recipes/finetune_folder.toml", []),
}


def run_arm(name: str, args: argparse.Namespace, work: Path) -> dict:
    recipe, extra = ARMS[name]
    model = [f"model.name={args.model}", "model.pretrained=false", f"model.weights={args.weights}"] if args.weights \
        else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-m", "imgcls.train", str(ROOT / recipe),
           f"data.root={args.root}", f"seed={args.seed}", f"checkpoint.output_dir={work / name}",
           f"data.cache_dir={work / name / 'cache'}", *model, *extra, *args.set]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    results = json.loads(next((work / name).glob("*/*/results.json")).read_text())
    return {"arm": name, "command": " ".join(cmd[2:]), "wall_s": round(wall, 1), "test_top1": results["test"]["top1"],
            "val_top1": results["val"]["top1"], "best_step": results.get("best_step"), "steps": results["steps"]}


def write_cifar_subset(out: Path, per_class: dict[str, int]) -> Path:
    """The JPEG bytes of the first n images of each class of each split, as out/<split>/<class>/<i>.jpg."""
    import pyarrow.parquet as pq

    source = ROOT.parent / "shared" / "data" / "cifar10" / "plain_text"
    names = CIFAR10_CLASSES
    for split, n in per_class.items():
        files = sorted(source.glob(f"{split}-*.parquet"))
        if not files:
            raise SystemExit(f"{source}: no {split}-*.parquet (the shared CIFAR-10 copy is needed)")
        seen = {c: 0 for c in range(len(names))}
        for f in files:
            for row in pq.read_table(f).to_pylist():
                c = row["label"]
                if seen[c] < n:
                    d = out / split / names[c]
                    d.mkdir(parents=True, exist_ok=True)
                    (d / f"{seen[c]:04d}.jpg").write_bytes(row["img"]["bytes"])
                    seen[c] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", help="the photo folder (train/ [val/] [test/] of class folders)")
    p.add_argument("--cifar-subset", default="", help="write the 500-image CIFAR-10 subset here and use it as root")
    p.add_argument("--cifar-per-class", type=int, default=50,
                   help="train images of each class in the CIFAR-10 subset (default 50: 500 images)")
    p.add_argument("--weights", default="", help="a converted .safetensors (else the recipes' pretrained = true)")
    p.add_argument("--model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--set", nargs="*", default=[], help="more overrides for every arm, e.g. data.val_fraction=0.1")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.cifar_subset:
        args.root = str(write_cifar_subset(Path(args.cifar_subset), {"train": args.cifar_per_class, "test": 100}))
    if not args.root:
        p.error("give --root or --cifar-subset")
    args.root = str(Path(args.root).resolve())
    args.weights = str(Path(args.weights).resolve()) if args.weights else ""
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgcls-finetune-") as tmp:
        for name in args.arms:
            rows.append(run_arm(name, args, Path(tmp)))
            r = rows[-1]
            print(f"{name:9s} test top1 {r['test_top1']:.4f}  val top1 {r['val_top1']:.4f}  best step "
                  f"{r['best_step']} of {r['steps']}  {r['wall_s']:.1f} s", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"root": args.root, "seed": args.seed, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
