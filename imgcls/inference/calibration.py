"""Calibration measures shared by training (the temperature fit) and inference (predict, eval): softmax with a
temperature, negative log-likelihood, expected calibration error (ECE, equal-width confidence bins) and the
reliability table. numpy only, float64.

    conf, correct = confidence_correct(softmax(logits, T), labels)
    ece(conf, correct, n_bins=N_BINS)
"""
from __future__ import annotations

import numpy as np

N_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of logits / T over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence_correct(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 probability and whether the top-1 class is the label, per sample."""
    probs = np.asarray(probs)
    return probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> dict[str, list]:
    """Equal-width confidence bins (i/n, (i+1)/n]: count, mean confidence and accuracy in each."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    nonzero = np.maximum(count, 1)
    return {"lower": (np.arange(n_bins) / n_bins).tolist(), "upper": (np.arange(1, n_bins + 1) / n_bins).tolist(),
            "count": count.tolist(), "confidence": (conf_sum / nonzero).tolist(),
            "accuracy": (acc_sum / nonzero).tolist()}


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: sum over bins of (bin size / n) * |accuracy - mean confidence|."""
    bins = reliability(confidence, correct, n_bins)
    n = max(sum(bins["count"]), 1)
    return float(sum(c / n * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"])))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    probs = softmax(logits, temperature)
    picked = probs[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.maximum(picked, 1e-300)).mean())

