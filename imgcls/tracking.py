"""`[tracking]`: the always-on `metrics.jsonl` plus Accelerate's trackers (W&B, TensorBoard).

Only the main process writes. `metrics.jsonl` is the local source of truth: one JSON object per log event,
`step` = optimizer step. A tracker that cannot start (no package, no login) is reported and left out; it
never stops a run.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .recipe import Recipe

log = logging.getLogger(__name__)


def _tracker_init_kwargs(recipe: Recipe, run_dir: Path, resume_ids: dict) -> dict:
    t = recipe.tracking
    kwargs: dict = {}
    if "wandb" in t.backends:
        wandb = {"name": t.run_name or f"{recipe.name}/{run_dir.name}", "dir": str(run_dir), "mode": t.mode,
                 "tags": list(t.tags), "notes": t.notes or None, "group": t.group or None,
                 "entity": t.entity or None}
        if resume_ids.get("wandb"):
            wandb.update(id=resume_ids["wandb"], resume="allow")
        kwargs["wandb"] = {k: v for k, v in wandb.items() if v is not None}
    return kwargs


def available_backends(backends: list[str]) -> list[str]:
    usable = []
    for name in backends:
        module = {"wandb": "wandb", "tensorboard": "tensorboard"}[name]
        try:
            __import__(module)
            usable.append(name)
        except ImportError:
            log.error("tracking.backends has %r but the %r package is not installed: pip install 'imgcls[tracking]'"
                      " (continuing without it)", name, module)
    return usable


class RunLog:
    """metrics.jsonl + trackers, main process only (other processes hold a no-op instance)."""

    def __init__(self, accelerator, recipe: Recipe, run_dir: Path):
        self.accelerator, self.recipe, self.run_dir = accelerator, recipe, run_dir
        self.enabled = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[str] = []
        self.rows = sum(1 for _ in self.path.open()) if self.enabled and self.path.exists() else 0

    def truncate(self, rows: int) -> None:
        """On resume: drop the rows written after the checkpoint, so the log reads as one uninterrupted run."""
        self.rows = rows
        if not self.enabled or not self.path.exists():
            return
        kept = self.path.read_text().splitlines(keepends=True)[:rows]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    def start_trackers(self, resume_ids: dict) -> None:
        if not self.enabled:
            return
        backends = available_backends(list(self.recipe.tracking.backends))
        if not backends:
            return
        try:
            self.accelerator.init_trackers(
                self.recipe.tracking.project, config=self.recipe.model_dump(mode="json"),
                init_kwargs=_tracker_init_kwargs(self.recipe, self.run_dir, resume_ids))
            self.trackers = backends
        except Exception as e:  # a tracker must never kill training
            log.error("could not start trackers %s (%s: %s); continuing with metrics.jsonl only. For W&B run "
                      "`wandb login`, or set tracking.mode = \"offline\".", backends, type(e).__name__, e)

    def run_ids(self) -> dict:
        ids = {}
        if "wandb" in self.trackers:
            ids["wandb"] = self.accelerator.get_tracker("wandb", unwrap=True).id
        return ids

    def log(self, event: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.trackers:
            scalars = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
            try:
                self.accelerator.log(scalars, step=step)
            except Exception as e:
                log.error("tracker logging failed (%s); continuing", e)

    def close(self) -> None:
        if self.enabled and self.trackers:
            self.accelerator.end_training()
