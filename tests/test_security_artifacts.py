"""Artifacts and exports may come from anyone (#20): imgcls-export never loads a TorchScript or torch.export file
it did not write in this process, and an artifact whose class names do not fit its model is refused at load."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_class_folders, write_recipe
from imgcls.data.classnames import check_class_names
from imgcls.data.transforms import Preprocess
from imgcls.inference.evaluate import main as eval_main
from imgcls.inference.export import main as export_main
from imgcls.inference.predict import main as predict_main
from imgcls.inference.predictor import META_KEY
from imgcls.models.registry import build_model
from imgcls.recipe import load_recipe, recipe_to_toml
from imgcls.inference.artifact import save_artifact
from imgcls.errors import ClassNameError

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


# ---------------------------------------------------------------- class names that do not fit the model (#20.19)
def _with_names(artifact: Path, dest: Path, names: list) -> Path:
    copy = Path(shutil.copytree(artifact, dest, ignore=shutil.ignore_patterns("export", "eval")))
    config = json.loads((copy / "config.json").read_text())
    config["class_names"] = names
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_duplicate_class_names_are_refused():
    with pytest.raises(ClassNameError) as info:
        check_class_names(["cat", "dog", "cat"], "labels.txt")
    assert str(info.value) == ("labels.txt: class name 'cat' is listed twice (positions 0 and 2); each class needs "
                               "its own name")


def test_an_artifact_with_a_duplicate_class_name_is_refused_at_load(artifact, tmp_path, capsys):
    bad = _with_names(artifact, tmp_path / "bad", ["a", "b", "a", "d"])
    assert predict_main([str(bad), str(artifact.parents[1] / "imgs" / "val")]) == 2
    assert capsys.readouterr().err == (f"error: {bad / 'config.json'}: class name 'a' is listed twice (positions 0 "
                                       f"and 2); each class needs its own name\n")


def test_an_artifact_with_fewer_class_names_than_outputs_is_refused_at_load(artifact, tmp_path, capsys):
    bad = _with_names(artifact, tmp_path / "bad", ["a", "b"])
    out = tmp_path / "out.csv"
    assert predict_main([str(bad), str(artifact.parents[1] / "imgs" / "val"), "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {bad}: the model has 4 outputs but config.json lists 2 class names; an artifact needs one class "
        f"name per output\n")
    assert not out.exists()
    assert export_main([str(bad), "--format", "onnx", "--out", str(tmp_path / "export")]) == 2
    assert "the model has 4 outputs but config.json lists 2 class names" in capsys.readouterr().err


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d", "e", "f"]])
def test_imgcls_eval_refuses_an_artifact_whose_class_names_do_not_fit_its_outputs(artifact, tmp_path, capsys, names):
    bad = _with_names(artifact, tmp_path / "bad", names)
    out = tmp_path / "eval"
    assert eval_main([str(bad), "--data", str(artifact.parents[1] / "imgs" / "val"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {bad}: the model has 4 outputs but config.json lists {len(names)} class names; an artifact needs "
        f"one class name per output\n")
    assert not out.exists()


def test_imgcls_eval_refuses_weights_that_are_not_safetensors(artifact, tmp_path, capsys):
    bad = Path(shutil.copytree(artifact, tmp_path / "bad", ignore=shutil.ignore_patterns("export", "eval")))
    (bad / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors")
    assert eval_main([str(bad), "--data", str(artifact.parents[1] / "imgs" / "val"),
                      "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad / 'model.safetensors'}: not the weights of the model its config.json "
                          f"describes (") and err.count("\n") == 1


def test_an_onnx_file_with_fewer_class_names_than_outputs_is_refused(artifact, tmp_path, capsys):
    import onnx

    out = tmp_path / "export"
    assert export_main([str(artifact), "--format", "onnx", "--out", str(out), "--parity-images", "4"]) == 0
    proto = onnx.load(str(out / "model.onnx"))
    entry = next(e for e in proto.metadata_props if e.key == META_KEY)
    entry.value = json.dumps({**json.loads(entry.value), "class_names": ["a", "b"]})
    onnx.save(proto, str(tmp_path / "two.onnx"))
    capsys.readouterr()
    assert predict_main([str(tmp_path / "two.onnx"), str(artifact.parents[1] / "imgs" / "val")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'two.onnx'}: the model has 4 outputs but its metadata {META_KEY!r} lists 2 class "
        f"names; an exported model needs one class name per output\n")


# ---------------------------------------------------------------- file names that are not UTF-8 (#20.17)
def test_a_file_name_that_is_not_utf8_is_written_and_sorted(artifact, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = b"\xe9t\xe9.png"  # Latin-1 bytes: a name no UTF-8 decoder accepts
    shutil.copy(next((artifact.parents[1] / "imgs" / "val" / "a").iterdir()), os.path.join(os.fsencode(folder), raw))
    shutil.copy(next((artifact.parents[1] / "imgs" / "val" / "b").iterdir()), folder / "plain.png")
    out, dest = tmp_path / "out.csv", tmp_path / "sorted"
    assert predict_main([str(artifact), str(folder), "--output", str(out), "--sort-into", str(dest)]) == 0
    rows = out.read_bytes().splitlines()
    assert sorted(row.split(b",")[0] for row in rows[1:]) == [os.fsencode(folder / "plain.png"),
                                                             os.fsencode(folder) + b"/" + raw]
    sorted_files = sorted(p.name for p in os.scandir(os.fsencode(dest)) for p in os.scandir(p.path))
    assert sorted_files == sorted([raw, b"plain.png"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_an_artifact_whose_weights_do_not_fit_its_config_is_refused_at_load(artifact, tmp_path, capsys):
    bad = _with_names(artifact, tmp_path / "bad", CLASSES)
    other = untrained_artifact(tmp_path / "three", ["x", "y", "z"])
    shutil.copy(other / "model.safetensors", bad / "model.safetensors")  # a 3-class head in a 4-class artifact
    assert predict_main([str(bad), str(artifact.parents[1] / "imgs" / "val")]) == 2
    assert capsys.readouterr().err == (
        f"error: {bad / 'model.safetensors'}: not the weights of the model its config.json describes (Error(s) in "
        f"loading state_dict for SmallCNN: size mismatch for head.weight: copying a param with shape "
        f"torch.Size([3, 16]) from checkpoint, the shape in current model is torch.Size([4, 16]). size mismatch for "
        f"head.bias: copying a param with shape torch.Size([3]) from checkpoint, the shape in current model is "
        f"torch.Size([4]).)\n")
