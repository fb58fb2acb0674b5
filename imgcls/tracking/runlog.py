"""`[tracking]`: the always-on `metrics.jsonl`, Accelerate's trackers (W&B, TensorBoard) and the run's plots.

Only the main process writes. `metrics.jsonl` is the local source of truth: one JSON object per log event,
`step` = optimizer step. The trackers get the same numbers, nested dicts flattened (`val/per_class_top1/<class>`),
the resolved recipe as config, and at the end a confusion matrix, a gallery of misclassified validation images
and (`upload_model`) the best model as a W&B artifact. A tracker that cannot start (no package, no login) or
fails later is reported and dropped; it never stops a run.

A resumed run continues the same W&B run id (saved in the checkpoint's TrainState) and the same TensorBoard
log, whose events after the checkpoint are purged as the rows of `metrics.jsonl` are, so steps keep increasing;
W&B is re-sent the rows it may have lost to a hard kill.
The W&B mode is `tracking.mode` unless WANDB_MODE is set (e.g. `offline` on a cluster without network).

W&B gets one history row per step, closed here with `commit=True`: the scalars of a step's events (train,
val, test) are gathered and sent together when the step changes, after the final report (whose images and
tables go into the same open row just before), or at close. Left to wandb, a row logged with `step=` and no
commit stays open in wandb-core until a later step or the run's exit closes it, so the last step's row
depended on the run's exit path (a W&B tracker dropped by a failing final report was never finished, and the
last step never written); and anything that commits the open step early makes wandb drop the rest of it.
close() returns once wandb-core has written the whole run file (`wait_for_run_file`): `wandb.finish()` returns
before that, and a reader right after it could find the file without its last records.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from imgcls.tracking import plots, wandb_run
from imgcls.tracking.report import misclassified, send_tensorboard_report
from imgcls.recipe import Recipe

log = logging.getLogger(__name__)


def available_backends(backends: list[str]) -> list[str]:
    usable = []
    for name in backends:
        try:
            __import__(name)
            usable.append(name)
        except ImportError:
            log.error("tracking.backends has %r but the %r package is not installed: pip install 'imgcls[tracking]'"
                      " (continuing without it)", name, name)
    return usable


def flat_scalars(values: dict, prefix: str) -> dict:
    """{"top1": .9, "per_class_top1": {"a": 1.0}} -> {"val/top1": .9, "val/per_class_top1/a": 1.0}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = value
    return out


