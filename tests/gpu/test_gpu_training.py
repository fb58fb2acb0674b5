"""Training on one CUDA device: MNIST accuracy, bf16 and fp16 (the gradient scaler saved, restored and used
after a SIGKILL resume), SIGKILL + --resume auto equal to a straight run, torch.compile against eager.

Never run on the machines imgcls is developed on (no GPU): see docs/gpu.md. Each test asserts a number or an
equality; where a CUDA kernel has no deterministic implementation the resume test says which one (torch's own
warning) and compares within a stated tolerance instead of bit for bit."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED_DATA, needs_real_data
from gpu_common import CUDA, max_difference, python, read_json, tiny_recipe, train_losses
from helpers import assert_same_run, only_run, run_train, subprocess_env, wait_for_checkpoint, weights

pytestmark = CUDA

# torch.use_deterministic_algorithms cannot be set from the environment: a one-line wrapper around the CLI
DETERMINISTIC = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                 "from imgcls.train import main; sys.exit(main(sys.argv[1:]))")
NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")
WEIGHT_TOL = 1e-3  # where a kernel is not deterministic: fp32 sums in another order, grown over 30 SGD steps


def deterministic_env() -> dict:
    return {**subprocess_env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def run_deterministic(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python(), "-c", DETERMINISTIC, str(recipe), *args], capture_output=True, text=True,
                          timeout=240, env=deterministic_env(), cwd=recipe.parent)


def kill_and_resume(recipe: Path, runs: Path, step: int = 12) -> tuple[Path, str]:
    """SIGKILL the run once its checkpoint at `step` is complete (inside epoch 1), then --resume auto; the run
    folder and every process's stderr."""
    proc = subprocess.Popen([python(), "-c", DETERMINISTIC, str(recipe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=deterministic_env(), cwd=recipe.parent)
    wait_for_checkpoint(runs, step, proc)
    proc.send_signal(signal.SIGKILL)
    _, killed_err = proc.communicate()
    done = run_deterministic(recipe, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    return only_run(runs), killed_err + done.stderr


def assert_resume_equals_straight(tmp_path: Path, image_folder: Path, train: str) -> tuple[Path, Path]:
    straight = run_deterministic(tiny_recipe(tmp_path, image_folder, "a", train))
    assert straight.returncode == 0, straight.stderr
    run_a = only_run(tmp_path / "a")
    run_c, err = kill_and_resume(tiny_recipe(tmp_path, image_folder, "c", train), tmp_path / "c")
    ops = sorted(set(NONDETERMINISTIC.findall(straight.stderr + err)))
    if not ops:  # every kernel deterministic: bit for bit, metrics and test results included
        assert_same_run(run_a, run_c)
    else:
        diff = max_difference(weights(run_a / "model" / "last"), weights(run_c / "model" / "last"))
        assert diff <= WEIGHT_TOL, f"non-deterministic CUDA kernels {ops}: weights differ by {diff}"
        assert train_losses(run_c) == pytest.approx(train_losses(run_a), rel=1e-3), ops
    return run_a, run_c


@needs_real_data
def test_mnist_one_epoch_on_one_gpu_reaches_98_percent(tmp_path):
    done = run_train(REPO / "recipes" / "mnist.toml", "train.epochs=1", f"data.dataset={str(SHARED_DATA / 'mnist')!r}",
                     f"checkpoint.output_dir={str(tmp_path)!r}", timeout=240)
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path, "mnist")
    assert read_json(run / "env.json")["device"].startswith("cuda")
    assert read_json(run / "results.json")["test"]["top1"] >= 0.98


def test_bf16_on_cuda_is_the_precision_used_and_learns(tmp_path, image_folder):
    recipe = tiny_recipe(tmp_path, image_folder, "a", 'mixed_precision = "bf16"')
    done = run_train(recipe)
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path / "a")
    env = read_json(run / "env.json")
    assert env["device"].startswith("cuda") and env["mixed_precision"] == "bf16"
    losses = train_losses(run)
    assert losses[-1] < 0.5 * losses[0]
    assert read_json(run / "results.json")["test"]["top1"] >= 0.9  # 4 classes: chance is 0.25


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sigkill_then_resume_on_cuda_equals_a_straight_run(tmp_path, image_folder, precision):
    assert_resume_equals_straight(tmp_path, image_folder, f'mixed_precision = "{precision}"')


def scaler_state(checkpoint: Path) -> dict:
    """accelerate's scaler.pt: GradScaler.state_dict() (floats and ints; loaded without unpickling objects)."""
    return torch.load(checkpoint / "scaler.pt", weights_only=True)


def test_fp16_scaler_is_saved_restored_and_used_after_a_sigkill_resume(tmp_path, image_folder):
    """A step whose scaled gradients overflow is skipped and halves the scale: a resume that started from a fresh
    scaler (scale 65536) would skip other steps than the straight run where the scale had changed, and the two
    would part; equal final scaler states and weights say the saved one was restored and used."""
    run_a, run_c = assert_resume_equals_straight(tmp_path, image_folder, 'mixed_precision = "fp16"')
    assert read_json(run_a / "env.json")["mixed_precision"] == "fp16"
    last_a, last_c = (sorted((r / "checkpoints").iterdir())[-1] for r in (run_a, run_c))
    assert last_a.name == last_c.name == "step-0000030"
    a, c = scaler_state(last_a), scaler_state(last_c)
    assert a["scale"] == c["scale"] and a["_growth_tracker"] == c["_growth_tracker"]
    assert 0 < a["scale"] < float("inf")


def test_torch_compile_on_cuda_gives_the_eager_losses(tmp_path, image_folder):
    """The first window (5 steps) within fp32 re-association of the fused kernels; later windows within 2 %:
    differences of 1e-6 grow through 30 SGD steps with momentum. Dropout off: compiled code draws its own
    random numbers, so its masks are not eager's."""
    for name, flag in (("eager", "false"), ("compiled", "true")):
        recipe = tiny_recipe(tmp_path, image_folder, name, f"compile = {flag}", dropout=0.0)
        done = run_train(recipe, timeout=300)
        assert done.returncode == 0, done.stderr
    eager, compiled = (train_losses(only_run(tmp_path / n)) for n in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 6  # steps 5, 10, ..., 30
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)
    assert compiled == pytest.approx(eager, rel=2e-2)
