"""Small defects from the review (#19, #20), each with the test that failed before its fix."""
from __future__ import annotations

import pytest

from conftest import write_class_folders
from imgcls.data.loaders import build_splits
from imgcls.recipe import DataConfig, load_recipe
from imgcls.errors import RecipeError
from imgcls.training import runinfo


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    """#19 item 10: the folder was picked by exists() and made later with exist_ok=True."""
    (tmp_path / "r.toml").write_text(f'name = "x"\n[data]\ndataset = "a/b"\n[checkpoint]\noutput_dir = "{tmp_path}"\n')
    recipe = load_recipe(tmp_path / "r.toml")
    monkeypatch.setattr(runinfo.time, "strftime", lambda fmt: "20261205-101500")
    first, second = runinfo.new_run_dir(recipe), runinfo.new_run_dir(recipe)
    assert (first.name, second.name) == ("20261205-101500", "20261205-101500-1")
    assert first.is_dir() and second.is_dir()


@pytest.mark.parametrize("value", ["5\nseed = 99", "5\r\nseed = 99"])
def test_an_override_spanning_lines_is_refused(tmp_path, value):
    """#20 item 21: 'train.log_every_steps=5\\nseed = 99' kept 5 and silently dropped the rest."""
    (tmp_path / "r.toml").write_text('name = "x"\n[data]\ndataset = "a/b"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.toml", [f"train.log_every_steps={value}"])
    assert str(e.value) == (f"override {'train.log_every_steps=' + value!r}: a value cannot span lines; give each "
                            "key its own section.key=value")


@pytest.mark.parametrize("content", ["", '[[0, "Unidentif'])
def test_an_empty_or_torn_image_check_cache_is_a_miss(tmp_path, content):
    """#20 item 7: an empty or torn image-check JSON made every build_splits raise JSONDecodeError."""
    root = write_class_folders(tmp_path / "imgs" / "train", ["a", "b"], 6).parent
    write_class_folders(root / "val", ["a", "b"], 2, seed=1)
    cfg = DataConfig(source="folder", root=str(root), image_size=(16, 16), channels=1, mean=[0.5], std=[0.25],
                     cache_dir=str(tmp_path / "cache"))
    build_splits(cfg)
    checks = list((tmp_path / "cache" / "image-check").glob("*.json"))
    assert len(checks) == 2
    for f in checks:
        f.write_text(content)
    splits = build_splits(cfg)  # checked again, and the files rewritten whole
    assert (len(splits.train), len(splits.val)) == (12, 4)
    assert all(f.read_text().startswith("[") and f.read_text().endswith("]") for f in checks)


def test_torchscript_export_needs_no_onnx_installed(tmp_path, image_folder, monkeypatch):
    """#19 item 17: the export report imported onnx and onnxruntime whatever the formats, so
    export.formats = ["torchscript"] without the [export] extra crashed finish() after training."""
    import json
    import sys

    from conftest import write_recipe
    from helpers import only_run, train_inprocess
    from imgcls.inference.export import main as export_main

    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"')
    assert train_inprocess(recipe, "train.epochs=1") == 0
    best = only_run(tmp_path / "runs") / "model" / "best"
    for name in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)  # `import onnx` now raises ImportError
    assert export_main([str(best), "--format", "torchscript"]) == 0
    report = json.loads((best / "export" / "export_report.json").read_text())
    assert set(report["formats"]) == {"torchscript"} and report["passed"] is True
    assert "onnx" not in report["versions"] and "torch" in report["versions"]


def test_a_fifo_named_like_an_image_is_a_bad_image_not_a_hang(tmp_path):
    """#20 item 14: a FIFO named x.png hung imgcls-predict and the image check (opening it waits for a writer)."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    code = ("from imgcls.data.images import BAD_IMAGE_ERRORS, check_image, open_image\n"
            "for f in (open_image, check_image):\n"
            "    try:\n        f(%r)\n    except BAD_IMAGE_ERRORS as e:\n        print(type(e).__name__, e)\n"
            % str(fifo))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"OSError {fifo}: not a regular file (a FIFO, device, socket or folder); "
                                        "images are read from regular files only"] * 2


@pytest.mark.parametrize("mode", ["update", "finetune"])
def test_weights_of_the_right_shape_but_another_kind_or_not_finite_are_refused(mode):
    """#20 item 22: int8, bool, complex or NaN tensors of the right shape loaded silently."""
    import torch

    from imgcls.models.registry import build_model
    from imgcls.models.weights import load_state
    from imgcls.recipe import ModelConfig

    model = build_model(ModelConfig(name="small_cnn", args={"width": 8, "dropout": 0.0}), 4, 1, (16, 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["features.0.0.weight"] = state["features.0.0.weight"].to(torch.int8)
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    state["head.bias"] = state["head.bias"].to(torch.complex64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError) as e:
        load_state(model, state, mode, 1, "w.safetensors")
    assert str(e.value) == ("model.weights: w.safetensors: tensors that cannot be weights: features.0.0.weight "
                            "(torch.int8 for torch.float32), head.bias (torch.complex64 for torch.float32), "
                            "head.weight (not finite)")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half loaded
