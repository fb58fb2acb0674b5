"""Fine-tuning and freezing through the trainer: a `.pth` with `module.` prefixes and a 1000-class head goes
into a 4-class model; a frozen backbone (BatchNorm statistics included) is bit-for-bit unchanged by training."""
from __future__ import annotations

import json

import torch

from conftest import write_recipe
from helpers import only_run, train_inprocess, weights
from imgcls.models.registry import build_model
from imgcls.recipe import ModelConfig


def _pretrained_pth(path, num_classes=1000):
    torch.manual_seed(123)
    model = build_model(ModelConfig(name="small_cnn", args={"width": 8, "dropout": 0.0}), num_classes, 1, (16, 16))
    with torch.no_grad():  # make the BN running stats distinctive, so "unchanged" means something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _finetune_one_epoch(tmp_path, image_folder, model_keys: str):
    """The .pth's tensors, and the run that fine-tuned from it for one epoch with `model_keys` in [model]."""
    saved = _pretrained_pth(tmp_path / "pretrained.pth")
    recipe = write_recipe(tmp_path / "ft.toml", f'source = "folder"\nroot = "{image_folder}"')
    recipe.write_text(recipe.read_text().replace(
        "[optim]", f'train_mode = "finetune"\nweights = "{tmp_path / "pretrained.pth"}"\n{model_keys}\n[optim]'))
    assert train_inprocess(recipe, "train.epochs=1") == 0
    return saved, only_run(tmp_path / "runs")


def test_finetune_from_pth_with_frozen_backbone(tmp_path, image_folder):
    saved, run = _finetune_one_epoch(tmp_path, image_folder, 'freeze = "backbone"')
    trained = weights(run / "model" / "last")

    backbone = [k for k in saved if not k.startswith("head.")]
    assert backbone and all(torch.equal(trained[k], saved[k]) for k in backbone)
    assert trained["head.weight"].shape == (4, 16) and saved["head.weight"].shape == (1000, 16)
    log = (run / "train.log").read_text()
    assert "model small_cnn 4,268 parameters (68 trainable)" in log  # only the 16x4 + 4 head trains
    assert json.loads((run / "results.json").read_text())["steps"] == 10


def test_update_continues_from_a_previous_run_with_its_head(tmp_path, image_folder):
    first = write_recipe(tmp_path / "a.toml", f'source = "folder"\nroot = "{image_folder}"', output_dir=tmp_path / "a")
    assert train_inprocess(first, "train.epochs=1") == 0
    previous = only_run(tmp_path / "a") / "model" / "best"
    second = write_recipe(tmp_path / "b.toml", f'source = "folder"\nroot = "{image_folder}"', output_dir=tmp_path / "b")
    second.write_text(second.read_text().replace(
        "[optim]", f'train_mode = "update"\nweights = "{previous}"\n[optim]'))
    assert train_inprocess(second, "train.epochs=1", "train.evaluate_before_train=true") == 0
    rows = [json.loads(line) for line in (only_run(tmp_path / "b") / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in rows if r["event"] == "val" and r["step"] == 0)
    best_a = json.loads((only_run(tmp_path / "a") / "results.json").read_text())["val"]
    assert before["top1"] == best_a["top1"] and abs(before["loss"] - best_a["loss"]) < 1e-6


def test_freeze_bn_keeps_every_running_statistic_while_the_rest_trains(tmp_path, image_folder):
    saved, run = _finetune_one_epoch(tmp_path, image_folder, "freeze_bn = true")
    trained = weights(run / "model" / "last")
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(trained[k], saved[k]) for k in stats)
    assert all(torch.equal(trained[k], saved[k]) for k in saved if k.endswith("num_batches_tracked"))
    bn_affine = [k for k in saved if k.startswith("features") and k.endswith(".1.weight")]
    assert bn_affine and not any(torch.equal(trained[k], saved[k]) for k in bn_affine)  # scale and shift learn
