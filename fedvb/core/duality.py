"""The BayesADMM algebra: one site (dual) update, one server aggregation.

Notation and signs follow docs/algorithms.md §1 and §2.  Client ``k`` holds
a site ``v_k = (v_k, V_k)`` in natural-parameter space (the ADMM dual), the
server holds ``q_bar = N(m_bar, S_bar^-1)`` and the prior is ``p_0``.  One round:

1. client step (a local solver, see :mod:`fedvb.core.solvers`)::

       q_k = argmin_q E_q[l_k / tau] + E_q[v_k^T theta - 1/2 theta^T V_k theta] + rho KL(q || q_bar)

2. site update (:func:`site_update`)::

       v_k <- v_k + damping * rho * (lambda_k - lambda_bar)

3. server aggregation (:func:`aggregate`)::

       lambda_bar = (1 - alpha) mean_k lambda_k + alpha (lambda_0 + sum_k v_k),
       alpha = 1 / (1 + K rho) unless overridden.

FedLap, FedLap-Cov, IVON-ADMM, the Newton-like BayesADMM, PVI, Bregman ADMM and
federated ADMM/AMA are the :class:`Preset` rows built at the bottom of this
module; none of them has algebra of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedvb.core.gaussian import (
    DENSE,
    DIAGONAL,
    ISOTROPIC,
    Family,
    Gaussian,
    NaturalParams,
)
from fedvb.core.robust import MEAN, Combination

__all__ = [
    "PRESETS",
    "Preset",
    "aggregate",
    "bayes_admm",
    "bayes_admm_newton",
    "bregman_admm",
    "bregman_site_update",
    "default_alpha",
    "fedlap",
    "fedlap_cov",
    "federated_admm",
    "ivon_admm",
    "make_preset",
    "pvi",
    "site_update",
]

DualSpace = Literal["natural", "expectation"]


def site_update(
    site: NaturalParams, client: Gaussian, server: Gaussian, *, rho: float, damping: float
) -> NaturalParams:
    """BayesADMM dual step in natural parameters (docs/algorithms.md §2, step 2).

    ``v_k <- v_k + damping * rho * (lambda_k - lambda_bar)``; for Gaussians
    ``dv = damping rho (S_k m_k - S_bar m_bar)`` and ``dV = damping rho (S_k - S_bar)``.
    """
    return site + (damping * rho) * (client.natural() - server.natural())


def bregman_site_update(
    site: NaturalParams, client: Gaussian, server: Gaussian, *, rho: float, damping: float
) -> NaturalParams:
    """Bregman-ADMM dual step in expectation parameters (docs/algorithms.md §6).

    ``v_k <- v_k + damping * rho * (mu_k - mu_bar)`` with ``mu = (m, -1/2 E[stat])``.
    The ``-1/2`` comes from the pairing ``<v, E T(theta)> = v^T m - 1/2 <V, E[stat]>``
    in our "+v, -V" convention: a client that is more certain than the server
    (smaller second moment) gets a larger ``V``, which pulls its precision back
    towards the server's, as the natural-parameter step does.
    """
    return site + (damping * rho) * (client.expectation() - server.expectation())


def default_alpha(num_clients: int, rho: float) -> float:
    """``alpha = 1 / (1 + K rho)`` (docs/algorithms.md §2, step 3)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    return 1.0 / (1.0 + num_clients * rho)


