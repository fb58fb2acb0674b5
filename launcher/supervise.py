"""Run accelerate's launcher inside imgcls-launch so that a stopped run's exit status (75) reaches the shell.

`accelerate launch` answers Ctrl-C with a KeyboardInterrupt traceback and status 130 (one process), and a
SIGTERM or Ctrl-C under several processes with torch elastic's SignalException traceback and status 1, even
though the training processes finished their step, saved and exited 75. Here accelerate's `launch_command` (what
`accelerate launch ARGS` runs) runs on a worker thread: torch elastic installs its signal handlers only on the
main thread, so the main thread keeps them and passes each stop signal on to the training processes (this
process's children), whose exit status then becomes ours.

    status = run_accelerate(["--config_file", "accelerate_configs/cpu_2proc.yaml", "-m", "imgcls.train", "r.toml"])
"""
from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading

import psutil

from imgcls.exitcodes import EXIT_PREEMPTED
from imgcls.training.preflight import Expected, rendezvous_failure_message

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_accelerate(argv: list[str], expected: Expected | None = None, timeout_s: float = 300) -> int:
    """`accelerate launch ARGV` in this process; returns the training processes' exit status (shell style: a
    process killed by signal N gives 128 + N). `expected` (several machines) explains a failed rendezvous."""
    outcome: dict = {}
    thread = threading.Thread(target=_launch, args=(argv, outcome), name="accelerate-launch")
    previous = {sig: signal.signal(sig, _forward) for sig in STOP_SIGNALS}
    try:
        thread.start()
        thread.join()  # signals still run _forward on this thread while it waits
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_status(outcome.get("error"), expected, timeout_s)


def _launch(argv: list[str], outcome: dict) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_quiet_expected)
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except BaseException as e:  # judged on the main thread, which owns the exit status
        outcome["error"] = e


def _forward(signum: int, frame) -> None:
    """Ctrl-C reaches a single training process from the terminal as well (same process group); a second
    delivery only sets its stop flag again. Several processes run in sessions of their own: only this reaches them."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signum)


def _quiet_expected(record: logging.LogRecord) -> bool:
    """torch elastic's lines that are wrong or noise here: signals ARE handled (by _forward), and a worker that
    exits EXIT_PREEMPTED stopped on purpose after saving (its own log says so)."""
    msg = str(record.msg)  # a record's msg may be any object
    if msg.startswith("Failed to register signal handlers since torchelastic is running on a child thread"):
        return False
    return not (msg.startswith("failed (exitcode: %s)") and record.args and record.args[0] == EXIT_PREEMPTED)


def exit_status(error: BaseException | None, expected: Expected | None, timeout_s: float) -> int:
    """The status of the run from what accelerate's launcher raised; unknown errors are raised again."""
    if error is None:
        return 0
    if isinstance(error, subprocess.CalledProcessError):  # the single process of accelerate's simple launcher
        return _shell_status(error.returncode)
    if isinstance(error, SystemExit):  # accelerate's own argument errors (already printed)
        return error.code if isinstance(error.code, int) else 1
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(error, ChildFailedError):
        _, first = error.get_first_failure()  # the root cause; the agent then stops the other processes
        if first.exitcode != EXIT_PREEMPTED:
            print(error.format_msg(), file=sys.stderr)
        return _shell_status(first.exitcode)
    if expected is not None and isinstance(error, (dist.DistStoreError, dist.DistNetworkError)):
        print("\n" + rendezvous_failure_message(expected, timeout_s, str(error)), file=sys.stderr)
        return 1
    raise error


def _shell_status(code: int) -> int:
    return 128 - code if code < 0 else code
