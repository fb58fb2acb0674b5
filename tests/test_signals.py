"""Stop signals through the launchers, with real processes: Ctrl-C or SIGTERM reaches the training processes,
which finish the step, save a checkpoint and exit 75 (EXIT_PREEMPTED). imgcls-launch passes that status on with
no traceback. Under a bare `accelerate launch` the checkpoint and the resume command are imgcls's and are tested
as strictly; accelerate's own status (documented in docs/distributed.md) depends on its version, and the tests accept what
the versions pyproject allows give (accelerate>=1.4: 1.4.0 and 1.16.0 were run)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from helpers import assert_same_weights, only_run, stable_rows, subprocess_env, wait_for_checkpoint, weights
from imgcls.training.checkpoint import complete_checkpoints
from imgcls.train import EXIT_PREEMPTED
from launcher.launch import SHUTDOWN_ENV

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def make_recipe(tmp_path: Path, image_folder: Path, runs: str) -> Path:
    """Augmentation and dropout on, so RNG state and data position both matter for an exact resume."""
    recipe = write_recipe(tmp_path / f"{runs}.toml", f'source = "folder"\nroot = "{image_folder}"',
                          "every_steps = 3\nkeep_last = 3", output_dir=tmp_path / runs,
                          augment="crop_padding = 2\nhflip = 0.5")
    recipe.write_text(recipe.read_text().replace("dropout = 0.0", "dropout = 0.2"))
    return recipe


def imgcls_launch(recipe: Path, config: str, *train_args: str) -> list[str]:
    cmd = [sys.executable, "-m", "launcher.launch", str(recipe), "--config", str(CONFIGS / config)]
    if config != "cpu.yaml":
        cmd += ["--main-port", free_port()]
    return cmd + (["--", *train_args] if train_args else [])


def bare_accelerate(recipe: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "imgcls.train", str(recipe)]


def cpu_env(**extra: str) -> dict:
    """One thread per process on the 2-core machine; ACCELERATE_USE_CPU for the bare 2-process launch."""
    return {**subprocess_env(), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
            "IMGCLS_PREFLIGHT_TIMEOUT": "120", **extra}


def start(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """In a session of its own, as a shell job would be: the test signals it like a terminal or a scheduler."""
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env or cpu_env(), cwd=cwd, start_new_session=True)


def saved_step(runs: Path) -> int:
    """The step of the newest complete checkpoint of the only run under `runs`; the run is unfinished."""
    run = only_run(runs)
    assert not (run / "results.json").exists()
    return json.loads((complete_checkpoints(run)[-1] / "train_state.json").read_text())["step"]


def assert_saved_and_printed_the_resume_command(err: str, runs: Path, signals: str, flags: list[str]) -> None:
    """The trainer's log under a bare `accelerate launch {flags}`: the signal (one of `signals`, a regex
    alternation), the newest complete checkpoint, and the command that resumes that run with the same launcher."""
    run = only_run(runs)
    step = saved_step(runs)
    printed = re.search(rf"stopped by signal ({signals}) at step {step}; saved "
                        rf"{re.escape(str(complete_checkpoints(run)[-1]))}\. Continue with:\n.*accelerate launch "
                        rf"{re.escape(' '.join(flags))} -m imgcls\.train --resume {re.escape(str(run))}\n", err)
    assert printed, err[-3000:]


def test_ctrl_c_under_imgcls_launch_exits_75_without_a_traceback(tmp_path, image_folder):
    recipe = make_recipe(tmp_path, image_folder, "runs")
    proc = start(imgcls_launch(recipe, "cpu.yaml"), tmp_path)
    wait_for_checkpoint(tmp_path / "runs", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err
    assert f"stopped by signal 2 at step {saved_step(tmp_path / 'runs')}; saved " in err


def test_ctrl_c_under_bare_accelerate_launch_still_saves_a_checkpoint_and_prints_the_resume_command(tmp_path,
                                                                                                   image_folder):
    """What docs/distributed.md documents for one process: the trainer saves the checkpoint and prints the resume command
    whatever accelerate does; accelerate's own status and traceback depend on its version."""
    recipe = make_recipe(tmp_path, image_folder, "runs")
    flags = ["--config_file", str(CONFIGS / "cpu.yaml")]
    proc = start(bare_accelerate(recipe, *flags), tmp_path)
    wait_for_checkpoint(tmp_path / "runs", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)  # the trainer holds the pipe until it has saved and exited
    # accelerate's own (status, KeyboardInterrupt traceback): 1.4.0 lets the KeyboardInterrupt escape and dies of
    # SIGINT (-2 here, 130 in a shell), the trainer saving behind it; 1.16.0 catches it, SIGTERMs the trainer,
    # waits for it (SIGKILL after 5 s) and exits 130 without a traceback
    assert (proc.returncode, "Traceback" in err and "KeyboardInterrupt" in err) in {(-signal.SIGINT, True),
                                                                                     (130, False)}, err[-3000:]
    # the trainer keeps the last signal it got: 2 from the terminal, or 15 when accelerate's SIGTERM comes after
    assert_saved_and_printed_the_resume_command(err, tmp_path / "runs", "2|15", flags)


