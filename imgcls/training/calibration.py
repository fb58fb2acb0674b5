"""Confidence calibration: temperature scaling and expected calibration error (ECE).

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the logits by one
scalar T fitted on the validation split by minimising the NLL of softmax(logits / T); it never changes the
predicted class, only how confident the model says it is. The trainer calls `calibrate_artifact` at the end of
training (`train.calibrate = true`) and stores T in `model/best/config.json`; predict and eval read it from
there (or from an exported model's metadata). A fitted T that would make the validation NLL or ECE worse is not
used: T stays 1, and the stored result and a warning say so.

    result = calibrate(val_logits, val_labels)   # {"temperature", "kept_at_1", "ece_before", "ece_after", ...}
    conf, correct = confidence_correct(probs, labels)
    ece(conf, correct, n_bins=15)
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from imgcls.atomic import write_json
from imgcls.inference.calibration import N_BINS, confidence_correct, ece, nll, softmax

log = logging.getLogger(__name__)

# With at least one misclassified image the NLL has a minimum at a finite T > 0 (it grows without bound as
# T -> 0); a few extreme images can still put it far out, so the fit is held to a sane range and says so.
T_MIN, T_MAX = 0.05, 20.0


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """T minimising NLL(softmax(logits / T), labels), by L-BFGS on log T (so T stays positive)."""
    import torch
    import torch.nn.functional as F

    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.exp().item())
    if not math.isfinite(t):
        return 1.0
    if not T_MIN <= t <= T_MAX:
        log.warning("temperature fit ran to %.3g; held to [%g, %g]", t, T_MIN, T_MAX)
    return min(max(t, T_MIN), T_MAX)


def calibrate(logits, labels, n_bins: int = N_BINS) -> dict:
    """Fit T on (logits, labels) and use it unless it makes the validation NLL or ECE worse; then T stays 1
    (`kept_at_1`), the fit is still recorded (`fitted_temperature`, `ece_fitted`) and a warning says why.
    `ece_after` / `nll_after` are at the temperature actually used. On a small validation set ECE is noisy,
    but a T that worsens the one calibration number the user sees is not worth shipping."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)

    def ece_at(t: float) -> float:
        return ece(*confidence_correct(softmax(logits, t), labels), n_bins)
    before, nll_before = ece_at(1.0), nll(logits, labels)
    result = {"temperature": 1.0, "fitted_temperature": None, "kept_at_1": True, "ece_before": before,
              "ece_fitted": None, "ece_after": before, "nll_before": nll_before, "nll_after": nll_before,
              "bins": n_bins, "n": int(len(labels))}
    if (logits.argmax(axis=1) == labels).all():
        log.warning("calibration: every validation image is classified correctly, so the NLL keeps falling as "
                    "T -> 0 and has no minimum; temperature left at 1")
        return result
    t = fit_temperature(logits, labels)
    result.update(fitted_temperature=t, ece_fitted=ece_at(t))
    if nll(logits, labels, t) > nll_before:
        log.warning("calibration: the fitted temperature %.4f would raise the validation NLL from %.4f to %.4f, "
                    "so the temperature is kept at 1", t, nll_before, nll(logits, labels, t))
    elif result["ece_fitted"] > before:
        log.warning("calibration: the fitted temperature %.4f would raise the validation ECE from %.4f to %.4f, "
                    "so the temperature is kept at 1 (the model's own probabilities)", t, before, result["ece_fitted"])
    else:
        result.update(temperature=t, kept_at_1=False, ece_after=result["ece_fitted"],
                      nll_after=nll(logits, labels, t))
    return result


def write_calibration(artifact_dir: Path, calibration: dict) -> None:
    """Store T and the calibration numbers in the artifact's config.json (temp file, then rename)."""
    path = Path(artifact_dir) / "config.json"
    config = json.loads(path.read_text())
    config["temperature"] = calibration["temperature"]
    config["calibration"] = calibration
    write_json(path, config)


def calibrate_artifact(logits, labels, artifact_dir: Path) -> dict:
    """End of training, main process: fit T on the validation logits and write it into the artifact."""
    if len(labels) == 0:
        log.warning("calibration skipped: the validation split is empty")
        return {}
    result = calibrate(logits.cpu().numpy() if hasattr(logits, "cpu") else logits,
                       labels.cpu().numpy() if hasattr(labels, "cpu") else labels)
    write_calibration(artifact_dir, result)
    log.info("calibration on val (n=%d): temperature %.4f, ECE (%d bins) %.4f -> %.4f, NLL %.4f -> %.4f",
             result["n"], result["temperature"], result["bins"], result["ece_before"], result["ece_after"],
             result["nll_before"], result["nll_after"])
    return result
