"""Artifacts and exports may come from anyone (#20): imgcls-export never loads a TorchScript or torch.export file
it did not write in this process, and an artifact whose class names do not fit its model is refused at load."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import write_class_folders, write_recipe
from imgcls.data.transforms import Preprocess
from imgcls.inference.export import main as export_main
from imgcls.models.registry import build_model
from imgcls.recipe import load_recipe, recipe_to_toml
from imgcls.training.checkpoint import save_artifact

CLASSES = ["a", "b", "c", "d"]


def untrained_artifact(root: Path, class_names: list[str] = CLASSES, num_classes: int | None = None) -> Path:
    """An artifact of an untrained small_cnn (seeded) on the 16 px gray `write_recipe` data, without training."""
    write_class_folders(root / "imgs" / "train", CLASSES, 6)
    write_class_folders(root / "imgs" / "val", CLASSES, 3, seed=1)
    recipe = load_recipe(write_recipe(root / "tiny.toml", f'source = "folder"\nroot = "{root / "imgs"}"\n'
                                                          f'val_split = "val"'))
    torch.manual_seed(0)
    n = num_classes or len(class_names)
    model = build_model(recipe.model, n, recipe.data.channels, recipe.data.image_size)
    config = {"model": {"name": recipe.model.name, "args": dict(recipe.model.args), "num_classes": n,
                        "in_channels": recipe.data.channels},
              "class_names": class_names, "preprocess": Preprocess.from_data(recipe.data).to_dict(),
              "temperature": 1.0}
    dest = root / "model" / "best"
    save_artifact(dest, model, config, recipe_to_toml(recipe))
    return dest


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return untrained_artifact(tmp_path_factory.mktemp("security"))


def _refuse_loading(monkeypatch) -> list:
    """torch.jit.load / torch.export.load raise when given a path: a file on disk is never loaded. Returns the
    list of what they were given."""
    seen = []

    def guard(real):
        def load(f, *args, **kwargs):
            seen.append(f)
            if isinstance(f, (str, os.PathLike)):
                raise AssertionError(f"loaded a file from disk: {f}")
            return real(f, *args, **kwargs)
        return load
    monkeypatch.setattr(torch.jit, "load", guard(torch.jit.load))
    monkeypatch.setattr(torch.export, "load", guard(torch.export.load))
    return seen


def test_check_only_refuses_torchscript_and_torch_export_files_it_did_not_write(artifact, tmp_path, monkeypatch,
                                                                                capsys):
    out = tmp_path / "planted"
    out.mkdir()
    marker = tmp_path / "payload_ran"
    for name in ("model.torchscript.pt", "model.pt2"):  # stand-ins: no loader may even open them
        (out / name).write_bytes(b"planted by someone else " + str(marker).encode())
    seen = _refuse_loading(monkeypatch)
    code = export_main([str(artifact), "--format", "torchscript", "torch-export", "--check-only",
                        "--out", str(out), "--parity-images", "4"])
    assert code == 2 and seen == [] and not marker.exists()
    assert capsys.readouterr().err == (
        f"error: --check-only does not load {out / 'model.torchscript.pt'}, {out / 'model.pt2'}: loading a "
        f"TorchScript or torch.export file can run code stored in it, so imgcls checks those formats only right "
        f"after writing them; run imgcls-export without --check-only to write and check them anew, or re-check "
        f"the ONNX files only (--format onnx)\n")
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2", "model.torchscript.pt"]  # nothing written


def test_export_checks_the_bytes_it_wrote_never_the_file_on_disk(artifact, tmp_path, monkeypatch):
    seen = _refuse_loading(monkeypatch)
    out = tmp_path / "export"
    assert export_main([str(artifact), "--format", "torchscript", "torch-export", "--out", str(out),
                        "--parity-images", "4"]) == 0
    assert len(seen) == 2 and all(isinstance(f, io.BytesIO) for f in seen)
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and set(report["formats"]) == {"torchscript", "torch_export"}
    # what was checked is what is on disk
    on_disk = [(out / name).read_bytes() for name in ("model.torchscript.pt", "model.pt2")]
    assert [f.getvalue() for f in seen] == on_disk