def test_sigterm_stops_two_processes_with_75_and_the_resumed_run_equals_a_straight_one(tmp_path, image_folder):
    """SIGTERM to the launcher alone (`kill PID`, a scheduler): both ranks stop at the same step and save; the
    run resumed with --resume auto ends with the same weights and metrics as a 2-process run that never stopped."""
    straight = make_recipe(tmp_path, image_folder, "a")
    done = subprocess.run(imgcls_launch(straight, "cpu_2proc.yaml"), capture_output=True, text=True, env=cpu_env(),
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = make_recipe(tmp_path, image_folder, "b")
    proc = start(imgcls_launch(stopped, "cpu_2proc.yaml"), tmp_path)
    wait_for_checkpoint(tmp_path / "b", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "exitcode" not in err  # nor torch elastic's failure report
    step = saved_step(tmp_path / "b")
    assert step >= 3 and f"stopped by signal 15 at step {step}; saved " in err

    resumed = subprocess.run(imgcls_launch(stopped, "cpu_2proc.yaml", "--resume", "auto"), capture_output=True,
                             text=True, env=cpu_env(), cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_a, run_b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    assert json.loads((run_b / "results.json").read_text())["steps"] == 30
    for kind in ("last", "best"):
        assert_same_weights(weights(run_a / "model" / kind), weights(run_b / "model" / kind))
    assert stable_rows(run_a) == stable_rows(run_b)


@pytest.mark.parametrize("shutdown_timeout, saved", [("120", True), ("0", False)])
def test_sigterm_under_bare_accelerate_two_processes_waits_the_shutdown_timeout(tmp_path, image_folder,
                                                                                shutdown_timeout, saved):
    """What docs/distributed.md documents for several processes: torch elastic passes the signal on, waits
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for the workers (who save and exit 75), SIGKILLs any left, then
    accelerate exits with a status that depends on its version. With 0 s the workers die before they can save."""
    recipe = make_recipe(tmp_path, image_folder, "runs")
    flags = ["--multi_gpu", "--num_processes", "2", "--main_process_port", free_port()]
    proc = start(bare_accelerate(recipe, *flags), tmp_path, cpu_env(**{SHUTDOWN_ENV: shutdown_timeout}))
    wait_for_checkpoint(tmp_path / "runs", 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    # accelerate's own (status, SignalException traceback): 1.4.0 lets torch elastic's SignalException escape
    # (status 1 and its traceback); 1.16.0 catches it and exits 128 + 15 = 143 without a traceback
    signal_exception = "torch.distributed.elastic.multiprocessing.api.SignalException: Process" in err
    assert (proc.returncode, signal_exception) in {(1, True), (143, False)}, err[-3000:]
    assert ("stopped by signal 15 at step" in err) is saved
    if saved:
        assert_saved_and_printed_the_resume_command(err, tmp_path / "runs", "15", flags)
    assert ("Unable to shutdown process" in err) is not saved  # then "forcefully exiting via 9"
