"""Exact resume: a run killed mid-epoch and resumed ends bit-identical to a run that never stopped."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from helpers import (assert_same_run, kill_mid_epoch_then_resume, assert_same_weights, only_run, stable_rows,
                     subprocess_env, train_cmd, train_inprocess, wait_for_checkpoint, weights)
from imgcls.training.checkpoint import MARKER, complete_checkpoints, find_resume
from imgcls.recipe import load_recipe
from imgcls.errors import RecipeError
from imgcls.train import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, image_folder: Path, runs: str, accum: int = 1, workers: int = 0) -> Path:
    # augmentation and dropout on, so RNG state and data position both matter
    data = f'source = "folder"\nroot = "{image_folder}"\nworkers = {workers}'
    extra = "every_steps = 3\nkeep_last = 3"
    recipe = write_recipe(tmp_path / f"{runs}.toml", data, extra, output_dir=tmp_path / runs,
                          augment="crop_padding = 2\nhflip = 0.5")
    text = recipe.read_text().replace("dropout = 0.0", "dropout = 0.2")
    recipe.write_text(text.replace("[train]", f"[train]\ngrad_accum_steps = {accum}"))
    return recipe


@pytest.mark.parametrize("accum, workers", [(1, 0), (2, 0), (1, 2)])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, image_folder, accum, workers):
    """Run B may load its data in worker processes: augmentation is seeded per image, so A (in-process loading)
    and B still see the same pixels."""
    straight = _recipe(tmp_path, image_folder, "a", accum)
    assert train_inprocess(straight) == 0
    run_a = only_run(tmp_path / "a")

    killed = _recipe(tmp_path, image_folder, "b", accum, workers)
    assert load_recipe(killed).data.workers == workers
    assert_same_run(run_a, kill_mid_epoch_then_resume(killed, tmp_path / "b"))


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes_bit_identically(tmp_path, image_folder):
    """The run is started with overrides; the command it prints is run verbatim (through a shell) and ends
    exactly where an uninterrupted run with the same overrides ends."""
    overrides = ("optim.lr=0.05", "train.epochs=2")
    straight = _recipe(tmp_path, image_folder, "a")
    assert train_inprocess(straight, *overrides) == 0
    run_a = only_run(tmp_path / "a")

    recipe = _recipe(tmp_path, image_folder, "b")
    proc = subprocess.Popen(train_cmd(recipe, *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=tmp_path)
    wait_for_checkpoint(tmp_path / "b", 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    run = only_run(tmp_path / "b")
    stopped_at = json.loads((complete_checkpoints(run)[-1] / "train_state.json").read_text())["step"]
    assert stopped_at >= 6 and not (run / "results.json").exists()
    command = err.split("Continue with:\n")[1].splitlines()[0].strip()
    assert command.endswith(f"-m imgcls.train --resume {run}"), command

    elsewhere = tmp_path / "elsewhere"  # the command works from any directory
    elsewhere.mkdir()
    done = subprocess.run(command, shell=True, capture_output=True, text=True, env=subprocess_env(),
                          cwd=elsewhere, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"at epoch {stopped_at // 10}, optimizer step {stopped_at}" in done.stderr
    assert json.loads((run / "results.json").read_text())["steps"] == 20
    for kind in ("last", "best"):
        assert_same_weights(weights(run_a / "model" / kind), weights(run / "model" / kind))
    assert stable_rows(run_a) == stable_rows(run)


def test_incomplete_checkpoint_is_never_chosen_and_is_cleaned_up(tmp_path, image_folder):
    recipe = _recipe(tmp_path, image_folder, "b")
    recipe.write_text(recipe.read_text().replace('name = "cosine"', 'name = "constant"'))
    assert train_inprocess(recipe, "train.max_steps=12") == 0
    run = only_run(tmp_path / "b")
    newest = complete_checkpoints(run)[-1]
    assert newest.name == "step-0000012"
    fake = newest.with_name("step-0000099")  # looks newer, but its marker was never written
    shutil.copytree(newest, fake)
    (fake / MARKER).unlink()
    half = newest.with_name(".step-0000100.tmp")  # a save that was cut off
    shutil.copytree(newest, half)
    assert find_resume(tmp_path / "b", "tiny") == newest

    assert train_inprocess(recipe, "--resume", "auto", "train.max_steps=15") == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-0000099" not in names and ".step-0000100.tmp" not in names
    assert names[-1] == "step-0000015"


def test_resume_refuses_a_recipe_change_that_alters_the_state(tmp_path, image_folder, capsys):
    recipe = _recipe(tmp_path, image_folder, "b")
    assert train_inprocess(recipe, "train.max_steps=6") == 0
    code = train_inprocess(recipe, "--resume", "auto", "optim.lr=0.5", "seed=3", "train.max_steps=6")
    assert code == 2
    err = capsys.readouterr().err
    assert "the recipe changed in ways that alter the saved state" in err
    assert "optim.lr: 0.1 (saved) -> 0.5 (now): it alters the saved state" in err
    assert "seed: 0 (saved) -> 3 (now): it alters the saved state" in err


def test_resume_refuses_a_new_horizon_under_cosine_and_a_new_select_metric(tmp_path, image_folder, capsys):
    """Under cosine the LR at step k depends on the total: a new epochs/max_steps would make it jump."""
    recipe = _recipe(tmp_path, image_folder, "b")
    assert train_inprocess(recipe, "train.max_steps=6") == 0
    assert train_inprocess(recipe, "--resume", "auto", "train.max_steps=12", "checkpoint.select_metric=loss",
                           "checkpoint.select_ema=true") == 2
    err = capsys.readouterr().err
    assert ("train.max_steps: 6 (saved) -> 12 (now): the cosine schedule spans the whole run, so the learning "
            "rate would jump; to train longer, start a new run with model.train_mode=\"update\" "
            "model.weights=\"<run>/model/last\"") in err
    assert ("checkpoint.select_metric: 'top1' (saved) -> 'loss' (now): the best model so far was chosen by the "
            "saved metric; a new one cannot be compared with it") in err
    assert ("checkpoint.select_ema: False (saved) -> True (now): the best model so far was chosen among the saved "
            "run's weights (EMA or not); the other kind cannot be compared with it") in err


def test_resume_accepts_more_epochs_under_a_constant_schedule(tmp_path, image_folder):
    recipe = _recipe(tmp_path, image_folder, "b")
    recipe.write_text(recipe.read_text().replace('name = "cosine"', 'name = "constant"'))
    assert train_inprocess(recipe, "train.max_steps=6") == 0
    assert train_inprocess(recipe, "--resume", "auto", "train.epochs=4") == 0
    assert json.loads((only_run(tmp_path / "b") / "results.json").read_text())["steps"] == 40


def test_resume_auto_goes_by_completion_time_not_folder_time(tmp_path):
    """Deleting files inside an old checkpoint (pruning) touches its folder; it must not look newest."""
    import os

    run = tmp_path / "runs" / "tiny" / "20260101-000000" / "checkpoints"
    for step, when in ((6, 1_000), (9, 2_000)):
        ckpt = run / f"step-{step:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / MARKER).write_text("{}")
        os.utime(ckpt / MARKER, (when, when))
    (run / "step-0000006" / "stray").write_text("x")
    (run / "step-0000006" / "stray").unlink()  # the old folder's mtime is now the newest
    assert find_resume(tmp_path / "runs", "tiny") == run / "step-0000009"


def test_pruning_renames_before_deleting(tmp_path):
    from imgcls.training.checkpoint import prune_checkpoints

    run = tmp_path / "run"
    for step in (3, 6, 9):
        ckpt = run / "checkpoints" / f"step-{step:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_text("w")
        (ckpt / MARKER).write_text("{}")
    prune_checkpoints(run, keep_last=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006", "step-0000009"]


def test_a_kill_between_the_two_renames_of_an_artifact_loses_nothing(tmp_path):
    """replace_dir renames best -> .best.old, then .best.tmp -> best; a kill in between leaves only .best.old."""
    from imgcls.inference.artifact import load_artifact, save_artifact
    from imgcls.models.registry import build_model
    from imgcls.recipe import ModelConfig

    model = build_model(ModelConfig(name="small_cnn", args={"width": 4}), 3, 1, (8, 8))
    config = {"model": {"name": "small_cnn", "args": {"width": 4}, "num_classes": 3, "in_channels": 1},
              "preprocess": {"image_size": [8, 8]}, "class_names": ["a", "b", "c"]}
    best = tmp_path / "run" / "model" / "best"
    save_artifact(best, model, config, "")
    best.rename(best.with_name(".best.old"))  # the state right after the first rename

    loaded, _ = load_artifact(tmp_path / "run")  # a run folder: its model/best is found again
    assert best.is_dir() and not best.with_name(".best.old").exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    best.rename(best.with_name(".best.old"))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_artifact(best, model, config, "")  # the next save from that state leaves exactly one, new, best
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]
    assert torch.equal(next(load_artifact(best)[0].parameters()), next(model.parameters()))


def test_processes_that_see_different_checkpoints_are_refused():
    """Nodes without a shared filesystem find different checkpoints (or none): resuming would mix states."""
    from imgcls.training.runinfo import resume_consensus

    ckpt = "runs/tiny/20260101-000000/checkpoints/step-0000012"
    assert resume_consensus([(0, ckpt, ""), (1, ckpt, "")]) == ckpt
    assert resume_consensus([(0, "", ""), (1, "", "")]) == ""
    with pytest.raises(RecipeError) as e:
        resume_consensus([(0, ckpt, ""), (1, "", "")])
    assert str(e.value) == ("the processes do not see the same checkpoint to resume from:\n"
                            f"  process 0: {ckpt}\n  process 1: (no complete checkpoint)\n"
                            "checkpoint.output_dir must be on a filesystem shared by all nodes (or copy the run "
                            "folder to every node), then resume again")
    with pytest.raises(RecipeError, match=r"^process 1: --resume x: not a complete checkpoint"):
        resume_consensus([(0, ckpt, ""), (1, "", "--resume x: not a complete checkpoint (no COMPLETE marker)")])


def test_the_printed_resume_command_repeats_the_launcher_with_the_run_folder(tmp_path, monkeypatch):
    """The parent's command line says how the run was launched; the printed command repeats that launcher
    (paths made absolute, so it works from any folder) and names the run, whose own recipe it then uses."""
    from imgcls.training.signals import RESUME_ENV, resume_command
    from launcher.launch import relaunch_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("x: 1")
    run = tmp_path / "runs" / "sig" / "20261123-101500"
    accelerate = ["/v/bin/python", "/v/bin/accelerate", "launch", "--config_file", "cfg.yaml", "-m", "imgcls.train",
                  "recipes/r.toml", "name=sig", "data.root=/d", "train.epochs=30"]
    assert resume_command(run, accelerate, {"ACCELERATE_USE_CPU": "1"}) == (
        f"ACCELERATE_USE_CPU=1 accelerate launch --config_file {tmp_path}/cfg.yaml -m imgcls.train --resume {run}")
    # imgcls-launch (the trainers' parent) says how it was started, in RESUME_ENV
    relaunch = relaunch_command(["r.toml", "name=sig", "--config", "cfg.yaml", "--", "--resume", "auto"])
    assert relaunch == f"imgcls-launch {tmp_path}/r.toml name=sig --config {tmp_path}/cfg.yaml --"
    launcher = ["/v/bin/python", "/v/bin/imgcls-launch", "r.toml", "name=sig", "--config", "cfg.yaml", "--",
                "--resume", "auto"]
    assert resume_command(run, launcher, {RESUME_ENV: relaunch}) == (
        f"imgcls-launch {tmp_path}/r.toml name=sig --config {tmp_path}/cfg.yaml -- --resume {run}")
    assert resume_command(run, ["/bin/bash"], {}).endswith(f" -m imgcls.train --resume {run}")


def _fake_checkpoint(run: Path, step: int, completed_at_ns: int) -> Path:
    ckpt = run / "checkpoints" / f"step-{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"step": step}))
    (ckpt / MARKER).write_text(json.dumps({"step": step}))
    os.utime(ckpt / MARKER, ns=(completed_at_ns, completed_at_ns))
    return ckpt


def test_a_run_folder_resumes_and_prunes_by_completion_not_by_step_number(tmp_path, image_folder):
    """#19.5: resumed from step 10 of a run that had reached step 30, the run saved a fresh step 20. The newest
    checkpoint is that step 20 (the timeline the user chose), for `--resume RUN_FOLDER` as for `--resume auto`,
    and `keep_last` keeps it (by step number it kept the abandoned step 30 and deleted the fresh one)."""
    from imgcls.training.checkpoint import prune_checkpoints
    from imgcls.training.runinfo import resolve_resume

    recipe = load_recipe(write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"'))
    run = Path(recipe.checkpoint.output_dir) / recipe.name / "20261205-000000"
    t = 1_800_000_000 * 10**9
    _fake_checkpoint(run, 10, t)
    _fake_checkpoint(run, 30, t + 3 * 10**9)  # abandoned: the user resumed from step 10 after this
    fresh = _fake_checkpoint(run, 20, t + 9 * 10**9)
    assert find_resume(Path(recipe.checkpoint.output_dir), recipe.name) == fresh
    assert resolve_resume(recipe, str(run)) == fresh
    assert complete_checkpoints(run)[-1] == fresh
    prune_checkpoints(run, keep_last=1)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000020"]
