"""Exact local solvers, and BayesADMM on softmax regression against the centralized Laplace posterior."""

import pytest
import torch

from fedvb.core.driver import run_plain_loop
from fedvb.core.gaussian import DENSE, DIAGONAL, Gaussian, NaturalParams, NonPositivePrecisionError
from fedvb.core.problems import centralized_softmax_laplace, make_softmax_regression_clients
from fedvb.core.solvers import softmax_loss_grad_hessian, solve_linear_regression, solve_softmax_regression
from tests.exact_presets import bayes_admm, bayes_admm_newton, pvi

K, DIM, CLASSES = 5, 4, 3
P = DIM * CLASSES


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def clients():
    return make_softmax_regression_clients(K, DIM, CLASSES, seed=0)


def test_softmax_derivatives_match_autograd(clients):
    c = clients[2]
    theta = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss_fn(t):
        model = torch.nn.functional.linear(c.x, t.reshape(CLASSES, DIM))
        return torch.nn.functional.cross_entropy(model, c.y, reduction="sum")

    loss, grad, hess = softmax_loss_grad_hessian(theta, c.x, c.y, CLASSES)
    assert loss.item() == pytest.approx(loss_fn(theta).item(), rel=1e-12)
    torch.testing.assert_close(grad, torch.func.grad(loss_fn)(theta))
    torch.testing.assert_close(hess, torch.func.hessian(loss_fn)(theta))


def test_newton_solution_is_stationary_for_the_local_objective(clients):
    c = clients[1]
    g = torch.Generator().manual_seed(1)
    server = Gaussian(
        torch.randn(P, generator=g, dtype=torch.float64),
        2.0 + torch.rand(P, generator=g, dtype=torch.float64),
        DIAGONAL,
    )
    site = NaturalParams(
        torch.randn(P, generator=g, dtype=torch.float64),
        -0.3 * torch.rand(P, generator=g, dtype=torch.float64),
        DIAGONAL,
    )
    rho, tau = 0.7, 0.5
    q = solve_softmax_regression(c.x, c.y, CLASSES, server, site, rho=rho, temperature=tau)

    def objective(t):
        nll = torch.nn.functional.cross_entropy(c.x @ t.reshape(CLASSES, DIM).T, c.y, reduction="sum")
        d = t - server.mean
        return nll / tau + site.linear @ t - 0.5 * (site.quadratic * t) @ t + 0.5 * rho * (server.precision * d) @ d

    assert torch.func.grad(objective)(q.mean).abs().max().item() <= 1e-9
    # S_k = S_bar + (diag(H)/tau - V)/rho
    hess = torch.func.hessian(
        lambda t: torch.nn.functional.cross_entropy(c.x @ t.reshape(CLASSES, DIM).T, c.y, reduction="sum")
    )(q.mean)
    torch.testing.assert_close(q.precision, server.precision + (torch.diagonal(hess) / tau - site.quadratic) / rho)


def test_linear_regression_solver_is_the_bayesian_posterior():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    prior = Gaussian(torch.randn(4, generator=g, dtype=torch.float64), 3.0 * torch.eye(4, dtype=torch.float64), DENSE)
    q = solve_linear_regression(x, y, prior, NaturalParams.zeros(4, DENSE), rho=1.0, temperature=0.5)
    precision = prior.precision + x.T @ x / 0.5
    torch.testing.assert_close(q.precision, precision)
    torch.testing.assert_close(q.mean, torch.linalg.solve(precision, prior.precision @ prior.mean + x.T @ y / 0.5))


def test_a_local_objective_without_minimum_is_a_clear_error(clients):
    c = clients[0]
    server = Gaussian.isotropic_prior(P, 1.0, DENSE)
    site = NaturalParams(torch.zeros(P, dtype=torch.float64), 50.0 * torch.eye(P, dtype=torch.float64), DENSE)
    with pytest.raises(NonPositivePrecisionError, match="raise rho, lower damping"):
        solve_softmax_regression(c.x, c.y, CLASSES, server, site, rho=1.0)


def test_dense_newton_bayes_admm_converges_to_the_centralized_laplace_posterior(clients):
    prior = Gaussian.isotropic_prior(P, 1.0, DENSE)
    laplace = centralized_softmax_laplace(clients, prior)
    result = run_plain_loop(bayes_admm_newton(rho=1.0, damping=0.5), prior, clients, rounds=100)
    first, last = result.servers[0], result.final
    assert rel(first.mean, laplace.mean) > 0.1  # not there after one round
    assert rel(last.mean, laplace.mean) <= 1e-6
    assert rel(last.precision, laplace.precision) <= 1e-6


def test_diagonal_run_converges_to_the_centralized_map(clients):
    prior = Gaussian.isotropic_prior(P, 10.0, DIAGONAL)
    laplace = centralized_softmax_laplace(clients, prior)
    result = run_plain_loop(pvi(DIAGONAL), prior, clients, rounds=100)
    assert rel(result.final.mean, laplace.mean) <= 1e-8
    assert rel(result.servers[-2].mean, result.final.mean) <= 1e-10  # at a fixed point
    # ... whose precision is the diagonal of the centralized Laplace precision.
    assert rel(result.final.precision, torch.diagonal(laplace.precision)) <= 1e-8


def test_diagonal_bayes_admm_fixed_point_is_the_map_with_diagonal_curvature(clients):
    prior = Gaussian.isotropic_prior(P, 1.0, DIAGONAL)
    laplace = centralized_softmax_laplace(clients, prior)
    server = Gaussian(laplace.mean, torch.diagonal(laplace.precision).clone(), DIAGONAL)
    sites = []
    for c in clients:
        _, grad, hess = softmax_loss_grad_hessian(laplace.mean, c.x, c.y, CLASSES)
        curvature = torch.diagonal(hess).clone()
        sites.append(NaturalParams(curvature * laplace.mean - grad, curvature, DIAGONAL))
    preset = bayes_admm(DIAGONAL, rho=1.0, damping=0.5)
    result = run_plain_loop(preset, prior, clients, rounds=2, server_init=server, initial_sites=sites)
    assert preset.mixing(K) < 1
    assert rel(result.final.mean, laplace.mean) <= 1e-9
    assert rel(result.final.precision, server.precision) <= 1e-9