def _flat_config(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


class RunLog:
    """metrics.jsonl + trackers + plots, main process only (other processes hold a no-op instance)."""

    def __init__(self, accelerator, recipe: Recipe, run_dir: Path):
        self.accelerator, self.recipe, self.run_dir = accelerator, recipe, run_dir
        self.enabled = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list[str] = []
        self.rows = sum(1 for _ in self.path.open()) if self.enabled and self.path.exists() else 0
        self.resumed = False
        self.confusions: dict[str, tuple[torch.Tensor, list[str]]] = {}
        self._wandb_row: tuple[int, dict] | None = None  # W&B: the open step and its values, not sent yet

    def truncate(self, rows: int) -> None:
        """On resume: drop the rows written after the checkpoint, so the log reads as one uninterrupted run."""
        self.rows, self.resumed = rows, True
        if not self.enabled or not self.path.exists():
            return
        kept = self.path.read_text().splitlines(keepends=True)[:rows]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)

    # ------------------------------------------------------------------ trackers
    def start_trackers(self, resume_ids: dict) -> None:
        """Start each backend on its own, so one that fails leaves the others running."""
        if not self.enabled:
            return
        for name in available_backends(list(self.recipe.tracking.backends)):
            try:
                tracker = self._wandb(resume_ids) if name == "wandb" else self._tensorboard()
                if tracker is None:
                    continue
                tracker.start()
            except Exception as e:  # a tracker must never kill training
                hint = f" {wandb_run.LOGIN_HINT}" if name == "wandb" else ""
                log.error("could not start the %s tracker (%s: %s); continuing without it.%s", name,
                          type(e).__name__, e, hint)
                continue
            self.accelerator.trackers.append(tracker)
            self.trackers.append(name)
            if name == "tensorboard" and not self.resumed:
                self._tensorboard_config(tracker.tracker)
            if name == "wandb" and self.resumed:
                self._resend_missing_rows(tracker)
        if self.trackers:
            log.info("tracking with %s", ", ".join(self.trackers))

    def _wandb(self, resume_ids: dict):
        import wandb
        from accelerate.tracking import WandBTracker

        t, mode = self.recipe.tracking, wandb_run.wandb_mode(self.recipe.tracking.mode)
        problem = wandb_run.wandb_login_problem(mode)
        if problem:
            log.error("%s; continuing without W&B. %s", problem, wandb_run.LOGIN_HINT)
            return None
        timeout = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": wandb_run.WANDB_INIT_TIMEOUT}
        kwargs = {"name": t.run_name or f"{self.recipe.name}/{self.run_dir.name}", "dir": str(self.run_dir),
                  "mode": mode, "tags": list(t.tags) or None, "notes": t.notes or None, "group": t.group or None,
                  "entity": t.entity or None, "config": self.recipe.model_dump(mode="json"),
                  "settings": wandb.Settings(**timeout)}
        if resume_ids.get("wandb"):
            kwargs.update(id=resume_ids["wandb"], resume="allow")
        return WandBTracker(t.project, **{k: v for k, v in kwargs.items() if v is not None})

    def _tensorboard(self):
        from accelerate.tracking import TensorBoardTracker

        logdir = self.accelerator.logging_dir or self.run_dir / "tensorboard"
        kwargs = {}
        if self.resumed:  # hide what the interrupted attempt logged after the checkpoint
            kwargs["purge_step"] = self._last_step() + 1
        return TensorBoardTracker("", str(logdir), **kwargs)

    def _kept_rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def _last_step(self) -> int:
        rows = self._kept_rows()
        return rows[-1]["step"] if rows else -1

    def _resend_missing_rows(self, tracker) -> None:
        """On resume W&B gets every kept row of metrics.jsonl at or after its own step counter. Online, that is
        what the server lacks (a hard kill loses what W&B still held); offline, where the counter starts at 0,
        the whole log up to the checkpoint, so each attempt's run file is complete on its own."""
        start = tracker.tracker.step
        try:
            for row in self._kept_rows():
                if row["step"] >= start:
                    if self._wandb_row is not None and self._wandb_row[0] != row["step"]:
                        step, values = self._wandb_row
                        self._wandb_row = None
                        tracker.log(values, step=step, commit=True)
                    values = {k: v for k, v in row.items() if k not in ("event", "step", "time")}
                    self._wandb_add(row["step"], flat_scalars(values, row["event"]))
        except Exception as e:
            self._wandb_row = None
            log.error("could not re-send the logged rows to W&B (%s: %s)", type(e).__name__, e)
        # the last step stays open: the resumed run may log more of it (val after the checkpoint, say)

    def _tensorboard_config(self, writer) -> None:
        """The resolved recipe: as text, and as hparams in the same run (not accelerate's extra sub-run)."""
        from torch.utils.tensorboard.summary import hparams

        from imgcls.recipe import recipe_to_toml

        try:
            writer.add_text("recipe", "```toml\n" + recipe_to_toml(self.recipe) + "\n```", 0)
            for summary in hparams(_flat_config(self.recipe.model_dump(mode="json")),
                                   {"val/top1": 0.0, "val/loss": 0.0}):
                writer.file_writer.add_summary(summary)
            writer.flush()
        except Exception as e:
            log.error("could not write the recipe to TensorBoard (%s: %s)", type(e).__name__, e)

    def run_ids(self) -> dict:
        ids = {}
        if "wandb" in self.trackers:
            ids["wandb"] = self.accelerator.get_tracker("wandb", unwrap=True).id
        return ids

    def _each_tracker(self, action: str, fn, only: str | None = None, skip: str | None = None) -> None:
        for tracker in list(self.accelerator.trackers):
            if (only is not None and tracker.name != only) or tracker.name == skip:
                continue
            try:
                fn(tracker)
            except Exception as e:
                log.error("the %s tracker failed while %s (%s: %s); continuing without it", tracker.name, action,
                          type(e).__name__, e)
                self.accelerator.trackers.remove(tracker)
                self.trackers.remove(tracker.name)

    # ------------------------------------------------------------------ logging
    def log(self, event: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.trackers:
            scalars = flat_scalars(values, event)
            self._each_tracker("logging", lambda tracker: tracker.log(scalars, step=step), skip="wandb")
            if "wandb" in self.trackers:
                self._wandb_at(step)
                self._wandb_add(step, scalars)

    # ------------------------------------------------------------------ W&B: one committed row per step
    def _wandb_add(self, step: int, values: dict) -> None:
        if self._wandb_row is None:
            self._wandb_row = (step, {})
        self._wandb_row[1].update(values)

    def _wandb_at(self, step: int) -> None:
        """Values for `step` come next: the open row of an earlier step is complete, send it."""
        if self._wandb_row is not None and self._wandb_row[0] != step:
            self.flush_wandb()

    def flush_wandb(self) -> None:
        """Send the open W&B row with commit=True, so wandb writes it now (not when a later step or the run's
        exit closes it). Called when the step changes, with the final report, and at close."""
        if self._wandb_row is None:
            return
        step, values = self._wandb_row
        self._wandb_row = None
        self._each_tracker("logging", lambda tracker: tracker.log(values, step=step, commit=True), only="wandb")

    def log_confusion(self, split: str, confusion: torch.Tensor, names: list[str]) -> None:
        """The latest confusion matrix of a split, for the plots and the final report."""
        if self.enabled:
            self.confusions[split] = (confusion.cpu().clone(), list(names))

    def draw_plots(self) -> None:
        """After each validation: `plots/curves.png` and `plots/confusion_val.png` (never stops training)."""
        if not (self.enabled and self.recipe.tracking.plots):
            return
        try:
            plots.write_run_plots(self.run_dir, *self.confusions.get("val", (None, None)))
        except Exception:
            log.exception("could not draw the plots in %s; training continues", self.run_dir / plots.PLOTS_DIR)

    def final_report(self, model, val_dataset, step: int) -> None:
        """End of training: confusion matrix (test, else val) and misclassified validation images, as PNGs and
        to the trackers; with `tracking.upload_model`, the best model as a W&B artifact."""
        self.draw_plots()  # the curves now end with the test point
        if not self.enabled or not self.confusions or not (self.trackers or self.recipe.tracking.plots):
            return
        split = "test" if "test" in self.confusions else "val"
        confusion, names = self.confusions[split]
        try:
            wrong = misclassified(model, val_dataset, self.recipe.data.mean, self.recipe.data.std)
            figures = {f"{split}/confusion_matrix": plots.render(plots.confusion_figure(confusion, names, split))}
            if wrong:
                figures["val/misclassified"] = plots.render(plots.gallery_figure(wrong, names))
            if self.recipe.tracking.plots:
                for tag, image in figures.items():
                    name = f"confusion_{split}.png" if tag.endswith("confusion_matrix") else "misclassified.png"
                    plots.save_png(image, self.run_dir / plots.PLOTS_DIR / name)
        except Exception:
            log.exception("could not draw the final confusion matrix and gallery; continuing")
            return
        report = {"split": split, "confusion": confusion, "names": names, "wrong": wrong, "figures": figures}
        self._each_tracker("logging the final report", lambda tracker: send_tensorboard_report(tracker, report, step),
                           skip="wandb")
        if "wandb" in self.trackers:  # into the step's open row, which the metrics then commit, before the upload
            self._wandb_at(step)
            self._wandb_add(step, {})  # the row is committed below even if no metric was logged at this step
            try:
                for tracker in [t for t in self.accelerator.trackers if t.name == "wandb"]:
                    tracker.log(wandb_run.report_payload(report), step=step)
            except Exception as e:  # the images and tables are lost, not the step's metrics nor the run's end
                log.error("could not send the final report to W&B (%s: %s); its metrics are still sent",
                          type(e).__name__, e)
            self.flush_wandb()
        if self.recipe.tracking.upload_model and "wandb" in self.trackers:
            try:
                wandb_run.upload_model(self.accelerator.get_tracker("wandb", unwrap=True), self.recipe,
                             self.run_dir / "model" / "best")
            except Exception as e:
                log.error("uploading the best model to W&B failed (%s: %s); it stays in %s", type(e).__name__, e,
                          self.run_dir / "model" / "best")

    def close(self) -> None:
        if not self.enabled:
            return
        failed = sys.exc_info()[0] is not None  # called from train()'s `finally`: mark a crashed run as failed
        self.flush_wandb()  # a crashed run's last step too
        run_files = []
        for tracker in list(self.accelerator.trackers):
            run_file = wandb_run.run_file(tracker) if tracker.name == "wandb" else None
            try:
                if failed and tracker.name == "wandb":
                    tracker.tracker.finish(exit_code=1)
                else:
                    tracker.finish()
            except Exception as e:
                log.error("closing the %s tracker failed (%s: %s)", tracker.name, type(e).__name__, e)
                continue
            if run_file is not None:
                run_files.append(run_file)
        self.accelerator.trackers.clear()
        self.trackers = []
        for run_file in run_files:
            wandb_run.wait_for_run_file(run_file)


