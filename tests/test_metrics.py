"""Calibration metrics against hand-computed values; the predictive really samples the server's Gaussian."""

import math

import numpy as np
import pytest
import torch

from fedvb.config import RunConfig
from fedvb.core.gaussian import DIAGONAL, Gaussian
from fedvb.experiment import evaluate, initial_mean
from fedvb.metrics import brier, calibration_bins, expected_calibration_error, score

# confidences 0.9, 0.75, 0.7, 0.62, 0.91 fall in 15-bin bins 13, 11, 10, 9, 13; correct: yes, no, yes, no, no
PROBS = torch.tensor([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.38, 0.62], [0.91, 0.09]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 0, 1])


def test_ece_by_hand():
    # bin 13 holds 0.9 (right) and 0.91 (wrong): |0.5 - 0.905| with weight 2; the others alone
    expected = (0.75 + 0.3 + 0.62 + 2 * abs(0.5 - 0.905)) / 5
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected, abs=1e-12)
    table = calibration_bins(PROBS, LABELS)
    assert table["count"].tolist() == [0] * 9 + [1, 1, 1, 0, 2, 0]
    assert table["accuracy"][13] == 0.5 and np.isnan(table["accuracy"][0])


def test_ece_bins_are_right_closed_and_zero_when_calibrated():
    # 10 examples at confidence 0.8, 8 right: perfectly calibrated
    probs = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == 1.0  # conf 1 in last bin


def test_brier_and_nll_by_hand():
    assert brier(PROBS, LABELS) == pytest.approx((0.02 + 1.125 + 0.18 + 0.7688 + 1.6562) / 5, abs=1e-12)
    scores = score(PROBS, LABELS, "classification")
    nll = -(math.log(0.9) + math.log(0.25) + math.log(0.7) + math.log(0.38) + math.log(0.09)) / 5
    assert scores["nll"] == pytest.approx(nll, abs=1e-12)
    assert scores["accuracy"] == pytest.approx(2 / 5)
    assert brier(torch.eye(3), torch.arange(3)) == 0.0 and brier(torch.eye(3), torch.tensor([1, 2, 0])) == 2.0


def test_predictive_uses_the_server_precision(tmp_path):
    config = RunConfig.from_mapping(
        dict(dataset="synthetic-logistic", model="softmax", num_clients=5, eval_samples=64, out=str(tmp_path))
    )
    mean = (
        initial_mean(config)
        + 0.7 * torch.randn(len(initial_mean(config)), generator=torch.Generator().manual_seed(1)).double()
    )

    def scores(precision: float) -> dict[str, float]:
        return evaluate(config, mean, Gaussian(mean, torch.full_like(mean, precision), DIAGONAL))

    sharp = scores(1e12)
    for key in ("accuracy", "nll", "ece", "brier"):
        assert sharp[f"predictive_{key}"] == pytest.approx(sharp[key], abs=1e-5)
    wide = scores(0.5)
    assert abs(wide["predictive_nll"] - wide["nll"]) > 0.05
    assert wide["predictive_brier"] != pytest.approx(wide["brier"], abs=1e-3)
    assert "predictive_nll" not in evaluate(config, mean, None)
