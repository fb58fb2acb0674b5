"""How close the trainer comes to its own model's speed: the recipe's model in a bare loop on tensors already in
memory (the ceiling) against the trainer on the recipe, interleaved A, B, A, B in one run. The bare loop takes
the recipe's `train.channels_last` and `train.mixed_precision = "bf16"` (CPU autocast) as the trainer does.

    HF_HUB_OFFLINE=1 python benchmarks/ceiling.py recipes/mnist.toml [section.key=value ...] [--rounds 2]
        [--steps 150] [--threads N]

Both run in a fresh process each (so neither inherits the other's threads, allocator or warm caches). The
trainer runs as a user runs it (`python -m imgcls.train RECIPE train.max_steps=S ...`, one process, the
same thread count as the bare loop); its speed is the median `images_per_s` of its metrics.jsonl windows after
the first (start-up and the first batches excluded), which includes every wait for data. The bare loop builds the
same model, optimizer, batch size and loss, on random tensors created once, and times S steps after 10 warm-up
steps. Prints both speeds per round and the ratio trainer / ceiling; the machine drifts, so only ratios taken in
the same round are compared. Writes benchmarks/out/ceiling_<name>.json.

CPU only. `imgcls-doctor` (imgcls/training/doctor.py) answers the same question on any device, in one process,
and adds the input pipeline alone; this script stays as the independent reference it is checked against, with
its own bare loop and the trainer run as a user runs it: benchmarks/doctor_vs_ceiling.py runs both interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from imgcls.data.loaders import build_splits
from imgcls.models.registry import build_model
from imgcls.training.optim import build_optimizer
from imgcls.recipe import load_recipe


def bare_loop(recipe, num_classes: int, steps: int, threads: int) -> float:
    """Images/s of forward + backward + optimizer step on one in-memory batch, the recipe's own model."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data, batch = recipe.data, recipe.train.global_batch_size // recipe.train.grad_accum_steps
    model = build_model(recipe.model, num_classes, data.channels, tuple(data.image_size)).train()
    images = torch.randn(batch, data.channels, *data.image_size)
    if recipe.train.channels_last:  # as the recipe trains
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    optimizer = build_optimizer(recipe.optim, model)
    labels = torch.randint(0, num_classes, (batch,))
    bf16 = recipe.train.mixed_precision == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.train.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(10):
        step()
    # windows of the trainer's log interval, and their median, as the trainer's speed is read (`trainer` below):
    # a mean over all steps against the trainer's median put the "ceiling" below the trainer (ratios 1.14-1.27)
    every, speeds = max(steps // 8, 5), []
    for _ in range(max(steps // every, 1)):
        start = time.perf_counter()
        for _ in range(every):
            step()
        speeds.append(every * batch / (time.perf_counter() - start))
    return statistics.median(speeds)


def bare_loop_process(recipe_path: str, overrides: list[str], steps: int, threads: int) -> float:
    cmd = [sys.executable, __file__, recipe_path, *overrides, "--bare", "--steps", str(steps), "--threads",
           str(threads)]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def trainer(recipe_path: str, overrides: list[str], steps: int, threads: int, out: Path) -> tuple[float, float]:
    """Median images/s and data-wait fraction of the trainer's logged windows after the first."""
    every = max(steps // 8, 5)
    cmd = [sys.executable, "-m", "imgcls.train", recipe_path, *overrides, f"train.max_steps={steps}",
           f"train.log_every_steps={every}", f"train.cpu_threads={threads}", f"checkpoint.output_dir={out}",
           "train.calibrate=false", "tracking.plots=false", "checkpoint.every_epochs=0", "name=ceiling"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run,) = (out / "ceiling").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r["event"] == "train"][1:]
    return (statistics.median(r["images_per_s"] for r in windows),
            statistics.median(r["data_wait_fraction"] for r in windows))


def round_args(doc: str, steps: int) -> argparse.ArgumentParser:
    """The arguments every interleaved bare-loop benchmark takes: recipe, overrides, rounds, steps, threads."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    return p


def write_rounds(kind: str, name: str, args: argparse.Namespace, rows: list[dict]) -> None:
    """benchmarks/out/<kind>_<recipe name>.json: the command's arguments and every round."""
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"{kind}_{name}.json").write_text(json.dumps(
        {"recipe": args.recipe, "overrides": args.overrides, "threads": args.threads, "rounds": rows}, indent=2))


def main(argv=None) -> int:
    p = round_args(__doc__, steps=150)
    p.add_argument("--bare", action="store_true", help="only the bare loop, in this process; prints images/s")
    args = p.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.bare:
        num_classes = len(build_splits(recipe.data).class_names)
        print(bare_loop(recipe, num_classes, args.steps, args.threads))
        return 0
    rows = []
    for k in range(args.rounds):
        ceiling = bare_loop_process(args.recipe, args.overrides, args.steps, args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            speed, wait = trainer(args.recipe, args.overrides, args.steps, args.threads, Path(tmp))
        rows.append({"round": k, "ceiling": ceiling, "trainer": speed, "ratio": speed / ceiling,
                     "data_wait_fraction": wait})
        print(f"round {k}: ceiling {ceiling:,.0f} images/s, trainer {speed:,.0f} images/s, ratio "
              f"{speed / ceiling:.2f} (data wait {wait:.2f})", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"{recipe.name}: ratio trainer / ceiling {min(ratios):.2f}-{max(ratios):.2f} over {args.rounds} rounds, "
          f"{args.threads} threads, {args.steps} steps each")
    write_rounds("ceiling", recipe.name, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
