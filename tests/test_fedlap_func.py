"""FedLap-Func: FedLap plus a function-space fit of the server model to the clients' soft labels."""

import torch

from fedvb.config import RunConfig
from fedvb.core.algorithms import BayesADMM, FedLapFunc
from fedvb.core.driver import run_algorithm
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer


def config(**changes) -> RunConfig:
    values = dict(strategy="fedlap-func", dataset="digits", num_clients=5, rounds=3, hidden="32", activation="relu",
                  lr=3e-3, local_epochs=1, func_inputs=100, func_steps=30, damping=0.5, prior_precision=1.0,
                  eval_samples=0, out="/tmp/unused")  # fmt: skip
    values.update(changes)
    return RunConfig.from_mapping(values)


def run_plain(cfg: RunConfig, algorithm=None):
    algorithm = algorithm or make_algorithm(cfg)
    trainers = [make_trainer(cfg, k) for k in range(cfg.num_clients)]
    return algorithm, run_algorithm(
        algorithm, trainers, cfg.rounds, initial_mean(cfg), generator_for=lambda r, k: client_generator(cfg, r, k)
    )


def test_zero_weight_is_fedlap_exactly():
    cfg = config(func_weight=0.0)
    func, server = run_plain(cfg)
    assert isinstance(func, FedLapFunc)
    fedlap = BayesADMM(func.preset, prior_precision=1.0, round_one_anchor=func.round_one_anchor)
    _, reference = run_plain(cfg, fedlap)
    assert torch.equal(server.arrays["mean"], reference.arrays["mean"])


def test_the_server_step_lowers_the_fedlap_func_objective():
    cfg = config(func_weight=1.0, rounds=1)
    algorithm = make_algorithm(cfg)
    trainers = [make_trainer(cfg, k) for k in range(cfg.num_clients)]
    server = algorithm.init_server(initial_mean(cfg), cfg.num_clients)
    payload = algorithm.payload(server)
    replies = {
        k: algorithm.client_round(payload, {}, t, generator=client_generator(cfg, 1, k))[0]
        for k, t in enumerate(trainers)
    }
    anchor = BayesADMM.server_round(algorithm, server, replies, cfg.num_clients).arrays["mean"]
    refined = algorithm.server_round(server, replies, cfg.num_clients).arrays["mean"]
    weights = torch.stack([r["num_examples"] for r in replies.values()]).double()
    soft = sum(w * r["soft_labels"] for w, r in zip(weights, replies.values(), strict=True)) / weights.sum()

    def objective(theta):
        return 0.5 * ((theta - anchor) ** 2).sum() + algorithm.function_space_loss(theta, soft)

    assert not torch.equal(refined, anchor)
    assert float(objective(refined)) < float(objective(anchor)) - 1.0  # a real decrease, not rounding
    # the clients' soft labels are probabilities on the held-out inputs
    assert soft.shape == (100, 10) and torch.allclose(soft.sum(1), torch.ones(100, dtype=soft.dtype))
