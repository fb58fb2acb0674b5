"""What the tests under tests/gpu share: the `cuda` marker with its skip, tiny recipes on the fixtures' image
folder, and reading a run's files. These tests have never run on the machines imgcls is developed on (no GPU);
docs/gpu.md says how to run them (benchmarks/gpu_suite.py runs them with a time budget)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_recipe

NO_CUDA = ("no CUDA device here (torch.cuda.is_available() is False); tests/gpu runs on a GPU machine: "
           "python benchmarks/gpu_suite.py, see docs/gpu.md")
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def tiny_recipe(tmp_path: Path, image_folder: Path, runs: str, train: str = "", data: str = "",
                augment: str = "crop_padding = 2\nhflip = 0.5", dropout: float = 0.2) -> Path:
    """conftest's tiny recipe (160 train images, batch 16: 10 steps per epoch, 3 epochs) with dropout and
    augmentation on (so RNG state and data position both matter), a checkpoint every 3 steps; `train` lines go
    into [train], `data` lines into [data]."""
    recipe = write_recipe(tmp_path / f"{runs}.toml", f'source = "folder"\nroot = "{image_folder}"\n{data}',
                          "every_steps = 3\nkeep_last = 3", output_dir=tmp_path / runs, augment=augment)
    text = recipe.read_text().replace("dropout = 0.0", f"dropout = {dropout}")
    recipe.write_text(text.replace("[train]", f"[train]\n{train}"))
    return recipe


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over all floating tensors of two state dicts (same keys)."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def python() -> str:
    return sys.executable
