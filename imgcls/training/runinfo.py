"""The run directory: choosing it (new or resumed), its first files (`recipe.toml`, `env.json`, `train.log`),
and checking a recipe against the run it resumes."""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object

from imgcls.training.checkpoint import MARKER, complete_checkpoints, find_resume
from imgcls.atomic import recover_dir
from imgcls.recipe import Recipe, load_recipe, recipe_diff, recipe_to_toml
from imgcls.errors import RecipeError

log = get_logger(__name__)

# Changing these on resume keeps the saved state meaningful; anything else is refused.
SAFE_ON_RESUME = ("train.epochs", "train.max_steps", "train.log_every_steps", "train.eval_every_epochs",
                  "train.early_stop_patience", "train.calibrate", "checkpoint.", "tracking.", "export.",
                  "data.workers", "train.cpu_threads", "train.max_time", "train.on_nonfinite",
                  "train.max_skipped_steps")
# ... except in these cases, where the saved state would be read with another meaning
HORIZON_KEYS = ("train.epochs", "train.max_steps")


def _refusal(key: str, saved: Recipe) -> str:
    """Why changing `key` on resume is refused ("" when it is allowed)."""
    if key in HORIZON_KEYS and saved.schedule.name == "cosine":
        return ("the cosine schedule spans the whole run, so the learning rate would jump; to train longer, "
                "start a new run with model.train_mode=\"update\" model.weights=\"<run>/model/last\"")
    if key == "checkpoint.select_metric":
        return "the best model so far was chosen by the saved metric; a new one cannot be compared with it"
    if key == "checkpoint.select_ema":
        return "the best model so far was chosen among the saved run's weights (EMA or not); the other kind " \
               "cannot be compared with it"
    return "" if key.startswith(SAFE_ON_RESUME) else "it alters the saved state"


def run_dir_of(resume: str) -> Path:
    """`--resume` names a run folder or one of its checkpoints."""
    p = Path(resume)
    if p.parent.name == "checkpoints" and p.name.startswith("step-"):
        return p.parent.parent
    if not p.is_dir():
        raise RecipeError(f"--resume {resume}: no such run folder")
    return p


def load_run_recipe(path: str, overrides: list[str], resume: str) -> Recipe:
    """The recipe to run: the file plus overrides; with `--resume RUN` and no file, the run's own recipe.toml
    plus the overrides (checked against the run like any resumed recipe)."""
    if path:
        return load_recipe(path, overrides)
    saved = run_dir_of(resume) / "recipe.toml"
    if not saved.is_file():
        raise RecipeError(f"--resume {resume}: {saved} not found, so the run's recipe is unknown; give the recipe "
                          f"file too: python -m imgcls.train RECIPE --resume {resume}")
    return load_recipe(saved, overrides)


def new_run_dir(recipe: Recipe) -> Path:
    """A new folder named by the clock, created here (mkdir fails if it exists), so two runs started in the
    same second never share one."""
    base = Path(recipe.checkpoint.output_dir).resolve() / recipe.name
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run, k = base / stamp, 1
    while True:
        try:
            run.mkdir()
            return run
        except FileExistsError:
            run, k = base / f"{stamp}-{k}", k + 1


def resolve_resume(recipe: Recipe, resume: str) -> Path | None:
    """`auto` -> newest complete checkpoint of this recipe's runs (None if there is none); else a checkpoint
    folder or a run folder."""
    if not resume:
        return None
    if resume == "auto":
        return find_resume(Path(recipe.checkpoint.output_dir), recipe.name)
    p = Path(resume)
    if (p / MARKER).is_file():
        return p
    if p.is_dir() and complete_checkpoints(p):
        return complete_checkpoints(p)[-1]
    raise RecipeError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker) nor a run folder with one")


def check_resume_recipe(recipe: Recipe, run_dir: Path) -> list[str]:
    """Refuse changes that alter the meaning of the saved state; return the allowed changes as text."""
    saved = load_recipe(run_dir / "recipe.toml")
    diff = recipe_diff(saved, recipe)
    unsafe = {k: v for k, v in diff.items() if _refusal(k, saved)}
    if unsafe:
        lines = [f"  {k}: {old!r} (saved) -> {new!r} (now): {_refusal(k, saved)}" for k, (old, new) in unsafe.items()]
        raise RecipeError(f"cannot resume {run_dir}: the recipe changed in ways that alter the saved state:\n"
                          + "\n".join(lines) + "\nRevert these keys (resuming with `--resume RUN_FOLDER` and no "
                          "recipe file uses the run's own recipe), or start a new run without --resume.")
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()]


