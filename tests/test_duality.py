"""The BayesADMM algebra: exactness on quadratics, fixed points, special cases."""

import pytest
import torch

from fedvb.core.driver import run_plain_loop, sample_participants
from fedvb.core.duality import Preset, aggregate, default_alpha, site_update
from fedvb.core.gaussian import DENSE, DIAGONAL, ISOTROPIC, Gaussian, NaturalParams, NonPositivePrecisionError
from fedvb.core.problems import centralized_linear_posterior, make_linear_regression_clients
from fedvb.core.registry import preset as make_preset
from tests.exact_presets import bayes_admm, bayes_admm_newton, bregman_admm, federated_admm, fedlap, pvi

K, DIM, DELTA = 4, 6, 2.0


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def clients():
    return make_linear_regression_clients(K, DIM, seed=0)


@pytest.fixture(scope="module")
def exact(clients):
    return centralized_linear_posterior(clients, Gaussian.isotropic_prior(DIM, DELTA, DENSE))


def test_centralized_posterior_is_the_textbook_formula(clients, exact):
    x = torch.cat([c.x for c in clients])
    y = torch.cat([c.y for c in clients])
    precision = DELTA * torch.eye(DIM, dtype=torch.float64) + x.T @ x
    torch.testing.assert_close(exact.precision, precision)
    torch.testing.assert_close(exact.mean, torch.linalg.solve(precision, x.T @ y))


def test_newton_bayes_admm_is_exact_after_one_round(clients, exact):
    prior = Gaussian.isotropic_prior(DIM, DELTA, DENSE)
    result = run_plain_loop(bayes_admm_newton(rho=1 / K, damping=1.0), prior, clients, rounds=3)
    assert default_alpha(K, 1 / K) == 0.5
    for server in result.servers:  # exact after round 1, and stays there
        assert rel(server.mean, exact.mean) <= 1e-10
        assert rel(server.precision, exact.precision) <= 1e-10


def test_pvi_is_exact_after_one_round(clients, exact):
    prior = Gaussian.isotropic_prior(DIM, DELTA, DENSE)
    server = run_plain_loop(pvi(DENSE), prior, clients, rounds=1).final
    assert rel(server.mean, exact.mean) <= 1e-10
    assert rel(server.precision, exact.precision) <= 1e-10


def test_rho_one_is_not_exact_in_one_round_but_converges(clients, exact):
    prior = Gaussian.isotropic_prior(DIM, DELTA, DENSE)
    result = run_plain_loop(bayes_admm_newton(rho=1.0), prior, clients, rounds=150)
    errors = [max(rel(s.mean, exact.mean), rel(s.precision, exact.precision)) for s in result.servers]
    assert errors[0] > 1e-4
    assert errors[0] > errors[9] > errors[49] > errors[149]
    assert errors[149] <= 1e-8


def test_server_started_away_from_the_prior_forgets_it_at_rate_one_minus_alpha(clients, exact):
    # docs/algorithms.md §3: with S_bar initialised at I instead of delta I, the prior
    # mismatch decays by (1 - alpha) = 1/2 per round.
    prior = Gaussian.isotropic_prior(DIM, DELTA, DENSE)
    start = Gaussian.isotropic_prior(DIM, 1.0, DENSE)
    result = run_plain_loop(bayes_admm_newton(rho=1 / K), prior, clients, rounds=30, server_init=start)
    gaps = [(s.precision - exact.precision).norm().item() for s in result.servers[:5]]
    for before, after in zip(gaps, gaps[1:]):
        assert after == pytest.approx(0.5 * before, rel=1e-6)
    assert rel(result.final.mean, exact.mean) <= 1e-7


@pytest.mark.parametrize("family", [DIAGONAL, ISOTROPIC], ids=lambda f: f.name)
@pytest.mark.parametrize(
    "make", [lambda f: pvi(f), lambda f: bayes_admm(f, rho=1.0, damping=0.5)], ids=["pvi", "bayes-admm"]
)
def test_structured_families_converge_to_the_mean_field_posterior(clients, exact, family, make):
    # For a quadratic the mean-field VB optimum has the exact mean and the
    # projected precision (diagonal of / trace over P of the exact one).
    prior = Gaussian.isotropic_prior(DIM, DELTA, family)
    server = run_plain_loop(make(family), prior, clients, rounds=400).final
    assert rel(server.mean, exact.mean) <= 1e-8
    expected = family.project(exact.precision)
    assert rel(server.precision, expected) <= 1e-8


def fixed_point(clients, exact, family, point_estimate):
    """The theoretical fixed point for linear regression: server = in-family centralized
    posterior, V_k = project(A_k) (0 for point estimates), v_k = V_k m - grad l_k(m)."""
    if point_estimate:
        server = Gaussian(exact.mean, family.eye(DIM, DELTA, dtype=torch.float64), family)
    else:
        server = Gaussian(exact.mean, family.project(exact.precision), family)
    sites = []
    for c in clients:
        quadratic = family.eye(DIM, 0.0, dtype=torch.float64) if point_estimate else family.project(c.x.T @ c.x)
        grad = c.x.T @ (c.x @ exact.mean - c.y)
        sites.append(NaturalParams(family.matvec(quadratic, exact.mean) - grad, quadratic, family))
    return server, sites


