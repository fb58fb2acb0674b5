"""Speed options change the memory layout or the kernels, never the numbers: one epoch with
`train.channels_last` / `train.compile` gives the losses of a plain run (to 1e-5 relative)."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import write_recipe
from helpers import metrics_rows, only_run, train_inprocess, weights
from imgcls.models.registry import SmallCNN

pytestmark = pytest.mark.slow


def _run(tmp_path, image_folder, runs: str, *overrides: str) -> list[dict]:
    data = f'source = "folder"\nroot = "{image_folder}"'
    recipe = write_recipe(tmp_path / f"{runs}.toml", data, output_dir=tmp_path / runs)
    # 3 channels: with 1, the channels_last layout of a batch is the default one
    text = recipe.read_text().replace("channels = 1", "channels = 3")
    recipe.write_text(text.replace("mean = [0.5]\nstd = [0.25]", "mean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]"))
    assert train_inprocess(recipe, "train.epochs=1", "train.log_every_steps=1", "train.calibrate=false",
                           *overrides) == 0
    return [r for r in metrics_rows(only_run(tmp_path / runs)) if r["event"] in ("train", "val", "test")]


def _assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [(r["event"], r["step"]) for r in a] == [(r["event"], r["step"]) for r in b]
    assert len(a) == 12  # 10 train steps, val, test
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=0), (x["event"], x["step"])


def test_channels_last_gives_the_losses_of_the_default_layout(tmp_path, image_folder, monkeypatch):
    plain = _run(tmp_path, image_folder, "a")
    layouts = []
    original = SmallCNN.forward

    def forward(self, x):  # what the model is given in training
        if self.training:
            conv = next(p for p in self.parameters() if p.dim() == 4)
            layouts.append([t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                            for t in (x, conv)])
        return original(self, x)
    monkeypatch.setattr(SmallCNN, "forward", forward)
    _assert_same_losses(plain, _run(tmp_path, image_folder, "b", "train.channels_last=true"))
    assert layouts == [[True, True]] * 10


def test_compile_without_a_compiler_is_a_clear_error(tmp_path, image_folder, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    data = f'source = "folder"\nroot = "{image_folder}"'
    recipe = write_recipe(tmp_path / "r.toml", data, output_dir=tmp_path / "runs")
    assert train_inprocess(recipe, "train.compile=true") == 2
    assert ("error: train.compile = true: torch.compile on the CPU generates C++ and needs a compiler (g++ or "
            "clang++ on PATH, or CXX=<compiler>); none was found. Install one, or set train.compile = false"
            ) in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++/c++), not found on this machine")
def test_compile_gives_the_losses_of_eager_mode(tmp_path, image_folder):
    plain = _run(tmp_path, image_folder, "a")
    _assert_same_losses(plain, _run(tmp_path, image_folder, "b", "train.compile=true"))
    assert set(weights(only_run(tmp_path / "b") / "model" / "best")) == \
        set(weights(only_run(tmp_path / "a") / "model" / "best"))  # the plain model's names: no "_orig_mod."
