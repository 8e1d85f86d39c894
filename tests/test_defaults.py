"""Each strategy's default hyperparameters (fedvb.core.registry.DEFAULTS): how a configuration takes them, and
that with them every strategy learns on every built-in dataset (issue 15, item 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedvb.config import PER_STRATEGY, STRATEGIES, ConfigError, RunConfig, describe_defaults
from fedvb.core.registry import COMMON_DEFAULTS, DATASET_DEFAULTS, DEFAULTS, ONE_OVER_K
from fedvb.data import DATASETS
from tests.marks import needs_data


def test_every_strategy_has_a_row_of_known_keys():
    assert set(DEFAULTS) == set(STRATEGIES)
    assert set(COMMON_DEFAULTS) == set(PER_STRATEGY)
    for strategy, row in DEFAULTS.items():
        assert set(row) <= set(PER_STRATEGY), strategy


def test_a_key_left_to_the_strategy_takes_its_default_and_a_given_one_stays():
    ivon = RunConfig.from_mapping({"strategy": "ivon-admm"})
    assert (ivon.lr, ivon.temperature, ivon.rho, ivon.batch_size) == (2e-4, 1e-3, 0.2, 32)
    assert RunConfig.from_mapping({"strategy": "ivon-admm", "lr": 0.01}).lr == 0.01
    assert RunConfig.from_mapping({"strategy": "fedavg"}).lr == COMMON_DEFAULTS["lr"]
    assert RunConfig.from_mapping({"strategy": "fedlap", "num_clients": 8}).damping == 1 / 8  # 1/K
    assert DEFAULTS["fedlap"]["damping"] == ONE_OVER_K


def test_another_strategy_or_client_count_takes_its_own_defaults_where_they_were_used():
    given = RunConfig.from_mapping({"strategy": "ivon-admm", "batch_size": 16})
    fedavg = given.replace(strategy="fedavg")
    assert (fedavg.lr, fedavg.batch_size) == (COMMON_DEFAULTS["lr"], 16)  # the given key stays
    assert RunConfig.from_mapping({"strategy": "pvi", "num_clients": 4}).replace(num_clients=5).damping == 0.2
    assert given.explicit()["lr"] == PER_STRATEGY["lr"] and given.explicit()["batch_size"] == 16


def test_a_datasets_own_row_comes_before_the_strategys_and_a_given_key_still_wins():
    assert DATASET_DEFAULTS["synthetic-linear"]["scaffold"] == {"lr": 0.05}
    scaffold = RunConfig.from_mapping({"strategy": "scaffold", "dataset": "synthetic-linear"})
    assert scaffold.lr == 0.05 and scaffold.local_epochs == DEFAULTS["scaffold"]["local_epochs"]
    assert RunConfig.from_mapping({"strategy": "scaffold", "dataset": "synthetic-linear", "lr": 0.2}).lr == 0.2
    assert scaffold.replace(dataset="digits").lr == 0.5  # another dataset re-resolves what the row gave
    fedavg = RunConfig.from_mapping({"strategy": "fedavg", "dataset": "fedprox-synthetic"})
    assert (fedavg.lr, fedavg.local_epochs, fedavg.batch_size) == (0.01, 20, 10)
    assert RunConfig.from_mapping({"strategy": "ivon-admm", "dataset": "fedprox-synthetic"}).lr == 2e-4
    for dataset, rows in DATASET_DEFAULTS.items():
        assert dataset in DATASETS and set(rows) <= set(STRATEGIES), dataset
        assert all(set(row) <= set(PER_STRATEGY) for row in rows.values()), dataset


def test_a_saved_configuration_holds_the_resolved_values():
    config = RunConfig.from_mapping({"strategy": "scaffold"})
    again = RunConfig.from_mapping(json.loads(json.dumps(config.as_dict())))
    assert again == config and again.lr == DEFAULTS["scaffold"]["lr"]


def test_help_prints_every_strategys_defaults():
    table = describe_defaults()
    for strategy in STRATEGIES:
        assert f"  {strategy} " in table
    assert "damping 1/K" in table


# -- every strategy learns on every built-in dataset with its defaults -------------------------------------------
# Only the size is set: five clients, three rounds (eight on the FedProx synthetic set, which is built so that
# FedAvg climbs slowly: at its paper's setting 0.598, 0.630, 0.614, 0.630, 0.685, 0.780, 0.827, 0.843), a slice of
# the large image sets. "Learns", on a classification
# set: the server model's final test accuracy is at least LEARNED of the way from the majority class's share to 1.
# On the one regression set (a fixture of the exactness tests: 8 to 31 rows a client): the test MSE falls from
# round 1 to round 3 and stays finite.
LEARNED = 0.15
SIZE: dict[str, dict] = {
    "fashion-mnist": {"data_fraction": 0.02},
    "mnist": {"data_fraction": 0.02},
    "cifar10": {"data_fraction": 0.03},
    "uci-heart": {"num_clients": 4},  # its four hospitals
    "fedprox-synthetic": {"rounds": 8},
}
# Where a strategy cannot run with a dataset: the one line that refuses it (before anything is written).
REFUSED = {
    ("fedlap-func", "synthetic-linear"): "fedlap-func needs a classification dataset",
    **{("bayes-admm-newton", d): "the dense family keeps and solves with a P x P precision per client"
       for d in ("fashion-mnist", "mnist", "cifar10")},
}  # fmt: skip
# Measured gaps: these do not learn at this size with their defaults (strict: a fix shows up as a failure here).
GAPS: dict[tuple[str, str], str] = {}  # none left (fedlap-func on cifar10 closed by its func_lr 1e-3)
# Runs, not gaps, that this suite leaves out for their cost: FedLap-KFAC's site step on CIFAR-10's MLP projects
# 3,073 x 3,073 input factors, minutes a client-round on one CPU thread.
TOO_SLOW = {("fedlap-kfac", "cifar10")}


def _cases() -> list:
    cases = []
    for dataset in DATASETS:
        for strategy in STRATEGIES:
            marks = [needs_data(dataset)]
            if (strategy, dataset) in GAPS:
                marks.append(pytest.mark.xfail(strict=True, reason=GAPS[strategy, dataset]))
            if (strategy, dataset) in TOO_SLOW:
                marks.append(pytest.mark.skip(reason="minutes a round on one CPU thread (see TOO_SLOW)"))
            cases.append(pytest.param(strategy, dataset, marks=marks, id=f"{strategy}-{dataset}"))
    return cases


def _rows(config: RunConfig) -> list[dict]:
    """The server model's test metrics after each round, by the plain loop (the Flower backends give its numbers:
    tests/test_flower.py), which skips the run folder's writing."""
    from fedvb.core.driver import run_algorithm
    from fedvb.experiment import client_generator, evaluate, initial_mean, make_algorithm, make_trainer, round_lr

    algorithm = make_algorithm(config)
    trainers = [make_trainer(config, k) for k in range(config.num_clients)]
    rows: list[dict] = []
    run_algorithm(
        algorithm, trainers, config.rounds, initial_mean(config), seed=config.seed,
        generator_for=lambda r, k: client_generator(config, r, k), lr_for=lambda r: round_lr(config, r),
        on_round=lambda r, server: rows.append(evaluate(config, algorithm.server_mean(server), None)),
    )  # fmt: skip
    return rows


@pytest.mark.parametrize(("strategy", "dataset"), _cases())
def test_every_strategy_learns_with_its_defaults(strategy, dataset):
    from fedvb.experiment import check_runnable, prepare

    values = {"strategy": strategy, "dataset": dataset, "num_clients": 5, "rounds": 3, "eval_samples": 0,
              **SIZE.get(dataset, {})}  # fmt: skip
    config = RunConfig.from_mapping(values)
    if (strategy, dataset) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[strategy, dataset]):
            check_runnable(config)
        return
    check_runnable(config)
    rows = _rows(config)
    labels = prepare(config).dataset.y_test
    if prepare(config).dataset.task == "regression":
        assert np.isfinite(rows[-1]["mse"]) and rows[-1]["mse"] < rows[0]["mse"], [r["mse"] for r in rows]
        return
    majority = np.bincount(labels).max() / len(labels)
    accuracy = rows[-1]["accuracy"]
    assert accuracy >= majority + LEARNED * (1 - majority), (accuracy, majority)
