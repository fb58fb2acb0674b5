"""Multi-process pre-flight: form the process group with a deadline, then prove it with one all-reduce.

Without this, a node that never arrives makes the others wait 10-30 minutes in silence. Call
`init_distributed_state()` once, before the first `Accelerator(...)`; the Accelerator then reuses the state.

    IMGCLS_PREFLIGHT_TIMEOUT=60 accelerate launch ... -m imgcls.train recipe.toml   # default 300 s

Where the wait happens (measured, accelerate 1.15 / torch 2.14):
- under `accelerate launch` with several machines, the torchrun agent meets its peers BEFORE any worker starts;
  that wait is bounded by `--rdzv_conf timeout=S` (the launcher passes it) and explained by the launcher;
- inside the workers, `torch.distributed.init_process_group` (run by `PartialState`) waits for the other ranks
  for the process-group timeout; this module sets it to the pre-flight timeout, then restores the long default
  so a slow checkpoint write on rank 0 does not kill training.

Torch is imported inside the functions: the launcher uses `rendezvous_failure_message` without paying for torch.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from imgcls.errors import PreflightError

TIMEOUT_ENV = "IMGCLS_PREFLIGHT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def preflight_timeout(env=os.environ) -> float:
    raw = env.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise PreflightError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise PreflightError(f"{TIMEOUT_ENV}={raw!r}: must be > 0 seconds")
    return value


@dataclass(frozen=True)
class Expected:
    """The job shape this process was launched into, as the launcher's environment describes it."""

    machines: int
    procs_per_machine: int
    node_rank: int
    address: str
    port: str

    @classmethod
    def from_env(cls, env=os.environ) -> "Expected":
        world = int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_WORLD_SIZE", world))
        machines = int(env.get("GROUP_WORLD_SIZE", max(world // max(local, 1), 1)))
        return cls(machines, local, int(env.get("GROUP_RANK", "0")),
                   env.get("MASTER_ADDR", "?"), env.get("MASTER_PORT", "?"))

    @property
    def world_size(self) -> int:
        return self.machines * self.procs_per_machine


def rendezvous_failure_message(expected: Expected, timeout_s: float, detail: str, unit: str = "machines") -> str:
    """One paragraph for a group that did not form; `detail` is torch's own error text.

    `unit` says what torch counted in "k/n clients joined": torchrun agents ("machines") or worker processes.
    """
    joined = re.search(r"(\d+)/(\d+) clients joined", detail)
    if joined:
        have, need = int(joined.group(1)), int(joined.group(2))
        if unit == "machines" and need == 2:
            what = "node rank 1 did not arrive"
        else:
            what = f"{need - have} of {need} {unit} did not arrive"
    elif re.search(r"connect|refused|timed out", detail, re.IGNORECASE) and expected.node_rank > 0:
        what = f"node rank {expected.node_rank} could not reach the main node (rank 0)"
    else:
        what = "the processes did not all arrive"
    hint = ("Check that every node runs the launcher with the same --main-address/--main-port and that the port "
            "is open." if expected.machines > 1 else
            "Check the other processes' output: one crashed or stalled before creating the Accelerator.")
    first_line = detail.strip().splitlines()[0] if detail.strip() else "no detail"
    return (
        f"could not form the process group: expected {expected.machines} machines x {expected.procs_per_machine} "
        f"processes at {expected.address}:{expected.port}; {what} within {timeout_s:g} s. {hint} "
        f"(torch: {first_line})"
    )


def init_distributed_state(timeout_s: float | None = None) -> None:
    """Create accelerate's PartialState with a bounded wait, then run `preflight` on it.

    A no-op beyond creating the state for a single process. Raises PreflightError with one clear paragraph.
    """
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env

    timeout_s = preflight_timeout() if timeout_s is None else float(timeout_s)
    expected = Expected.from_env()
    kwargs = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)).to_kwargs()
    try:
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)
    except (dist.DistError, RuntimeError) as e:
        raise PreflightError(rendezvous_failure_message(expected, timeout_s, str(e), unit="processes")) from e
    if expected.world_size > 1 and state.num_processes == 1:
        raise PreflightError(
            f"launched as {expected.world_size} processes, but each one runs alone (no process group). On CPU, "
            "accelerate's multi-process launcher does not pass `use_cpu` on: set ACCELERATE_USE_CPU=1 (imgcls-launch "
            "does this for configs with use_cpu: true)."
        )
    preflight(state, timeout_s)
    if dist.is_initialized():
        set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout  # older torch
        set_timeout(dist.distributed_c10d._get_default_timeout(dist.get_backend()))


def preflight(accelerator_or_state, timeout_s: float) -> None:
    """All-reduce a ones tensor: the sum must equal the world size, within `timeout_s`."""
    import torch
    import torch.distributed as dist

    world = accelerator_or_state.num_processes
    if world == 1 or not dist.is_initialized():
        return
    ones = torch.ones(1, device=accelerator_or_state.device)
    try:
        dist.all_reduce(ones, async_op=True).wait(timeout=timedelta(seconds=timeout_s))
    except (dist.DistError, RuntimeError) as e:
        raise PreflightError(rendezvous_failure_message(Expected.from_env(), timeout_s, str(e), "processes")) from e
    if int(ones.item()) != world:
        raise PreflightError(f"pre-flight all-reduce gave {int(ones.item())}, expected the world size {world}")
