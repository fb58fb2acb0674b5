"""Guards of the training loop: a wall-time limit (`train.max_time`) and non-finite losses (`train.on_nonfinite`).

    deadline = Deadline(recipe.train.max_time)   # at setup: counts this process's own time (a resume restarts it)
    deadline.expired(accelerator)                # the main process's clock decides; with N > 1, one all-reduce
    guard = NonFiniteGuard(device)
    guard.observe(loss, step)                    # every micro-batch, on the device: no host sync
    guard.read(accelerator)                      # host sync: (first bad step, its loss) since the last read, or None

The trainer reads the guard where it syncs anyway (log, evaluation, checkpoint) under "stop", and once per
optimizer step under "skip" (it must know before `optimizer.step()`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate.logging import get_logger

from imgcls.errors import NonFiniteLoss
from imgcls.training.checkpoint import complete_checkpoints

log = get_logger("imgcls.train")

clock = time.monotonic  # tests replace it with a fake clock


class Deadline:
    """`seconds` of wall time from now; 0 = none."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, clock()

    def passed(self) -> bool:
        return bool(self.seconds) and clock() - self.start > self.seconds

    def expired(self, accelerator) -> bool:
        """The same answer on every process: the main process's clock, shared by one small all-reduce."""
        if not self.seconds:
            return False
        if accelerator.num_processes == 1:
            return self.passed()
        flag = torch.tensor([float(accelerator.is_main_process and self.passed())], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


class NonFiniteGuard:
    """The first non-finite loss since the last read: its optimizer step (1-based) and value, kept on the device."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss, self.value)

    def read(self, accelerator) -> tuple[int, float] | None:
        """(step, loss) of the earliest bad step on any process, or None; clears. Collective with N > 1."""
        step, value = self.step.reshape(1), self.value.reshape(1)
        if accelerator.num_processes > 1:
            step, value = accelerator.gather((step, value))
        bad = [(s, v) for s, v in zip(step.tolist(), value.tolist()) if s >= 0]
        self.step.fill_(-1)
        self.value.zero_()
        return min(bad) if bad else None


def nonfinite_message(step: int, epoch: int, value: float, checkpoint: Path | None, in_a_row: int = 0) -> str:
    kept = (f"the newest checkpoint, {checkpoint}, is from before it and was left as it was" if checkpoint
            else "no checkpoint was saved before it")
    why = (f"{in_a_row} optimizer steps in a row were skipped (train.max_skipped_steps), the last "
           if in_a_row else "")
    return (f"{why}non-finite training loss ({value}) at optimizer step {step} (epoch {epoch}); the run is stopped "
            f"and {kept}. Lower optim.lr, set optim.grad_clip_norm (e.g. 1.0), or under fp16 use bf16 (same range "
            f"as fp32); train.on_nonfinite = \"skip\" skips such steps instead")


class NonFiniteSteps:
    """The Trainer's part for `train.on_nonfinite`: "stop" raises where the loop syncs anyway, "skip" drops an
    optimizer step's gradients (up to `train.max_skipped_steps` in a row)."""

    def check_finite(self) -> None:
        """on_nonfinite = "stop": read the device flag where the loop syncs anyway (log, evaluation, checkpoint),
        before anything of a bad state is logged or saved."""
        if self.recipe.train.on_nonfinite == "stop" and (bad := self.nonfinite.read(self.accelerator)):
            self.raise_nonfinite(*bad)

    def skip_step(self) -> bool:
        """on_nonfinite = "skip": whether this optimizer step had a non-finite loss; if so its gradients are
        dropped. One host sync per optimizer step (the decision must precede `optimizer.step()`)."""
        s, bad = self.state, self.nonfinite.read(self.accelerator)
        if bad is None:
            s.skipped_in_a_row = 0
            return False
        s.skipped_steps, s.skipped_in_a_row = s.skipped_steps + 1, s.skipped_in_a_row + 1
        if s.skipped_in_a_row > self.recipe.train.max_skipped_steps:
            self.raise_nonfinite(*bad, in_a_row=s.skipped_in_a_row)
        log.warning("non-finite training loss (%s) at optimizer step %d: step skipped (%d in a row, %d in all)",
                    bad[1], bad[0], s.skipped_in_a_row, s.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def raise_nonfinite(self, step: int, value: float, in_a_row: int = 0) -> None:
        saved = complete_checkpoints(self.run_dir)
        raise NonFiniteLoss(nonfinite_message(step, (step - 1) // self.plan.steps_per_epoch, value,
                                              saved[-1] if saved else None, in_a_row))
