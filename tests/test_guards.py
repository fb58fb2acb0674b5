"""Guards of the loop: `train.max_time` (a fake clock), non-finite losses (a model whose forward returns NaN at
an exact training call) and the per-epoch train accuracy (a model forced to predict class 0)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from helpers import metrics_rows, only_run, train_inprocess, weights
from imgcls.training import guards
from imgcls.training.checkpoint import complete_checkpoints
from imgcls.models.registry import SmallCNN
from imgcls.recipe import TrainConfig, load_recipe
from imgcls.errors import RecipeError

pytestmark = pytest.mark.slow


def _recipe(tmp_path, image_folder, train: str = "", checkpoint: str = ""):
    data = f'source = "folder"\nroot = "{image_folder}"'
    recipe = write_recipe(tmp_path / "r.toml", data, checkpoint, output_dir=tmp_path / "runs")
    recipe.write_text(recipe.read_text().replace("[train]", f"[train]\n{train}"))
    return recipe


@pytest.fixture
def fake_clock(monkeypatch):
    """Each reading of the trainer's clock is one second later than the one before (the first reads 0)."""
    ticks = {"n": -1}

    def clock() -> float:
        ticks["n"] += 1
        return float(ticks["n"])
    monkeypatch.setattr(guards, "clock", clock)


@pytest.fixture
def bad_forward(monkeypatch):
    """bad_forward({3, 4}): the 3rd and 4th training forward passes (counted from 1) return NaN logits."""
    def arm(calls: set[int]) -> None:
        original, seen = SmallCNN.forward, {"n": 0}

        def forward(self, x):
            out = original(self, x)
            if self.training:
                seen["n"] += 1
                if seen["n"] in calls:
                    return out * float("nan")
            return out
        monkeypatch.setattr(SmallCNN, "forward", forward)
    return arm


def test_max_time_reads_durations_and_refuses_other_text():
    assert [TrainConfig(max_time=v).max_time for v in ("2h", "30m", "90s", "1.5h", "", 0, 12)] == \
        [7200.0, 1800.0, 90.0, 5400.0, 0.0, 0.0, 12.0]


def test_a_bad_max_time_names_the_key_and_the_accepted_forms(tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", 'source = "folder"\nroot = "x"')
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["train.max_time=2 hours"])
    assert 'train.max_time: expected seconds or a duration such as "2h", "30m", "90s"' in str(e.value)


