"""Scores from a confusion matrix (rows: true class, columns: predicted), one definition for the trainer's
`metrics.jsonl` and for `imgcls-eval`'s report.

Macro averages are sklearn's (`f1_score(average="macro")`, `balanced_accuracy_score`): over the classes that
occur, as truth or prediction for precision, recall and F1, as truth for balanced accuracy. A class of the label
set that the split never shows and the model never predicts is left out, not counted as 0. Per class,
F1 = 2 tp / (true + predicted) (= 2PR / (P + R)); a class that occurs but is never predicted right scores 0.
"""
from __future__ import annotations

import numpy as np


def per_class_scores(confusion, names: list[str]) -> dict[str, dict]:
    """Precision, recall, F1 and support per class."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp, predicted, actual = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    seen = predicted + actual
    f1 = np.divide(2 * tp, seen, out=np.zeros_like(tp), where=seen > 0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(actual[i])} for i, name in enumerate(names)}


def present(confusion) -> np.ndarray:
    """Which classes occur as truth or prediction."""
    confusion = np.asarray(confusion)
    return (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0


def macro_scores(confusion) -> dict[str, float]:
    """Mean precision, recall and F1 over the classes that occur (0.0 each for an empty matrix)."""
    names = [str(i) for i in range(len(confusion))]
    scores = list(per_class_scores(confusion, names).values())
    keep = [s for s, p in zip(scores, present(confusion)) if p]
    return {k: float(np.mean([s[k] for s in keep])) if keep else 0.0 for k in ("precision", "recall", "f1")}


def macro_f1(confusion) -> float:
    return macro_scores(confusion)["f1"]


def balanced_accuracy(confusion) -> float:
    """Mean recall over the classes that occur as truth. 0.0 for an empty matrix."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=1)
    keep = support > 0
    return float((np.diag(confusion)[keep] / support[keep]).mean()) if keep.any() else 0.0