@pytest.mark.parametrize(
    "preset",
    [
        bayes_admm_newton(rho=1 / K),
        bayes_admm(DIAGONAL, rho=1.0, damping=0.7),
        bayes_admm(ISOTROPIC, rho=2.0),
        pvi(DIAGONAL, damping=0.5),
        bregman_admm(DENSE, rho=1.0, damping=0.5),
        bregman_admm(DIAGONAL, rho=1.0, damping=0.5),
        fedlap(damping=0.5),
        federated_admm(rho=0.5),
    ],
    ids=lambda p: f"{p.name}-{p.family.name}",
)
def test_the_centralized_answer_is_a_fixed_point_of_every_preset(clients, exact, preset):
    prior = Gaussian.isotropic_prior(DIM, DELTA, preset.family)
    server, sites = fixed_point(clients, exact, preset.family, preset.point_estimate)
    result = run_plain_loop(preset, prior, clients, rounds=2, server_init=server, initial_sites=sites)
    for after in result.servers:
        assert rel(after.mean, server.mean) <= 1e-10
        assert rel(after.precision, server.precision) <= 1e-10
    for before, now in zip(sites, result.sites):
        assert rel(now.linear, before.linear) <= 1e-10


def test_bregman_admm_converges_towards_the_exact_posterior(clients, exact):
    prior = Gaussian.isotropic_prior(DIM, DELTA, DENSE)
    result = run_plain_loop(bregman_admm(DENSE, rho=1.0, damping=0.1), prior, clients, rounds=400)
    errors = [rel(s.mean, exact.mean) for s in result.servers]
    assert errors[0] > 1e-2
    assert errors[399] <= 2e-4 and errors[399] < errors[99] < errors[9] < errors[0]
    assert rel(result.final.precision, exact.precision) <= 2e-5


def test_federated_admm_preset_is_textbook_admm(clients):
    """Isotropic point estimates reproduce the federated ADMM of docs/algorithms.md §6 iterate for iterate."""
    rho, damping, rounds = 0.3, 0.8, 8
    prior = Gaussian.isotropic_prior(DIM, DELTA, ISOTROPIC)
    ours = run_plain_loop(federated_admm(rho=rho, damping=damping), prior, clients, rounds=rounds)

    rho_admm = rho * DELTA
    theta_bar = torch.zeros(DIM, dtype=torch.float64)
    duals = [torch.zeros(DIM, dtype=torch.float64) for _ in clients]
    eye = torch.eye(DIM, dtype=torch.float64)
    for r in range(rounds):
        thetas = []
        for k, c in enumerate(clients):
            theta = torch.linalg.solve(c.x.T @ c.x + rho_admm * eye, c.x.T @ c.y - duals[k] + rho_admm * theta_bar)
            duals[k] = duals[k] + damping * rho_admm * (theta - theta_bar)
            thetas.append(theta)
        theta_bar = (rho_admm * sum(thetas) + sum(duals)) / (DELTA + K * rho_admm)
        assert rel(ours.servers[r].mean, theta_bar) <= 1e-12
        assert ours.servers[r].precision.item() == pytest.approx(DELTA)  # precision stays fixed


def test_fedlap_preset_is_the_reference_fedlap(clients):
    """FedLap as written in the reference code (docs/algorithms.md §5), with its own dual scaling."""
    damping, rounds = 0.5, 6
    prior = Gaussian.isotropic_prior(DIM, DELTA, ISOTROPIC)
    ours = run_plain_loop(fedlap(damping=damping), prior, clients, rounds=rounds)

    w_bar = torch.zeros(DIM, dtype=torch.float64)
    v = [torch.zeros(DIM, dtype=torch.float64) for _ in clients]
    eye = torch.eye(DIM, dtype=torch.float64)
    for r in range(rounds):
        for k, c in enumerate(clients):
            # min 1/2||y - Xw||^2 + delta v^T w + delta/2 ||w - w_bar||^2
            w = torch.linalg.solve(c.x.T @ c.x + DELTA * eye, c.x.T @ c.y - DELTA * v[k] + DELTA * w_bar)
            v[k] = v[k] + damping * (w - w_bar)
        w_bar = sum(v)
        assert rel(ours.servers[r].mean, w_bar) <= 1e-12


def test_federated_admm_converges_to_the_map(clients, exact):
    prior = Gaussian.isotropic_prior(DIM, DELTA, ISOTROPIC)
    result = run_plain_loop(federated_admm(rho=1.0), prior, clients, rounds=400)
    errors = [rel(s.mean, exact.mean) for s in result.servers]
    assert errors[399] <= 1e-2 and errors[399] < errors[199] < errors[99] < errors[0]