def test_max_time_ends_the_run_as_its_last_step_would_and_a_resume_finishes_it(tmp_path, image_folder, fake_clock):
    recipe = _recipe(tmp_path, image_folder, train="max_time = 7.5")  # 30 steps planned; the clock passes 7.5 at 8
    assert train_inprocess(recipe) == 0
    run = only_run(tmp_path / "runs")
    results = json.loads((run / "results.json").read_text())
    assert (results["stopped_by"], results["steps"], results["best_epoch"]) == ("max_time", 8, 0)
    assert set(results["test"]) >= {"loss", "top1"} and results["test"]["n"] == 40
    assert [(r["step"], r["epoch"]) for r in metrics_rows(run) if r["event"] == "val"] == [(8, 0)]
    assert [p.name for p in complete_checkpoints(run)] == ["step-0000008"]
    state = json.loads((complete_checkpoints(run)[-1] / "train_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (8, 0, 8)
    assert (run / "model" / "best" / "model.safetensors").is_file()
    assert (run / "model" / "last" / "model.safetensors").is_file()

    assert train_inprocess(recipe, "--resume", "auto", "train.max_time=0") == 0  # a new limit for the new job
    results = json.loads((run / "results.json").read_text())
    assert (results["stopped_by"], results["steps"]) == ("", 30)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, bad_forward, capsys):
    recipe = _recipe(tmp_path, image_folder, checkpoint="every_steps = 5")
    bad_forward({13})  # optimizer step 13 = epoch 1; the loss is read at the next log (step 15)
    assert train_inprocess(recipe) == 1
    err = capsys.readouterr().err
    run = only_run(tmp_path / "runs")
    newest = run / "checkpoints" / "step-0000010"
    assert (f"error: non-finite training loss (nan) at optimizer step 13 (epoch 1); the run is stopped and the "
            f"newest checkpoint, {newest}, is from before it and was left as it was. Lower optim.lr, set "
            f"optim.grad_clip_norm (e.g. 1.0), or under fp16 use bf16 (same range as fp32); train.on_nonfinite = "
            f"\"skip\" skips such steps instead") in err
    assert [p.name for p in complete_checkpoints(run)] == ["step-0000005", "step-0000010"]
    assert not (run / "results.json").exists()
    assert max(r["step"] for r in metrics_rows(run)) == 10  # nothing of the bad state was logged
    for tensors in (load_file(str(newest / "model.safetensors")), weights(run / "model" / "last")):
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_skip_drops_the_bad_step_and_the_run_goes_on(tmp_path, image_folder, bad_forward):
    recipe = _recipe(tmp_path, image_folder, train='on_nonfinite = "skip"')
    bad_forward({3, 17})
    assert train_inprocess(recipe) == 0
    run = only_run(tmp_path / "runs")
    results = json.loads((run / "results.json").read_text())
    assert (results["steps"], results["skipped_steps"]) == (30, 2)
    train_rows = [r for r in metrics_rows(run) if r["event"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in train_rows][:4] == [(5, 1), (10, 1), (15, 1), (20, 2)]
    assert math.isnan(train_rows[0]["loss"]) and math.isfinite(train_rows[1]["loss"])  # the window of step 3
    # had the NaN gradients been applied, every weight would be NaN from step 3 on
    assert all(torch.isfinite(t).all() for t in weights(run / "model" / "last").values() if t.is_floating_point())


def test_skip_stops_after_too_many_bad_steps_in_a_row(tmp_path, image_folder, bad_forward, capsys):
    recipe = _recipe(tmp_path, image_folder, train='on_nonfinite = "skip"\nmax_skipped_steps = 2')
    bad_forward({4, 5, 6})
    assert train_inprocess(recipe) == 1
    err = capsys.readouterr().err
    assert ("error: 3 optimizer steps in a row were skipped (train.max_skipped_steps), the last non-finite training "
            "loss (nan) at optimizer step 6 (epoch 0); the run is stopped and no checkpoint was saved before it") in err
    assert complete_checkpoints(only_run(tmp_path / "runs")) == []


def test_train_top1_is_the_share_of_the_epochs_labels_a_constant_prediction_hits(tmp_path, image_folder,
                                                                                 monkeypatch):
    original = SmallCNN.forward

    def always_class_0(self, x):
        out = original(self, x)
        return out - out.detach() + torch.tensor([10.0, 0.0, 0.0, 0.0]) if self.training else out
    monkeypatch.setattr(SmallCNN, "forward", always_class_0)
    recipe = _recipe(tmp_path, image_folder)
    assert train_inprocess(recipe) == 0
    rows = [r for r in metrics_rows(only_run(tmp_path / "runs")) if r["event"] == "train"]
    labels = [p.parent.name for p in (image_folder / "train").rglob("*.png")]  # one epoch sees each image once
    share = labels.count("a") / len(labels)
    assert share == 0.25
    assert [(r["step"], r.get("train_top1")) for r in rows] == [
        (5, None), (10, share), (15, None), (20, share), (25, None), (30, share)]


def test_two_processes_stop_together_and_agree_with_one(tmp_path, image_folder, fake_clock):
    """max_time on 2 processes: the main process's clock decides at the first common check (step 10, the epoch's
    end); one process with a clock that passes the limit at step 10 gives the same val, val_ema and train_top1."""
    from test_distributed import cpu_env, free_port, launch_cmd

    def recipe(runs: str, max_time: str) -> Path:
        r = write_recipe(tmp_path / f"{runs}.toml", f'source = "folder"\nroot = "{image_folder}"',
                         output_dir=tmp_path / runs, augment="crop_padding = 2")
        text = r.read_text().replace("dropout = 0.0", 'dropout = 0.0, norm = "none"')
        r.write_text(text.replace("[train]", f'[train]\nmax_time = {max_time}\nema_decay = 0.8\n'
                                             f'on_nonfinite = "skip"'))
        return r
    assert train_inprocess(recipe("one", "9.5")) == 0
    done = subprocess.run(launch_cmd(recipe("two", "0.001"), "--multi_gpu", "--num_processes", "2",
                                     "--main_process_port", str(free_port())),
                          capture_output=True, text=True, env=cpu_env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run1, run2 = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    for run in (run1, run2):
        results = json.loads((run / "results.json").read_text())
        assert (results["stopped_by"], results["steps"], results["skipped_steps"]) == ("max_time", 10, 0)
    rows = lambda run: [(r["event"], r["step"], r.get("top1"), r.get("train_top1"))  # noqa: E731
                        for r in metrics_rows(run) if r["event"] in ("val", "val_ema", "test") or "train_top1" in r]
    assert rows(run1) == rows(run2)
    assert [r["event"] for r in metrics_rows(run2) if r["step"] == 10] == ["train", "val", "val_ema", "test"]
