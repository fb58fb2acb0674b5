"""EMA of the weights: the update rule by hand, exact resume with the EMA in the checkpoint, and
`checkpoint.select_ema` writing the EMA weights to model/best."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import write_recipe
from helpers import (assert_same_run, kill_mid_epoch_then_resume, assert_same_weights, metrics_rows, only_run,
                     train_inprocess, weights)
from imgcls.training.checkpoint import complete_checkpoints
from imgcls.training.ema import WeightEma


def test_two_updates_match_the_hand_computation_with_warmup_and_average_the_float_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEma(model, decay=0.9, warmup_steps=5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    scale = {k: v.abs().max().item() for k, v in expected.items()}  # largest |value| each tensor has held
    updates = 2
    for t in range(updates):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 3))  # moves the BatchNorm statistics
        d = min(0.9, (1 + t) / (10 + t))  # 0.1, then 2/11
        assert ema.current_decay() == d
        ema.update(model)
        expected = {k: d * expected[k] + (1 - d) * v for k, v in model.state_dict().items() if v.is_floating_point()}
        scale = {k: max(scale[k], model.state_dict()[k].abs().max().item()) for k in scale}
    state = ema.module.state_dict()
    eps = torch.finfo(torch.float32).eps
    for k, v in expected.items():
        # each update rounds 5 times per side (d, 1 - d, two products, the sum; FMA or not), each by <= eps/2 of
        # the largest |value| (a convex combination stays within it), and d < 1 shrinks older errors: any CPU
        torch.testing.assert_close(state[k], v, rtol=0, atol=updates * 5 * eps * scale[k])
        assert not torch.equal(state[k], start[k])
    assert {k for k in expected} >= {"1.running_mean", "1.running_var"}
    assert state["1.num_batches_tracked"].item() == 2  # an integer buffer is copied

    again = WeightEma(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)), decay=0.9, warmup_steps=5)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 2 and again.current_decay() == min(0.9, 3 / 12)
    assert_same_weights(again.module.state_dict(), state)


def test_after_warmup_the_decay_is_the_recipes():
    ema = WeightEma(torch.nn.Linear(2, 2), decay=0.999, warmup_steps=0)
    assert ema.current_decay() == 0.999


def _recipe(tmp_path: Path, image_folder: Path, runs: str, train: str = "", checkpoint: str = "") -> Path:
    data = f'source = "folder"\nroot = "{image_folder}"'
    recipe = write_recipe(tmp_path / f"{runs}.toml", data, checkpoint, output_dir=tmp_path / runs,
                          augment="crop_padding = 2\nhflip = 0.5")
    text = recipe.read_text().replace("dropout = 0.0", "dropout = 0.2")
    recipe.write_text(text.replace("[train]", f"[train]\nema_decay = 0.9\nema_warmup_steps = 4\n{train}"))
    return recipe


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_with_ema_is_bit_identical(tmp_path, image_folder):
    extra = "every_steps = 3\nkeep_last = 3"
    straight = _recipe(tmp_path, image_folder, "a", checkpoint=extra)
    assert train_inprocess(straight) == 0
    run_a = only_run(tmp_path / "a")
    assert [r["step"] for r in metrics_rows(run_a) if r["event"] == "val_ema"] == [10, 20, 30]

    run_b = kill_mid_epoch_then_resume(_recipe(tmp_path, image_folder, "b", checkpoint=extra), tmp_path / "b")
    assert_same_run(run_a, run_b)  # val_ema and train_top1 rows included
    ema_a, ema_b = (complete_checkpoints(run)[-1] / "ema.safetensors" for run in (run_a, run_b))
    assert [safe_open(str(f), "pt").metadata()["updates"] for f in (ema_a, ema_b)] == ["30", "30"]
    assert_same_weights(load_file(str(ema_a)), load_file(str(ema_b)))


@pytest.mark.slow
def test_select_ema_writes_the_ema_weights_to_model_best_and_tests_them(tmp_path, image_folder):
    recipe = _recipe(tmp_path, image_folder, "a", checkpoint="select_ema = true")
    recipe.write_text(recipe.read_text().replace("epochs = 3", "epochs = 1"))  # one validation: it is the best
    assert train_inprocess(recipe) == 0
    run = only_run(tmp_path / "a")
    newest = complete_checkpoints(run)[-1]
    ema = load_file(str(newest / "ema.safetensors"))
    assert_same_weights(weights(run / "model" / "best"), ema)
    assert_same_weights(weights(run / "model" / "last"), load_file(str(newest / "model.safetensors")))
    best, last = weights(run / "model" / "best"), weights(run / "model" / "last")
    assert all(not torch.equal(best[k], last[k]) for k in best if k.endswith("weight"))  # two different models
    val_ema = [r for r in metrics_rows(run) if r["event"] == "val_ema"][-1]
    results = json.loads((run / "results.json").read_text())
    assert results["val"]["top1"] == val_ema["top1"] and results["val"]["loss"] == pytest.approx(val_ema["loss"])
    assert json.loads((run / "model" / "best" / "config.json").read_text())["val"]["top1"] == val_ema["top1"]


def test_val_ema_is_evaluated_under_the_runs_autocast_as_val_is(tmp_path, image_folder):
    """#19.16: with a decay of 1e-30 the average equals the trained weights bit for bit (d * w is far below half
    an ulp of w, and 1 - d rounds to 1), so under bf16 val and val_ema must be the same numbers; val_ema
    evaluated without autocast (float32) gave another loss."""
    recipe = _recipe(tmp_path, image_folder, "a", train='mixed_precision = "bf16"')
    text = recipe.read_text().replace("ema_decay = 0.9\nema_warmup_steps = 4", "ema_decay = 1e-30\nema_warmup_steps = 0")
    recipe.write_text(text.replace("epochs = 3", "epochs = 1"))
    assert train_inprocess(recipe) == 0
    rows = metrics_rows(only_run(tmp_path / "a"))
    val = [r for r in rows if r["event"] == "val"][-1]
    val_ema = [r for r in rows if r["event"] == "val_ema"][-1]
    assert val_ema["step"] == val["step"]
    assert (val_ema["loss"], val_ema["top1"]) == (val["loss"], val["top1"])
