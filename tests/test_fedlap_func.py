"""FedLap-Func: FedLap plus a function-space fit of the server model to the clients' soft labels."""

import pytest
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
    algorithm, server, replies = first_round(cfg)
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


def first_round(cfg: RunConfig):
    """Round 1's server state, the algorithm, and the clients' replies."""
    algorithm = make_algorithm(cfg)
    trainers = [make_trainer(cfg, k) for k in range(cfg.num_clients)]
    server = algorithm.init_server(initial_mean(cfg), cfg.num_clients)
    payload = algorithm.payload(server)
    replies = {
        k: algorithm.client_round(payload, {}, t, generator=client_generator(cfg, 1, k))[0]
        for k, t in enumerate(trainers)
    }
    return algorithm, server, replies


def test_the_fit_leaves_a_fixed_point_where_it_is():
    """Where the clients' soft labels are the anchor's own predictions (as at a fixed point, where every client's
    model is the server's), the fit's minimiser is the anchor. Adam, which steps each coordinate by about its
    learning rate whatever the gradient, moved it by 1.4e-3 here; the L-BFGS fit must stay put."""
    cfg = config(func_weight=1.0, rounds=1, func_steps=50)
    algorithm, server, replies = first_round(cfg)
    anchor = BayesADMM.server_round(algorithm, server, replies, cfg.num_clients).arrays["mean"]
    own = torch.softmax(algorithm.model.logits_at(anchor.float(), algorithm.inputs), -1).double()
    assert float(algorithm.fit(anchor, own).sub(anchor).abs().max()) < 1e-6
    # ... and the same fit does move when the soft labels are the clients' (the check above can fail)
    soft = torch.stack([r["soft_labels"] for r in replies.values()]).mean(0)
    assert float(algorithm.fit(anchor, soft).sub(anchor).abs().max()) > 1e-2


@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_the_server_stays_the_prior_times_the_sites(fraction):
    """After every round the server's natural mean is the prior's (mean 0) plus the sum of the clients' sites:
    the fit's shift is held in the sites, not dropped at the next FedLap step. Both the exact site sum (every
    client replies) and the running one (a cohort) are checked."""
    cfg = config(func_weight=1.0, rounds=3)
    algorithm = make_algorithm(cfg)
    trainers = [make_trainer(cfg, k) for k in range(cfg.num_clients)]
    checked = []

    def check(server_round, server):
        sites = [server.sites[k] for k in server.sites]
        total = torch.stack([site.linear for site in sites]).sum(0)
        natural_mean = server.arrays["precision"] * server.arrays["mean"]
        assert torch.allclose(natural_mean, total, rtol=1e-6, atol=1e-9)
        assert torch.allclose(server.arrays["_site_sum_linear"], total, rtol=1e-6, atol=1e-9)
        checked.append(server_round)

    run_algorithm(algorithm, trainers, cfg.rounds, initial_mean(cfg), fraction=fraction, seed=cfg.seed,
                  generator_for=lambda r, k: client_generator(cfg, r, k), on_round=check)  # fmt: skip
    assert checked == [1, 2, 3]
