"""Resume never unpickles what another hand may have put into a checkpoint, and never goes on without every
process's RNG state: the scheduler and the EMA are saved by imgcls as JSON and safetensors (not through
accelerate's pickled custom states), and a missing or unreadable RNG file stops the resume with its name."""
from __future__ import annotations

import json
import pytest
import torch

from conftest import write_recipe
from helpers import only_run, train_inprocess
from imgcls.training.checkpoint import complete_checkpoints


class _Payload:
    """Unpickling this writes a marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _first_run(tmp_path, image_folder, extra_train=""):
    """A finished 2-epoch run with a checkpoint every 5 steps; its step-5 checkpoint, to resume from."""
    recipe = write_recipe(tmp_path / "r.toml", f'source = "folder"\nroot = "{image_folder}"',
                          extra="every_steps = 5\nkeep_last = 10")
    recipe.write_text(recipe.read_text().replace("[train]", f"[train]\n{extra_train}").replace("epochs = 3",
                                                                                            "epochs = 2"))
    assert train_inprocess(recipe) == 0
    run = only_run(tmp_path / "runs")
    return recipe, run, complete_checkpoints(run)[0]


@pytest.mark.parametrize("ema", ["", "ema_decay = 0.9"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_not_loaded(tmp_path, image_folder, ema, capsys):
    recipe, run, checkpoint = _first_run(tmp_path, image_folder, ema)
    assert checkpoint.name == "step-0000005"
    assert (checkpoint / "scheduler.json").is_file() and (checkpoint / "ema.safetensors").is_file() == bool(ema)
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))  # nothing imgcls writes is a pickle to trust
    marker = tmp_path / "owned"
    planted = checkpoint / "custom_checkpoint_0.pkl"  # where accelerate looks for a registered object's state
    torch.save(_Payload(marker), planted)  # torch's own format, as accelerate writes these files
    assert train_inprocess(recipe, "--resume", str(checkpoint)) == 1
    assert not marker.exists()
    assert (f"cannot resume from {checkpoint}: it holds {planted.name}, a pickle imgcls does not write "
            "(resuming would run whatever it holds)") in capsys.readouterr().err
    planted.unlink()
    assert train_inprocess(recipe, "--resume", str(checkpoint)) == 0  # the same checkpoint, clean, resumes
    assert json.loads((run / "results.json").read_text())["steps"] == 20


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_resume_without_every_rng_state_stops_and_names_the_file(tmp_path, image_folder, damage, capsys):
    recipe, run, checkpoint = _first_run(tmp_path, image_folder)
    rng = checkpoint / "random_states_0.pkl"
    if damage == "missing":
        rng.unlink()
    else:
        rng.write_bytes(b"not a pickle")
    assert train_inprocess(recipe, "--resume", str(checkpoint)) == 1
    err = capsys.readouterr().err
    assert f"cannot resume from {checkpoint}: the RNG state of process 0 ({rng}) " in err
    assert "could not be restored, so the run would not continue exactly" in err
