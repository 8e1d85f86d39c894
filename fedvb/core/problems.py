"""Synthetic heterogeneous federated problems with known centralized answers.

Used by the tests, the simulations and the benchmarks.  Every generator is
deterministic in its ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedvb.core.gaussian import DENSE, Gaussian, NaturalParams
from fedvb.core.solvers import solve_softmax_regression
from fedvb.core.trainers import LocalSettings, TorchTrainer

__all__ = [
    "centralized_linear_posterior",
    "centralized_softmax_laplace",
    "linear_regression_client",
    "make_linear_regression_clients",
    "make_softmax_regression_clients",
    "softmax_regression_client",
]


def linear_regression_client(x: torch.Tensor, y: torch.Tensor, *, device=None) -> TorchTrainer:
    """A client of linear regression without bias (``l = 1/2 ||y - X theta||^2``): a trainer over
    ``Linear(d, 1, bias=False)`` in the data's dtype, which every client solver can run (the exact one in
    closed form)."""
    model = nn.Sequential(nn.Linear(x.shape[1], 1, bias=False), nn.Flatten(0)).to(x.dtype)
    return TorchTrainer(model, x, y, "regression", LocalSettings(), device=device)


def softmax_regression_client(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, device=None) -> TorchTrainer:
    """A client of softmax regression without bias (weight ``(C, d)`` flattened row-major): a trainer over
    ``Linear(d, C, bias=False)`` in the inputs' dtype (the exact solver: damped Newton)."""
    model = nn.Linear(x.shape[1], num_classes, bias=False).to(x.dtype)
    return TorchTrainer(model, x, y, "classification", LocalSettings(), device=device)


def make_linear_regression_clients(
    num_clients: int = 4,
    dim: int = 6,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[TorchTrainer]:
    """Heterogeneous clients: different sizes, input shifts and scales, and true weights.

    Client ``k`` has ``12 + 9 k`` points with ``x ~ N(mu_k, diag(s_k^2))`` and
    ``y = x theta_k + eps``, ``theta_k = theta* + 0.7 z_k``, ``eps ~ N(0, 0.3^2)``.
    """
    rng = np.random.default_rng(seed)
    theta_star = rng.standard_normal(dim)
    clients = []
    for k in range(num_clients):
        n = 12 + 9 * k
        shift = 1.5 * rng.standard_normal(dim)
        scale = 0.3 + 2.0 * rng.random(dim)
        x = shift + scale * rng.standard_normal((n, dim))
        theta_k = theta_star + 0.7 * rng.standard_normal(dim)
        y = x @ theta_k + 0.3 * rng.standard_normal(n)
        clients.append(linear_regression_client(torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=dtype)))
    return clients


def make_softmax_regression_clients(
    num_clients: int = 5,
    dim: int = 4,
    num_classes: int = 3,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[TorchTrainer]:
    """Label-skewed clients: class proportions ``~ Dir(0.5)``, sizes ``20 + 10 k``.

    Inputs come from overlapping class-conditional Gaussians (so the classes are
    not separable and the MAP is well inside the prior), plus a client shift.
    """
    rng = np.random.default_rng(seed)
    class_means = 1.2 * rng.standard_normal((num_classes, dim))
    clients = []
    for k in range(num_clients):
        n = 20 + 10 * k
        y = rng.choice(num_classes, size=n, p=rng.dirichlet(np.full(num_classes, 0.5)))
        shift = 0.3 * rng.standard_normal(dim)
        x = class_means[y] + shift + rng.standard_normal((n, dim))
        clients.append(
            softmax_regression_client(
                torch.as_tensor(x, dtype=dtype), torch.as_tensor(y, dtype=torch.long), num_classes
            )
        )
    return clients


def centralized_linear_posterior(clients: list[TorchTrainer], prior: Gaussian, temperature: float = 1.0) -> Gaussian:
    """The exact posterior of the pooled data (dense).

    ``S = S0 + sum_k X_k^T X_k / tau`` and ``S m = S0 m0 + sum_k X_k^T y_k / tau``.
    """
    dim = prior.dim
    precision = prior.family.to_dense(prior.precision, dim).clone()
    linear = prior.family.matvec(prior.precision, prior.mean).clone()
    for client in clients:
        x, y = client.x.to(prior.dtype), client.y.to(prior.dtype)
        precision += x.T @ x / temperature
        linear += x.T @ y / temperature
    return Gaussian.from_natural(NaturalParams(linear, precision, DENSE))


def centralized_softmax_laplace(clients: list[TorchTrainer], prior: Gaussian, temperature: float = 1.0) -> Gaussian:
    """Laplace posterior of the pooled data: the MAP and ``S0 + grad^2 sum l(MAP) / tau`` (dense).

    This is the single-client problem with the prior as the server, no site and ``rho = 1``.
    """
    dense_prior = prior.in_family(DENSE)
    x = torch.cat([c.x for c in clients])
    y = torch.cat([c.y for c in clients])
    site = NaturalParams.zeros(prior.dim, DENSE, dtype=prior.dtype)
    classes = prior.dim // x.shape[1]
    return solve_softmax_regression(x, y, classes, dense_prior, site, rho=1.0, temperature=temperature)
