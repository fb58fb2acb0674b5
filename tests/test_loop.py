"""The loop's decisions after each optimizer step: epoch end, evaluation, checkpoint and stop, in that order.

A stop request is injected at an exact optimizer step by patching `StopSignal.agreed` (asked once per step),
so each edge (last step of an epoch, of the run, a step that is also a periodic checkpoint) is hit exactly.
"""
from __future__ import annotations

import json
import logging

import pytest

from conftest import write_recipe
from helpers import assert_same_weights, metrics_rows, only_run, stable_rows, train_inprocess, weights
from imgcls.training.checkpoint import complete_checkpoints
from imgcls.training.signals import StopSignal
from imgcls.train import EXIT_PREEMPTED

pytestmark = pytest.mark.slow


@pytest.fixture
def stop_at(monkeypatch):
    """stop_at(n): the stop request is agreed on at the n-th optimizer step of the next run."""
    def arm(step: int) -> None:
        calls = {"n": 0}

        def agreed(self, accelerator) -> bool:
            calls["n"] += 1
            return calls["n"] == step
        monkeypatch.setattr(StopSignal, "agreed", agreed)
    yield arm
    monkeypatch.undo()


def _recipe(tmp_path, image_folder, runs: str, train: str = "", checkpoint: str = ""):
    data = f'source = "folder"\nroot = "{image_folder}"'
    recipe = write_recipe(tmp_path / f"{runs}.toml", data, checkpoint, output_dir=tmp_path / runs,
                          augment="crop_padding = 2\nhflip = 0.5")
    recipe.write_text(recipe.read_text().replace("[train]", f"[train]\n{train}"))
    return recipe


def _state(checkpoint) -> dict:
    return json.loads((checkpoint / "train_state.json").read_text())


def test_a_stop_on_the_last_step_of_the_run_validates_and_saves_the_artifacts_first(tmp_path, image_folder,
                                                                                     stop_at):
    recipe = _recipe(tmp_path, image_folder, "b")
    recipe.write_text(recipe.read_text().replace("epochs = 3", "epochs = 1"))
    stop_at(10)  # 160 images / 16 = 10 steps: the run's last step
    assert train_inprocess(recipe) == EXIT_PREEMPTED
    run = only_run(tmp_path / "b")
    assert [(r["step"], r["epoch"]) for r in metrics_rows(run) if r["event"] == "val"] == [(10, 0)]
    assert (run / "model" / "best" / "model.safetensors").is_file()
    state = _state(complete_checkpoints(run)[-1])
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (10, 1, 0)
    assert train_inprocess(recipe, "--resume", "auto") == 0  # nothing left to train: test and results
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 10 and results["best_epoch"] == 0


def test_a_stop_at_an_epoch_end_with_a_longer_loader_resumes_bit_identically(tmp_path, image_folder, stop_at):
    """global 48 / accumulation 3 -> batches of 16: the loader has 10 batches, an epoch uses 3 x 3 = 9. A stop at
    the epoch's last step must not train the 10th batch on resume."""
    train = "grad_accum_steps = 3"
    straight = _recipe(tmp_path, image_folder, "a", train=train)
    killed = _recipe(tmp_path, image_folder, "b", train=train)
    for recipe in (straight, killed):
        recipe.write_text(recipe.read_text().replace("global_batch_size = 16", "global_batch_size = 48"))
    assert train_inprocess(straight) == 0
    stop_at(3)  # 3 optimizer steps per epoch: the end of epoch 0
    assert train_inprocess(killed) == EXIT_PREEMPTED
    run_b = only_run(tmp_path / "b")
    state = _state(complete_checkpoints(run_b)[-1])
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 1, 0)
    stop_at(10**9)
    assert train_inprocess(killed, "--resume", "auto") == 0
    run_a = only_run(tmp_path / "a")
    for kind in ("last", "best"):
        assert_same_weights(weights(run_a / "model" / kind), weights(run_b / "model" / kind))
    assert stable_rows(run_a) == stable_rows(run_b)


def test_a_step_is_checkpointed_once_even_when_a_stop_and_the_period_coincide(tmp_path, image_folder, stop_at,
                                                                                caplog):
    recipe = _recipe(tmp_path, image_folder, "b", checkpoint="every_steps = 3")
    stop_at(6)
    with caplog.at_level(logging.INFO, logger="imgcls.training.checkpoint"):
        assert train_inprocess(recipe) == EXIT_PREEMPTED
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint at step")]
    assert [m.split(" -> ")[0] for m in saved] == ["checkpoint at step 3", "checkpoint at step 6"]


def test_checkpoint_every_epochs_holds_when_evaluation_is_less_frequent(tmp_path, image_folder):
    recipe = _recipe(tmp_path, image_folder, "b", train="eval_every_epochs = 2", checkpoint="keep_last = 5")
    assert train_inprocess(recipe) == 0
    run = only_run(tmp_path / "b")
    assert [p.name for p in complete_checkpoints(run)] == ["step-0000010", "step-0000020", "step-0000030"]
    assert [(r["step"], r["epoch"]) for r in metrics_rows(run) if r["event"] == "val"] == [(20, 1), (30, 2)]


def test_resume_mid_epoch_is_exact_even_where_the_skipping_loader_restarts_at_epoch_0(tmp_path, image_folder,
                                                                                       stop_at, monkeypatch):
    """accelerate < 1.15 built the loader of `skip_first_batches` at epoch 0 (another permutation, other
    augmentation); simulated here on the installed version."""
    from accelerate import Accelerator

    straight = _recipe(tmp_path, image_folder, "a")
    assert train_inprocess(straight) == 0
    killed = _recipe(tmp_path, image_folder, "b")
    stop_at(13)  # epoch 1, 3 steps in
    assert train_inprocess(killed) == EXIT_PREEMPTED
    stop_at(10**9)
    original = Accelerator.skip_first_batches

    def old_skip(self, dataloader, num_batches=0):
        loader = original(self, dataloader, num_batches)
        loader.iteration = 0  # what accelerate < 1.15 left there
        return loader
    monkeypatch.setattr(Accelerator, "skip_first_batches", old_skip)
    assert train_inprocess(killed, "--resume", "auto") == 0
    run_a, run_b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    assert_same_weights(weights(run_a / "model" / "last"), weights(run_b / "model" / "last"))
    assert stable_rows(run_a) == stable_rows(run_b)
