"""Scores of predictions: accuracy, NLL, ECE, Brier (classification); MSE and Gaussian NLL (regression)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["ECE_BINS", "brier", "calibration_bins", "expected_calibration_error", "score"]

ECE_BINS = 15


def calibration_bins(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin on (0, 1]: example count, mean confidence, accuracy (NaN when empty).

    An example with top probability ``c`` falls in bin ``ceil(c * bins) - 1`` (bins are right-closed)."""
    confidence, predicted = probs.max(1)
    correct = (predicted == y).double()
    index = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "count": count.numpy(),
            "confidence": (conf_sum / count).numpy(),
            "accuracy": (correct_sum / count).numpy(),
        }


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    """``sum_b |B_b|/N |acc(B_b) - conf(B_b)|`` over equal-width confidence bins."""
    table = calibration_bins(probs, y, bins)
    filled = table["count"] > 0
    gaps = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float((table["count"][filled] * gaps).sum() / table["count"].sum())


def brier(probs: Tensor, y: Tensor) -> float:
    """Multi-class Brier score: the mean over examples of ``sum_c (p_c - 1[y = c])^2`` (0 best, 2 worst)."""
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def score(output: Tensor, y: Tensor, task: str) -> dict[str, float]:
    """Classification: ``output`` holds class probabilities; regression: predicted means (unit noise)."""
    if task == "regression":
        mse = float(((output - y) ** 2).mean())
        return {"mse": mse, "nll": 0.5 * mse + 0.5 * math.log(2 * math.pi)}
    probs = output.clamp_min(1e-12)
    return {
        "accuracy": float((probs.argmax(1) == y).float().mean()),
        "nll": float(-torch.log(probs[torch.arange(len(y)), y]).mean()),
        "ece": expected_calibration_error(output, y),
        "brier": brier(output, y),
    }