def _git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(accelerator, per_device_batch: int) -> dict:
    import torch

    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in (
            "imgcls", "torch", "torchvision", "accelerate", "datasets", "safetensors", "wandb", "onnxruntime")}},
        "git_sha": _git_sha(),
        "host": socket.gethostname(),
        "command": [sys.executable, *sys.argv],
        "world_size": accelerator.num_processes,
        "num_machines": int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("NNODES", "1")) or 1),
        "distributed_type": str(accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "per_device_batch_size": per_device_batch,
        "grad_accum_steps": accelerator.gradient_accumulation_steps,
        "torch_threads": torch.get_num_threads(),
    }


def setup_logging(accelerator, run_dir: Path | None = None) -> None:
    """INFO to stderr (main process only, via accelerate's logger); with a run dir, also to its train.log."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    logging.basicConfig(format=fmt, datefmt="%H:%M:%S")
    root.setLevel(logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    for noisy in ("accelerate.accelerator", "accelerate.checkpointing"):  # a line per file, naming the .tmp
        logging.getLogger(noisy).setLevel(logging.WARNING)                 # folder: we log the checkpoint once
    for handler in [h for h in root.handlers if getattr(h, "imgcls_run_log", False)]:
        root.removeHandler(handler)  # a previous run in this process (tests, notebooks)
        handler.close()
    if run_dir is not None and accelerator.is_main_process:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter(fmt))
        handler.imgcls_run_log = True
        root.addHandler(handler)


def write_run_files(recipe: Recipe, accelerator, run_dir: Path, per_dev: int) -> None:
    """The resolved recipe and the environment, written before training starts."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(accelerator, run_dir)
        (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
        write_json(run_dir / "env.json", environment(accelerator, per_dev))
    accelerator.wait_for_everyone()


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def setup_run(recipe: Recipe, accelerator, resume: str) -> tuple[Path, Path | None]:
    """All processes agree on the checkpoint to resume from, if any: a resumed run continues in its own folder;
    a new run gets a folder named by the main process."""
    try:  # on every process (each reads its own filesystem), then agreed on by all: nobody is left waiting
        found = (accelerator.process_index, str(resolve_resume(recipe, resume) or ""), "")
    except RecipeError as e:
        found = (accelerator.process_index, "", str(e))
    agreed = resume_consensus(gather_object([found]) if accelerator.num_processes > 1 else [found])
    source = Path(agreed) if agreed else None
    if source is not None:
        run_dir = source.parent.parent
    else:  # a new folder is named by the clock: the main process names it for all
        name = [str(new_run_dir(recipe)) if accelerator.is_main_process else None]
        run_dir = Path(broadcast_object_list(name)[0] if accelerator.num_processes > 1 else name[0])
    if resume == "auto" and source is None:
        log.info("--resume auto: no complete checkpoint of %r yet; starting a new run", recipe.name)
    if source is not None:
        if accelerator.is_main_process:
            for name in ("best", "last"):
                recover_dir(run_dir / "model" / name)
        for change in check_resume_recipe(recipe, run_dir):
            log.info("recipe change on resume (allowed): %s", change)
    return run_dir, source


def resume_consensus(seen: list[tuple[int, str, str]]) -> str:
    """(process, checkpoint it found or "", error or "") from every process -> the one checkpoint all resume from.
    Processes that see different checkpoints (nodes without a shared filesystem) would resume from different
    states: refused, naming what each process saw."""
    errors = [(rank, err) for rank, _, err in seen if err]
    if errors:
        rank, err = errors[0]
        raise RecipeError(err if len(seen) == 1 else f"process {rank}: {err}")
    paths = {path for _, path, _ in seen}
    if len(paths) > 1:
        lines = "\n".join(f"  process {rank}: {path or '(no complete checkpoint)'}" for rank, path, _ in seen)
        raise RecipeError("the processes do not see the same checkpoint to resume from:\n" + lines + "\n"
                          "checkpoint.output_dir must be on a filesystem shared by all nodes (or copy the run "
                          "folder to every node), then resume again")
    return paths.pop()
