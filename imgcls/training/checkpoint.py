"""`[checkpoint]`: resume state and the portable model artifact.

Resume state = `accelerator.save_state` (model as safetensors, optimizer, scaler, per-process RNG, sampler:
files accelerate loads with weights_only=True) plus what imgcls writes itself: `train_state.json`,
`scheduler.json` and `ema.safetensors` (accelerate's registered objects are pickles it loads with
weights_only=False, so none is registered, and a checkpoint holding one is refused), in
`<run>/checkpoints/step-NNNNNNN/`. It is complete only once `COMPLETE` is written, last; anything else is never
resumed from and is cleaned up. A resume that cannot restore a process's RNG state stops (`restore_extras`).

The artifact (`model/best`, `model/last`) is what predict/export/eval read: `model.safetensors`, `config.json`
(architecture, class names, preprocessing, calibration) and the resolved `recipe.toml`. Both are written to a
temporary name and renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imgcls.atomic import replace_dir
from imgcls.errors import CheckpointError

log = logging.getLogger(__name__)

SCHEDULER_FILE = "scheduler.json"
EMA_FILE = "ema.safetensors"
MARKER = "COMPLETE"


@dataclass
class TrainState:
    """Counters that make a resumed run continue exactly; saved with every checkpoint."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    best_step: int = -1  # optimizer steps before the best model: 0 for the probe ([probe]) or the untrained one
    bad_epochs: int = 0
    world_size: int = 1
    log_rows: int = 0
    window_losses: list = field(default_factory=list)  # per process: train loss summed since the last log
    window_batches: int = 0
    tracker_ids: dict = field(default_factory=dict)
    epoch_top1: list = field(default_factory=list)  # per process: [correct, seen] train predictions this epoch
    skipped_steps: int = 0  # train.on_nonfinite = "skip": optimizer steps skipped, in all and in a row
    skipped_in_a_row: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def read_train_state(source: Path, micro_per_epoch: int) -> TrainState:
    state = TrainState()
    state.load_state_dict(json.loads((Path(source) / "train_state.json").read_text()))
    if state.batch_in_epoch >= micro_per_epoch:  # a stop at an epoch's last step (older imgcls): next epoch
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return state


# ---------------------------------------------------------------- resume state
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep_last: int, scheduler=None,
                    ema=None) -> Path:
    """Collective: every process calls it. Only the main process renames, marks and prunes. The scheduler
    (JSON) and the EMA (safetensors) are written here, not registered with accelerate, whose custom states
    are pickles it loads with weights_only=False."""
    dest = checkpoint_dir(run_dir, state.step)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "train_state.json").write_text(json.dumps(state.state_dict(), indent=1))
        if scheduler is not None:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict(), indent=1))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()},
                      str(tmp / EMA_FILE), metadata={"updates": str(ema.updates)})
        replace_dir(tmp, dest)
        (dest / MARKER).write_text(json.dumps({"step": state.step, "epoch": state.epoch}))
        prune_checkpoints(run_dir, keep_last)
        log.info("checkpoint at step %d -> %s", state.step, dest)
    accelerator.wait_for_everyone()
    return dest


def check_no_pickles(source: Path) -> None:
    """Before `accelerator.load_state`: a registered object's state file (`custom_checkpoint_N.pkl`) would be
    unpickled with weights_only=False by accelerate; imgcls writes none, so one there is refused."""
    for planted in sorted(Path(source).glob("custom_checkpoint_*.pkl")):
        raise CheckpointError(f"cannot resume from {source}: it holds {planted.name}, a pickle imgcls does not write "
                              "(resuming would run whatever it holds). Delete the file if it is your own from an "
                              "imgcls older than this check (its scheduler state is then lost: start anew), else "
                              "do not resume from this folder")


def restore_extras(source: Path, scheduler, ema, process_index: int, saved_world_size: int) -> None:
    """After `accelerator.load_state`: the scheduler and EMA states imgcls wrote, and proof that this process's
    torch RNG state was restored (accelerate logs a failure to load it at INFO and goes on). A process the
    saved run did not have (resumed on more processes, which the trainer warns is not exact) has no state."""
    source = Path(source)
    if scheduler is not None:
        scheduler.load_state_dict(json.loads((source / SCHEDULER_FILE).read_text()))
    if ema is not None:
        with safe_open(str(source / EMA_FILE), "pt") as f:
            updates = int((f.metadata() or {})["updates"])
        ema.load_state_dict({"updates": updates, "weights": load_file(str(source / EMA_FILE))})
    if process_index >= saved_world_size:
        return
    rng = source / f"random_states_{process_index}.pkl"
    try:
        saved = accelerate_load(rng, weights_only=True)["torch_manual_seed"]  # tensors and numpy only
    except Exception as e:
        saved, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "it differs from the state now in effect"
    if saved is None or not torch.equal(saved, torch.get_rng_state()):
        raise CheckpointError(f"cannot resume from {source}: the RNG state of process {process_index} ({rng}) "
                              f"could not be restored, so the run would not continue exactly ({why}). Resume from "
                              "another checkpoint, or start anew")


def _completed(p: Path) -> tuple[int, int]:
    # the marker is written once, last: its time says when the checkpoint became complete
    return (p / MARKER).stat().st_mtime_ns, int(p.name.split("-")[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first by completion: after a resume from an older step the fresh
    checkpoints come last, whatever their step numbers (the abandoned later steps are older)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / MARKER).is_file()]
    return sorted(done, key=_completed)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the `keep_last` most recently completed checkpoints; remove incomplete leftovers."""
    root = Path(run_dir) / "checkpoints"
    complete = complete_checkpoints(run_dir)
    for p in complete[:-keep_last]:
        doomed = p.with_name(f".{p.name}.deleting")  # one rename: a kill mid-delete never leaves a "complete" half
        os.replace(p, doomed)
        shutil.rmtree(doomed)
    for p in root.iterdir():
        if p not in complete and (p.name.startswith(".") or not (p / MARKER).is_file()):
            log.warning("removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


def find_resume(runs_root: Path, name: str) -> Path | None:
    """`--resume auto`: the newest complete checkpoint among the recipe's runs."""
    base = Path(runs_root) / name
    if not base.is_dir():
        return None
    found = [c for run in base.iterdir() if run.is_dir() for c in complete_checkpoints(run)]
    return max(found, key=_completed, default=None)


