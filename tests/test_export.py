"""imgcls-export: ONNX (fp32, fp16), TorchScript and torch.export files that match the PyTorch model on real
images read through the recipe's data source, and a check that fails, with its numbers, when they do not."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import SHARED_DATA, needs_real_data, write_class_folders, write_recipe
from helpers import only_run, train_inprocess
from imgcls.inference.export import main as export_main
from imgcls.inference.predict import main as predict_main
from imgcls.inference.predictor import META_KEY

ALL = ["--format", "onnx", "torchscript", "torch-export", "--fp16"]


@pytest.fixture(scope="module")
def artifact(tiny_run):
    """The session's tiny model (conftest.tiny_run: one epoch, train/val/test, 4 classes, 16 px), this module's
    copy."""
    return tiny_run / "model" / "best"


@pytest.fixture(scope="module")
def exported(artifact):
    assert export_main([str(artifact), *ALL]) == 0
    return artifact / "export", json.loads((artifact / "export" / "export_report.json").read_text())


def onnx_meta(path) -> dict:
    proto = onnx.load(str(path))
    return json.loads(next(e.value for e in proto.metadata_props if e.key == META_KEY))


def test_every_format_matches_eager_on_real_val_images(artifact, exported):
    out, report = exported
    assert report["passed"] is True
    assert set(report["formats"]) == {"onnx", "torchscript", "torch_export", "onnx_fp16"}
    assert report["images"]["n"] == 32 and "val split (40 images)" in report["images"]["source"]
    for fmt, r in report["formats"].items():
        assert (out / r["file"]).is_file()
        assert r["batch_1"]["n"] == 32 and r["batch_k"]["n"] == 32, fmt
        assert r["batch_1"]["top1_agreement"] == r["batch_k"]["top1_agreement"] == 1.0, fmt
        assert r["max_abs_diff"] <= r["atol"], fmt
    assert report["formats"]["onnx"]["atol"] == 1e-3  # export.parity_atol
    assert report["formats"]["onnx"]["max_abs_diff"] < 1e-5
    assert report["formats"]["onnx_fp16"]["max_abs_diff"] > 0  # really ran in half precision


def test_onnx_has_dynamic_batch_opset_and_metadata(artifact, exported):
    out, _ = exported
    config = json.loads((artifact / "config.json").read_text())
    proto = onnx.load(str(out / "model.onnx"))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17  # export.opset
    batch_axis = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value
    meta = onnx_meta(out / "model.onnx")
    assert meta["class_names"] == ["a", "b", "c", "d"] and meta["preprocess"] == config["preprocess"]
    assert meta["temperature"] == config["temperature"]
    assert json.loads((out / "preprocess.json").read_text()) == meta
    session = ort.InferenceSession(str(out / "model.onnx"))
    assert session.run(None, {"image": np.zeros((5, 1, 16, 16), np.float32)})[0].shape == (5, 4)


def test_wrong_preprocessing_in_the_exported_file_fails_the_check_with_numbers(artifact, exported, tmp_path,
                                                                               caplog):
    out, _ = exported
    proto = onnx.load(str(out / "model.onnx"))
    meta = onnx_meta(out / "model.onnx")
    meta["preprocess"]["mean"] = [0.3]  # the artifact's is 0.5
    next(e for e in proto.metadata_props if e.key == META_KEY).value = json.dumps(meta)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    with caplog.at_level(logging.INFO):
        code = export_main([str(artifact), "--format", "onnx", "--check-only", "--out", str(tmp_path)])
    assert code == 1
    r = json.loads((tmp_path / "export_report.json").read_text())["formats"]["onnx"]
    assert r["passed"] is False and r["max_abs_diff"] > 0.01
    message = next(rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR)
    assert f"max |Δlogit| {r['max_abs_diff']:.6g} exceeds the tolerance 0.001 by" in message
    assert f"batch 32: {r['batch_k']['max_abs_diff']:.6g}" in message


def test_an_onnx_file_whose_class_name_cannot_be_a_label_is_refused(exported, tmp_path, capsys):
    """ONNX metadata is as untrusted as an artifact's config.json: imgcls-predict refuses the file before any
    image is read, and --sort-into makes no folder."""
    out, _ = exported
    proto = onnx.load(str(out / "model.onnx"))
    meta = onnx_meta(out / "model.onnx")
    meta["class_names"][1] = "b\x07"
    next(e for e in proto.metadata_props if e.key == META_KEY).value = json.dumps(meta)
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    image = tmp_path / "one.png"
    write_class_folders(tmp_path / "imgs", ["a"], 1)
    shutil.copy(tmp_path / "imgs" / "a" / "0000.png", image)
    assert predict_main([str(bad), str(image), "--sort-into", str(tmp_path / "x" / "y" / "sorted")]) == 2
    assert capsys.readouterr().err == (
        f"error: {bad} (metadata {META_KEY!r}): class name 'b\\x07' contains the control character U+0007; a "
        f"class name must be a non-empty string without control characters\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "imgs", "one.png"]


def test_atol_flag_overrides_the_recipe(artifact, exported, tmp_path):
    out, _ = exported
    shutil.copy(out / "model.fp16.onnx", tmp_path / "model.onnx")  # fp16 numbers, checked as if fp32
    assert export_main([str(artifact), "--format", "onnx", "--check-only", "--out", str(tmp_path),
                        "--atol", "1e-9"]) == 1
    assert export_main([str(artifact), "--format", "onnx", "--check-only", "--out", str(tmp_path),
                        "--atol", "0.5"]) == 0


def test_opset_18_uses_the_torch_export_based_exporter(artifact, tmp_path):
    assert export_main([str(artifact), "--format", "onnx", "--opset", "18", "--out", str(tmp_path),
                        "--parity-images", "8"]) == 0
    r = json.loads((tmp_path / "export_report.json").read_text())["formats"]["onnx"]
    assert r["opset"] == 18 and "dynamo" in r["exporter"] and r["batch_k"]["n"] == 8


def test_unreachable_recipe_data_needs_data_flag(artifact, tmp_path, capsys):
    moved = tmp_path / "best"
    shutil.copytree(artifact, moved, ignore=shutil.ignore_patterns("export"))
    recipe = (moved / "recipe.toml").read_text()
    images = recipe.split('root = "')[1].split('"')[0]
    (moved / "recipe.toml").write_text(recipe.replace(images, str(tmp_path / "gone")))
    assert export_main([str(moved), "--format", "onnx"]) == 2
    assert "--data" in capsys.readouterr().err
    assert export_main([str(moved), "--format", "onnx", "--data", f"{images}/test"]) == 0
    report = json.loads((moved / "export" / "export_report.json").read_text())
    assert report["images"] == {"source": f"folder {images}/test", "n": 32}


@needs_real_data
def test_mnist_artifact_exports_and_matches(tmp_path):
    """30 steps on real MNIST (28 px, resized to the tiny recipe's 16 px), then every format."""
    recipe = write_recipe(tmp_path / "mnist.toml", f'source = "hub"\ndataset = "{SHARED_DATA / "mnist"}"\n'
                                                   f'val_size = 500\nval_pick = "first"', name="mnist")
    assert train_inprocess(recipe, "train.max_steps=30", "train.epochs=1", "train.eval_batch_size=500",
                           "tracking.plots=false") == 0
    best = only_run(tmp_path / "runs", "mnist") / "model" / "best"
    assert export_main([str(best), "--format", "onnx", "torchscript", "torch-export"]) == 0
    report = json.loads((best / "export" / "export_report.json").read_text())
    assert report["passed"] and "val split (500 images)" in report["images"]["source"]
    assert json.loads((best / "config.json").read_text())["class_names"] == [str(d) for d in range(10)]
    assert all(r["batch_k"]["top1_agreement"] == 1.0 for r in report["formats"].values())
    assert onnx_meta(best / "export" / "model.onnx")["preprocess"]["image_size"] == [16, 16]  # MNIST is 28 px


def test_export_at_the_end_of_training_when_the_recipe_asks(tmp_path, image_folder):
    recipe = write_recipe(tmp_path / "t.toml", f'source = "folder"\nroot = "{image_folder}"')
    recipe.write_text(recipe.read_text() + '[export]\nformats = ["onnx", "torchscript"]\nparity_images = 8\n')
    assert train_inprocess(recipe, "train.epochs=1") == 0
    run = only_run(tmp_path / "runs")
    results = json.loads((run / "results.json").read_text())
    assert results["export"]["passed"] is True
    report = json.loads(Path(results["export"]["report"]).read_text())
    assert set(report["formats"]) == {"onnx", "torchscript"} and report["images"]["n"] == 8
    assert all(r["passed"] and r["batch_k"]["top1_agreement"] == 1.0 for r in report["formats"].values())
