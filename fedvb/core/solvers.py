"""Exact local solvers for the client step of BayesADMM.

Client ``k`` solves (docs/algorithms.md §3, under the Laplace / delta approximation)::

    m_k = argmin_theta  l_k(theta) / tau + v^T theta - 1/2 theta^T V theta
                        + rho/2 (theta - m_bar)^T S_bar (theta - m_bar)
    S_k = S_bar + (project(grad^2 l_k(m_k)) / tau - V) / rho            (docs/algorithms.md §3)

``project`` maps the Hessian into the posterior's family (dense: itself;
diagonal: its diagonal; isotropic: ``tr / P``).  For a quadratic loss this is
the exact VB optimum within the family; otherwise it is the Laplace
approximation.  With ``point_estimate=True`` the client keeps the server's
precision (``S_k = S_bar``), as FedLap and federated ADMM do.

Two losses have exact solvers here:

* linear regression, ``l(theta) = 1/2 ||y - X theta||^2`` (unit noise variance):
  one linear solve;
* softmax regression without bias, weight ``W`` of shape ``(C, d)`` flattened
  row-major (as ``torch.nn.Linear(d, C, bias=False).weight``):
  ``l(theta) = sum_i CE(y_i, softmax(W x_i))``, solved by damped Newton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedvb.core.gaussian import Gaussian, NaturalParams, NonPositivePrecisionError

__all__ = [
    "client_posterior",
    "local_penalty",
    "posterior_from_curvature",
    "softmax_loss",
    "softmax_loss_grad_hessian",
    "solve_linear_regression",
    "solve_softmax_regression",
]


def local_penalty(server: Gaussian, site: NaturalParams, rho: float) -> NaturalParams:
    """The cavity ``rho lambda_bar - v``: natural parameters ``(b, A)`` of the client's penalty.

    ``rho/2 (t - m_bar)^T S_bar (t - m_bar) + v^T t - 1/2 t^T V t = 1/2 t^T A t - b^T t + c`` with
    ``A = rho S_bar - V`` and ``b = rho S_bar m_bar - v`` (in the family's layout; ``A`` need not be positive).
    """
    return rho * server.natural() - site


def client_posterior(
    server: Gaussian,
    site: NaturalParams,
    mean: Tensor,
    loss_hessian: Tensor,
    *,
    rho: float,
    temperature: float,
    point_estimate: bool,
) -> Gaussian:
    """``N(mean, S_k^-1)`` with ``S_k = S_bar + (project(H) / tau - V) / rho`` (or ``S_bar``), for a dense
    Hessian ``H`` of the summed loss."""
    if point_estimate:
        return Gaussian(mean, server.precision, server.family)
    return posterior_from_curvature(
        server, site, mean, server.family.project(loss_hessian), rho=rho, temperature=temperature
    )


def posterior_from_curvature(
    server: Gaussian, site: NaturalParams, mean: Tensor, curvature: Tensor, *, rho: float, temperature: float
) -> Gaussian:
    """``N(mean, S_k^-1)`` with ``S_k = S_bar + (C / tau - V) / rho`` for a curvature ``C`` already in the
    family's layout (docs/algorithms.md §3): the one client-precision formula every solver uses."""
    family = server.family
    if family.closed_under_addition:
        precision = server.precision + (curvature / temperature - site.quadratic) / rho
    else:  # one projection of the whole combination: S_k - S_bar then keeps what the two have in common
        terms = [(1.0, server.precision), (1.0 / (temperature * rho), curvature), (-1.0 / rho, site.quadratic)]
        # The projected server precision minus one client's site need not be positive definite where the exact
        # one is, so neither need the combination: its eigenvalues are raised to the server's smallest where
        # they fall below.
        precision = family.clamp(family.combine(terms), family.smallest_eigenvalue(server.precision))
    problem = server.family.positivity_problem(precision)
    if problem is not None:
        raise NonPositivePrecisionError(f"client posterior: {problem}")
    return Gaussian(mean, precision, server.family)


def _positive_definite_solve(matrix: Tensor, rhs: Tensor, what: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise NonPositivePrecisionError(
            f"{what}: the local objective is not convex at the current iterate (Hessian not positive definite): "
            "rho S_bar - V is too weak for this loss; raise rho, lower damping or raise the prior precision"
        )
    return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)


def solve_linear_regression(
    x: Tensor,
    y: Tensor,
    server: Gaussian,
    site: NaturalParams,
    *,
    rho: float,
    temperature: float = 1.0,
    point_estimate: bool = False,
) -> Gaussian:
    """Closed-form client step for ``l(theta) = 1/2 ||y - X theta||^2``.

    ``m_k = (X^T X / tau + A)^-1 (X^T y / tau + b)`` with ``(A, b)`` from
    :func:`local_penalty`; exact for every family.
    """
    x = x.to(server.dtype)
    y = y.to(server.dtype)
    gram = x.T @ x
    cavity = local_penalty(server, site, rho)
    quadratic = server.family.to_dense(cavity.quadratic, server.dim)
    mean = _positive_definite_solve(
        gram / temperature + quadratic, x.T @ y / temperature + cavity.linear, "linear regression"
    )
    return client_posterior(server, site, mean, gram, rho=rho, temperature=temperature, point_estimate=point_estimate)


def softmax_loss(theta: Tensor, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Sum cross-entropy of softmax regression at ``theta`` (``W.flatten()`` for ``W`` of shape ``(C, d)``)."""
    log_probs = torch.log_softmax(x @ theta.reshape(num_classes, -1).T, dim=1)
    return -log_probs[torch.arange(len(y)), y].sum()


def softmax_loss_grad_hessian(theta: Tensor, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sum cross-entropy of softmax regression, its gradient ``(C d,)`` and Hessian ``(C d, C d)``.

    ``theta`` is ``W.flatten()`` for ``W`` of shape ``(C, d)``; the Hessian is
    ``sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T``, formed by two matrix products (``A^T A`` with
    ``A[i, (c, j)] = p_ic x_ij`` for the outer-product part, ``x^T diag(p_c) x`` per class for the
    block diagonal): the same sums as the einsums they replaced (to 4e-16), 1.3-4x faster on one
    thread for 287-2,000 rows of 49-196 inputs.
    """
    n, d = x.shape
    size = num_classes * d
    weight = theta.reshape(num_classes, d)
    log_probs = torch.log_softmax(x @ weight.T, dim=1)
    loss = -log_probs[torch.arange(n), y].sum()
    probs = log_probs.exp()
    residual = probs.clone()
    residual[torch.arange(n), y] -= 1.0
    grad = (residual.T @ x).reshape(-1)
    weighted = (probs[:, :, None] * x[:, None, :]).reshape(n, size)
    hessian = -(weighted.T @ weighted)
    block_diagonal = (probs.T[:, :, None] * x[None]).transpose(1, 2) @ x  # (C, d, d)
    idx = torch.arange(num_classes)
    hessian.view(num_classes, d, num_classes, d)[idx, :, idx, :] += block_diagonal
    return loss, grad, hessian


def solve_softmax_regression(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    server: Gaussian,
    site: NaturalParams,
    *,
    rho: float,
    temperature: float = 1.0,
    point_estimate: bool = False,
    tol: float | None = None,
    max_iter: int = 100,
) -> Gaussian:
    """Newton client step for softmax regression (no bias), warm-started at ``m_bar``.

    Minimises ``f(t) = l(t)/tau + 1/2 t^T A t - b^T t`` by Newton's method with
    Armijo backtracking until the Newton decrement ``g^T H^-1 g / 2`` falls
    below ``tol * (1 + |f|)`` (default: 100 machine epsilons).
    """
    x = x.to(server.dtype)
    cavity = local_penalty(server, site, rho)
    quadratic, linear = server.family.to_dense(cavity.quadratic, server.dim), cavity.linear
    # Newton from m_bar finds the local minimiser near the server.  The
    # objective need not be convex everywhere (a site's V may exceed rho S_bar
    # in some direction, as at BayesADMM's fixed points with rho < 1), only where
    # Newton walks; if it stops being so, there is no valid client posterior.
    tol = 100 * torch.finfo(server.dtype).eps if tol is None else tol

    def penalised(theta: Tensor, loss: Tensor) -> Tensor:
        return loss / temperature + 0.5 * theta @ quadratic @ theta - linear @ theta

    def objective(theta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loss, grad, hess = softmax_loss_grad_hessian(theta, x, y, num_classes)
        gradient = grad / temperature + quadratic @ theta - linear
        return penalised(theta, loss), gradient, hess / temperature + quadratic, hess

    theta = server.mean.clone()
    value, grad, hess, loss_hessian = objective(theta)
    for _ in range(max_iter):
        step = -_positive_definite_solve(hess, grad, "softmax regression")
        decrement = -(grad @ step)
        if decrement / 2 <= tol * (1 + value.abs()):
            # Inside the region of quadratic convergence: the last full step
            # costs nothing and takes the error from ~sqrt(tol) to ~tol.
            theta = theta + step
            value, grad, hess, loss_hessian = objective(theta)
            break
        size = 1.0
        for _ in range(60):
            candidate = theta + size * step
            # the value alone: the line search needs no Hessian
            cand_value = penalised(candidate, softmax_loss(candidate, x, y, num_classes))
            if cand_value <= value - 0.25 * size * decrement:
                break
            size *= 0.5
        theta = candidate
        value, grad, hess, loss_hessian = objective(theta)
    else:
        raise RuntimeError(f"softmax regression: Newton did not converge in {max_iter} iterations")
    return client_posterior(
        server, site, theta, loss_hessian, rho=rho, temperature=temperature, point_estimate=point_estimate
    )
