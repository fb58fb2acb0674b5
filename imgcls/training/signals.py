"""Stopping a run on SIGTERM/SIGINT, and the command that continues it.

The handler only records the signal; the trainer finishes the current step, saves a checkpoint and exits 75.
The printed command resumes that exact run with its own recipe, under the same launcher (read from the parent
process when it is `accelerate launch`, from `RESUME_ENV` under imgcls-launch), so it works verbatim.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import torch

# accelerate's launcher passes these to its workers; a resume needs them again (e.g. the 2-process CPU config)
_LAUNCH_ENV = ("ACCELERATE_USE_CPU",)
# imgcls-launch (which runs accelerate in-process, so it is the trainers' parent) puts here the command that
# launches this job again, recipe and overrides included, ending with "--" before the trainer's own arguments
RESUME_ENV = "IMGCLS_LAUNCH_COMMAND"


class StopSignal:
    """SIGTERM/SIGINT: finish the current step, save, exit with EXIT_PREEMPTED."""

    def __init__(self):
        self.raised = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def release(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.raised = signum

    def agreed(self, accelerator) -> bool:
        """All processes stop at the same step if any one was signalled (one small all-reduce)."""
        if accelerator.num_processes == 1:
            return bool(self.raised)
        flag = torch.tensor([float(self.raised)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


def parent_cmdline() -> list[str]:
    """The command line of the process that started this one ([] where /proc is not available)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def launcher_prefix(parent: list[str]) -> list[str]:
    """`accelerate launch [its options]` from the parent's command line, without the script and its arguments
    (found with accelerate's own argument parser); [] when the parent is not accelerate's launcher."""
    for k, word in enumerate(parent):
        name = Path(word).name
        if name == "accelerate" and parent[k + 1:k + 2] == ["launch"]:
            options = parent[k + 2:]
            break
        if name == "accelerate.commands.launch":
            options = parent[k + 1:]
            break
    else:
        return []
    from accelerate.commands.launch import launch_command_parser

    try:
        parsed = launch_command_parser().parse_args(options)
    except SystemExit:
        return []
    cut = len(options) - len(parsed.training_script_args) - 1
    head = absolute_paths(options[:cut], ("--config_file",))
    return ["accelerate", "launch", *(o for o in head if o not in ("-m", "--module"))]


def absolute_paths(words: list[str], flags: tuple[str, ...]) -> list[str]:
    """`words` with the path after each of `flags` made absolute (when it exists)."""
    out = list(words)
    for k, word in enumerate(out[:-1]):
        if word in flags and os.path.exists(out[k + 1]):
            out[k + 1] = os.path.abspath(out[k + 1])
    return out


def _python() -> str:
    on_path = shutil.which("python")
    same = on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable)
    return "python" if same else sys.executable


def resume_command(run_dir: Path, parent: list[str] | None = None, env: dict | None = None) -> str:
    """The command that continues `run_dir` exactly: the same launcher, the run's own recipe."""
    parent = parent_cmdline() if parent is None else parent
    env = os.environ if env is None else env
    run_dir = Path(run_dir).resolve()  # a run resumed by a relative path: the command works from any folder
    if launch := env.get(RESUME_ENV):  # imgcls-launch passes the recipe and overrides again: same recipe
        return f"{launch} {shlex.join(['--resume', str(run_dir)])}"
    prefix = launcher_prefix(parent)
    if prefix:
        cmd = [*prefix, "-m", "imgcls.train"]
        cmd = [f"{k}={env[k]}" for k in _LAUNCH_ENV if env.get(k)] + cmd
    else:
        cmd = [_python(), "-m", "imgcls.train"]
    return shlex.join([*cmd, "--resume", str(run_dir)])
