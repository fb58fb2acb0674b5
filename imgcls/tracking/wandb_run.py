"""W&B, the parts of `[tracking]` only W&B needs: its mode and login check, the final report as W&B values, the
model artifact, and the wait for wandb-core to finish writing an offline run's file (`wait_for_run_file`:
`wandb.finish()` returns before that). `imgcls.tracking.runlog.RunLog` drives them."""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from imgcls.recipe import Recipe

log = logging.getLogger(__name__)

WANDB_INIT_TIMEOUT = 30.0  # seconds; WANDB_INIT_TIMEOUT in the environment wins
RUN_FILE_TIMEOUT = 30.0  # seconds close() waits for wandb-core to finish writing the run file
LOGIN_HINT = ("Run `wandb login` (or set WANDB_API_KEY), or log offline with tracking.mode = \"offline\" "
              "(or WANDB_MODE=offline) and upload later with `wandb sync`.")


def wandb_mode(recipe_mode: str) -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    return env if env in ("online", "offline", "disabled") else recipe_mode


def wandb_login_problem(mode: str) -> str | None:
    """Online W&B without credentials would prompt or hang; find that out first, without network."""
    if mode != "online":
        return None
    import wandb

    try:
        if wandb.login(prompt=False, verify=False):
            return None
    except Exception as e:  # a broken settings file or netrc, say
        return f"the W&B login check failed ({type(e).__name__}: {e})"
    return "W&B is in online mode but this machine is not logged in (no API key found)"


def report_payload(report: dict) -> dict:
    """The final report as W&B values (images, the confusion-matrix chart, the misclassified table)."""
    import wandb

    split, names = report["split"], report["names"]
    payload = {f"{tag}_image" if tag.endswith("confusion_matrix") else f"{tag}_grid": wandb.Image(image)
               for tag, image in report["figures"].items()}
    if len(names) <= 100:  # the interactive chart is a table of C x C cells
        counts = report["confusion"].flatten().numpy()
        pairs = np.repeat(np.arange(counts.size), counts)
        payload[f"{split}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=(pairs // len(names)).tolist(), preds=(pairs % len(names)).tolist(), class_names=names,
            title=f"{split} confusion matrix")
    if report["wrong"]:
        rows = [[wandb.Image((w["image"] * 255).round().astype(np.uint8)), names[w["true"]], names[w["pred"]],
                 w["confidence"]] for w in report["wrong"]]
        payload["val/misclassified"] = wandb.Table(columns=["image", "true", "predicted", "confidence"],
                                                   data=rows)
    return payload


def upload_model(run, recipe: Recipe, best: Path) -> None:
    """`model/best` as a W&B artifact of type model, named after the recipe, aliased `best`."""
    import wandb

    config = json.loads((best / "config.json").read_text())
    artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{recipe.name}-model"), type="model",
                              metadata={k: config.get(k) for k in ("epoch", "step", "val", "class_names", "model")})
    artifact.add_dir(str(best))
    run.log_artifact(artifact, aliases=["best"])
    log.info("uploaded %s to W&B as artifact %s (type model)", best, artifact.name)


def run_file(tracker) -> Path | None:
    """The W&B run's transaction log (`run-<id>.wandb`), unless the run writes none."""
    try:
        settings = tracker.tracker.settings
        return None if settings.x_skip_transaction_log else Path(settings.sync_file)
    except Exception:
        return None


def wait_for_run_file(path: Path, timeout: float | None = None) -> bool:
    """Wait until W&B's run file is complete (holds the run's exit record). `wandb.finish()` returns before
    wandb-core has written the file's tail: that happens when wandb-core closes the run's stream, on a message
    the SDK sends without waiting for it. Whatever reads the file next (`wandb sync`, a test, the next job
    step) must not find it without the last records, the final step's row among them."""
    from imgcls.tracking.wandb_reader import has_exit_record

    timeout = RUN_FILE_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        try:
            if path.exists() and has_exit_record(path):
                return True
        except Exception as e:  # a damaged file: nothing to wait for
            log.warning("could not check W&B's run file %s (%s: %s)", path, type(e).__name__, e)
            return False
        if time.monotonic() >= deadline:
            log.warning("W&B's run file %s is still incomplete %.0f s after the run finished; wandb-core is "
                        "still writing it", path, timeout)
            return False
        time.sleep(0.02)