def test_partial_participation_keeps_absent_sites_and_converges(clients, exact):
    prior = Gaussian.isotropic_prior(DIM, DELTA, DENSE)
    preset = bayes_admm_newton(rho=1.0)
    result = run_plain_loop(preset, prior, clients, rounds=300, fraction=0.5, seed=3)
    assert all(len(p) == 2 for p in result.participants)
    assert len({tuple(p) for p in result.participants}) > 1
    assert rel(result.final.mean, exact.mean) <= 1e-8
    assert rel(result.final.precision, exact.precision) <= 1e-8
    # The same seed gives the same numbers.
    again = run_plain_loop(preset, prior, clients, rounds=300, fraction=0.5, seed=3)
    assert torch.equal(again.final.mean, result.final.mean)


def test_aggregate_sums_every_site_but_averages_only_the_replies():
    prior = Gaussian.isotropic_prior(3, 1.0, DIAGONAL)
    q1 = Gaussian(
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64), torch.full((3,), 4.0, dtype=torch.float64), DIAGONAL
    )
    sites = [
        NaturalParams(torch.ones(3, dtype=torch.float64) * k, torch.ones(3, dtype=torch.float64) * k, DIAGONAL)
        for k in (1, 2, 3)
    ]
    server = aggregate(prior, [q1], sites, alpha=0.25)
    expected_precision = 0.75 * 4.0 + 0.25 * (1.0 + 6.0)
    expected_linear = 0.75 * 4.0 * q1.mean + 0.25 * 6.0
    torch.testing.assert_close(server.precision, torch.full((3,), expected_precision, dtype=torch.float64))
    torch.testing.assert_close(server.natural().linear, expected_linear)
    # alpha = 1 needs no replies; alpha < 1 with none is refused.
    assert aggregate(prior, [], sites, alpha=1.0).precision[0].item() == pytest.approx(7.0)
    with pytest.raises(ValueError, match="at least one client posterior"):
        aggregate(prior, [], sites, alpha=0.5)


def test_site_update_is_damped_natural_difference():
    server = Gaussian(
        torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64), DIAGONAL
    )
    client = Gaussian(
        torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([5.0, 4.0], dtype=torch.float64), DIAGONAL
    )
    site = NaturalParams.zeros(2, DIAGONAL)
    new = site_update(site, client, server, rho=0.5, damping=0.2)
    torch.testing.assert_close(new.linear, 0.1 * torch.tensor([0.0 - 2.0, 4.0 - 6.0], dtype=torch.float64))
    torch.testing.assert_close(new.quadratic, 0.1 * torch.tensor([3.0, 1.0], dtype=torch.float64))


def test_precision_floor_keeps_the_server_valid():
    prior = Gaussian.isotropic_prior(2, 1.0, DIAGONAL)
    bad_site = NaturalParams(
        torch.zeros(2, dtype=torch.float64), torch.tensor([-3.0, 0.0], dtype=torch.float64), DIAGONAL
    )
    with pytest.raises(NonPositivePrecisionError, match="server posterior: diagonal precision has 1 of 2"):
        aggregate(prior, [], [bad_site], alpha=1.0)
    floored = aggregate(prior, [], [bad_site], alpha=1.0, precision_floor=1e-3)
    torch.testing.assert_close(floored.precision, torch.tensor([1e-3, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=0.0), "rho must be > 0"),
        (dict(rho=1.0, damping=0.0), r"damping must be in \(0, 1\]"),
        (dict(rho=1.0, damping=1.5), r"damping must be in \(0, 1\]"),
        (dict(rho=1.0, alpha=0.0), r"alpha must be in \(0, 1\]"),
    ],
)
def test_preset_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preset("x", DENSE, **{"damping": 1.0, **kwargs})


def test_make_preset_names_allowed_values():
    assert make_preset("pvi", family=DENSE, solver="exact").mixing(K) == 1.0
    with pytest.raises(ValueError, match="allowed: fedlap, fedlap-cov, fedlap-kfac, fedlap-func, ivon-admm"):
        make_preset("admm++")


def test_sample_participants_depends_only_on_seed_and_round():
    a = sample_participants(10, 0.3, seed=1, server_round=5)
    assert a == sample_participants(10, 0.3, seed=1, server_round=5)
    assert len(a) == 3 and a == sorted(a)
    draws = {tuple(sample_participants(10, 0.3, seed=1, server_round=r)) for r in range(1, 20)}
    assert len(draws) > 5
    assert sample_participants(10, 1.0, seed=0, server_round=1) == list(range(10))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        sample_participants(10, 0.0, seed=0, server_round=1)


def test_float32_runs_and_stays_float32(clients, exact):
    clients32 = make_linear_regression_clients(K, DIM, seed=0, dtype=torch.float32)
    prior = Gaussian.isotropic_prior(DIM, DELTA, DENSE, dtype=torch.float32)
    server = run_plain_loop(bayes_admm_newton(rho=1 / K), prior, clients32, rounds=1).final
    assert server.mean.dtype == torch.float32
    assert rel(server.mean.double(), exact.mean) <= 1e-4
