"""Running the trainer from tests: in-process or as a real subprocess, and reading its run directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from imgcls.training.checkpoint import MARKER, complete_checkpoints
from imgcls.train import main as train_main

# wall-clock values, and whether the probe's features came from the cache (the same numbers either way)
VOLATILE = {"time", "images_per_s", "data_wait_fraction", "features_s", "fit_s", "feature_sets_cached"}


def train_inprocess(recipe: Path, *args: str) -> int:
    return train_main([str(recipe), *args])


def train_cmd(recipe: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "imgcls.train", str(recipe), *args]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_train(recipe: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(recipe, *args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=recipe.parent)


def only_run(runs: Path, name: str = "tiny") -> Path:
    found = [p for p in (runs / name).iterdir() if p.is_dir()]
    assert len(found) == 1, f"expected one run dir, found {found}"
    return found[0]


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stable_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock values, for comparing runs."""
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in metrics_rows(run_dir)]


def weights(artifact: Path) -> dict[str, torch.Tensor]:
    return load_file(str(artifact / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def relative_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def wait_for_checkpoint(runs: Path, step: int, proc: subprocess.Popen, limit: float = 240) -> None:
    """Poll until the run under `runs` has a complete checkpoint at `step` (then a test may kill it)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read() if proc.stderr else ''}")
        if list(runs.glob(f"*/*/checkpoints/step-{step:07d}/{MARKER}")):
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step {step} within {limit}s")


def kill_mid_epoch_then_resume(recipe: Path, runs: Path, step: int = 12) -> Path:
    """Run `recipe` as a subprocess, SIGKILL it once its checkpoint at `step` is complete (the tiny recipes'
    epochs are 10 steps: 12 is inside epoch 1), then `--resume auto` to the end; the run folder."""
    proc = subprocess.Popen(train_cmd(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=recipe.parent)
    wait_for_checkpoint(runs, step, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(runs)
    assert not (run / "results.json").exists()
    newest = complete_checkpoints(run)[-1]
    assert int(newest.name.split("-")[1]) % 10 != 0, "the kill must land inside an epoch"
    done = run_train(recipe, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert only_run(runs) == run  # the same run folder, continued
    return run


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical runs: both artifacts, every metrics row but timings, the test results."""
    for kind in ("last", "best"):
        assert_same_weights(weights(a / "model" / kind), weights(b / "model" / kind))
    assert stable_rows(a) == stable_rows(b)
    assert json.loads((a / "results.json").read_text())["test"] == json.loads((b / "results.json").read_text())["test"]