def aggregate(
    prior: Gaussian,
    client_posteriors: Sequence[Gaussian],
    sites: Sequence[NaturalParams],
    *,
    alpha: float,
    precision_floor: float | None = None,
    combination: Combination = MEAN,
    site_sum: NaturalParams | None = None,
) -> Gaussian:
    """Server update ``lambda_bar = (1 - alpha) mean_{k in R} lambda_k + alpha (lambda_0 + sum_{k=1..K} v_k)``.

    ``client_posteriors`` are the posteriors ``q_k`` returned *this round* (the
    set ``R`` of clients that replied); ``sites`` are the current sites of *all*
    ``K`` clients.  Partial participation: absent clients keep their sites, so
    the site sum (the PVI part) always covers every client, while the
    model-average part averages only the fresh posteriors of ``R``; at a fixed
    point every ``q_k`` equals ``q_bar``, so the choice of ``R`` does not move the
    fixed point.  With ``alpha = 1`` (PVI, FedLap) no posterior is needed; with
    ``alpha < 1`` and nobody replying the update is undefined and this raises
    (callers keep the old server instead).

    ``precision_floor``: when given, every eigenvalue of the new precision is
    raised to at least this value (the documented guard against one coordinate's
    precision collapsing, docs/algorithms.md §9); when ``None`` a non-positive
    result raises :class:`~fedvb.core.gaussian.NonPositivePrecisionError`.

    ``combination`` replaces the site sum and the posterior average by their robust versions
    (:class:`~fedvb.core.robust.Combination`; the default is the plain sum and mean).

    ``site_sum``: ``sum_k v_k`` when the caller keeps it (a running total over a large federation); then
    ``sites`` is not read.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if site_sum is None and not sites:
        raise ValueError("aggregate needs the sites of all clients (got none)")
    natural = prior.natural() + (combination.natural_sum(sites) if site_sum is None else site_sum)
    if alpha < 1.0:
        if not client_posteriors:
            raise ValueError("aggregate: alpha < 1 needs at least one client posterior this round")
        average = combination.natural_mean(q.natural() for q in client_posteriors)  # each freed once added
        natural = (1.0 - alpha) * average + alpha * natural
    if precision_floor is not None:
        clamped = natural.family.clamp(natural.quadratic, precision_floor)
        natural = NaturalParams(natural.linear, clamped, natural.family)
    return Gaussian.from_natural(natural, what="server posterior")


@dataclass(frozen=True)
class Preset:
    """One named member of the BayesADMM family (the table of docs/algorithms.md §2).

    ``alpha=None`` means ``1 / (1 + K rho)``.  ``point_estimate=True`` tells the
    local solver to keep the server's precision (no curvature), which keeps the
    sites' quadratic part at zero: FedLap and federated ADMM.
    """

    name: str
    family: Family
    rho: float
    damping: float
    alpha: float | None = None
    dual_space: DualSpace = "natural"
    point_estimate: bool = False

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")
        if self.alpha is not None and not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.dual_space not in ("natural", "expectation"):
            raise ValueError(f"dual_space must be 'natural' or 'expectation', got {self.dual_space!r}")

    def mixing(self, num_clients: int) -> float:
        """The server weight ``alpha`` for ``num_clients`` clients."""
        return default_alpha(num_clients, self.rho) if self.alpha is None else self.alpha

    def update_site(self, site: NaturalParams, client: Gaussian, server: Gaussian) -> NaturalParams:
        step = site_update if self.dual_space == "natural" else bregman_site_update
        return step(site, client, server, rho=self.rho, damping=self.damping)


def bayes_admm(family: Family, rho: float, damping: float = 1.0, alpha: float | None = None) -> Preset:
    """General BayesADMM (docs/algorithms.md §2) over any family."""
    return Preset("bayes-admm", family, rho, damping, alpha)


def bayes_admm_newton(rho: float, damping: float = 1.0, alpha: float | None = None) -> Preset:
    """Full-covariance Newton-like BayesADMM (docs/algorithms.md §3); exact in one round on
    quadratics with ``rho = 1/K``, ``damping = 1`` and the server started at the prior."""
    return Preset("bayes-admm-newton", DENSE, rho, damping, alpha)


def ivon_admm(rho: float, damping: float, alpha: float | None = None) -> Preset:
    """Diagonal BayesADMM whose clients run IVON (docs/algorithms.md §4)."""
    return Preset("ivon-admm", DIAGONAL, rho, damping, alpha)


def pvi(family: Family, damping: float = 1.0) -> Preset:
    """Partitioned VI: ``alpha = 1``, ``rho = 1`` (docs/algorithms.md §6)."""
    return Preset("pvi", family, 1.0, damping, 1.0)


def fedlap(damping: float) -> Preset:
    """FedLap (docs/algorithms.md §5): isotropic fixed precision, MAP clients, site-sum server."""
    return Preset("fedlap", ISOTROPIC, 1.0, damping, 1.0, point_estimate=True)


def fedlap_cov(damping: float) -> Preset:
    """FedLap-Cov (docs/algorithms.md §5): diagonal Laplace clients, site-sum server."""
    return Preset("fedlap-cov", DIAGONAL, 1.0, damping, 1.0)


def federated_admm(rho: float, damping: float = 1.0, alpha: float | None = None) -> Preset:
    """Federated ADMM (docs/algorithms.md §6, §7): isotropic point estimates.

    With server and prior precision ``delta`` this is textbook ADMM with penalty
    ``rho_admm = rho * delta``, duals ``y_k = v_k`` and the server
    ``theta_bar = (rho_admm sum theta_k + sum y_k) / (delta + K rho_admm)``;
    ``alpha = 1`` gives Tseng's AMA, FedLap's server.
    """
    return Preset("federated-admm", ISOTROPIC, rho, damping, alpha, point_estimate=True)


def bregman_admm(family: Family, rho: float, damping: float = 1.0, alpha: float | None = None) -> Preset:
    """Bregman ADMM (Wang & Banerjee): the dual step in expectation parameters."""
    return Preset("bregman-admm", family, rho, damping, alpha, dual_space="expectation")


PRESETS = {
    "bayes-admm": bayes_admm,
    "bayes-admm-newton": bayes_admm_newton,
    "ivon-admm": ivon_admm,
    "pvi": pvi,
    "fedlap": fedlap,
    "fedlap-cov": fedlap_cov,
    "federated-admm": federated_admm,
    "bregman-admm": bregman_admm,
}


def make_preset(name: str, **kwargs) -> Preset:
    """Build a preset by name, with an error listing the allowed names."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown {name!r}; allowed: {', '.join(PRESETS)}") from None
    return factory(**kwargs)
