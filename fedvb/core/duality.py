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
federated ADMM/AMA are :class:`Preset` values (a family, a client solver, a site step and an alpha
rule, all objects) built from the rows of :mod:`fedvb.core.registry`; none of them has algebra of its
own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from fedvb.core.client_solvers import EXACT, ClientSolver
from fedvb.core.gaussian import Family, Gaussian, NaturalParams
from fedvb.core.robust import MEAN, Combination

__all__ = [
    "AlphaRule",
    "FixedAlpha",
    "Preset",
    "SiteStep",
    "aggregate",
    "bregman_site_update",
    "default_alpha",
    "site_update",
]


def site_update(
    site: NaturalParams, client: Gaussian, server: Gaussian, *, rho: float, damping: float
) -> NaturalParams:
    """BayesADMM dual step in natural parameters (docs/algorithms.md §2, step 2).

    ``v_k <- v_k + damping * rho * (lambda_k - lambda_bar)``; for Gaussians
    ``dv = damping rho (S_k m_k - S_bar m_bar)`` and ``dV = damping rho (S_k - S_bar)``.
    """
    step = damping * rho
    if site.family.closed_under_addition:
        return site + step * (client.natural() - server.natural())
    # one projection of the whole step (Family.combine): projecting lambda_k - lambda_bar first would keep only
    # what a single Kronecker product holds of a difference of two
    client_natural, server_natural = client.natural(), server.natural()
    linear = site.linear + step * (client_natural.linear - server_natural.linear)
    terms = [(1.0, site.quadratic), (step, client_natural.quadratic), (-step, server_natural.quadratic)]
    return NaturalParams(linear, site.family.combine(terms), site.family)


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


class SiteStep(Protocol):
    """A dual (site) step: :func:`site_update` or :func:`bregman_site_update`."""

    def __call__(
        self, site: NaturalParams, client: Gaussian, server: Gaussian, *, rho: float, damping: float
    ) -> NaturalParams: ...


class AlphaRule(Protocol):
    """The server's mixing weight ``alpha`` for ``num_clients`` clients and KL weight ``rho``."""

    def __call__(self, num_clients: int, rho: float) -> float: ...


@dataclass(frozen=True)
class FixedAlpha:
    """``alpha`` fixed at ``value`` (1: PVI, FedLap; the site-sum server)."""

    value: float

    def __post_init__(self) -> None:
        if not 0.0 < self.value <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.value}")

    def __call__(self, num_clients: int, rho: float) -> float:
        return self.value


@dataclass(frozen=True)
class Preset:
    """One member of the BayesADMM family, as objects (the table of docs/algorithms.md §2).

    ``family``: the Gaussian family; ``solver``: the client step (:mod:`fedvb.core.client_solvers`);
    ``site_step``: the dual step (:func:`site_update`, or :func:`bregman_site_update` for Bregman ADMM);
    ``alpha``: the server's mixing rule (:func:`default_alpha`, ``1 / (1 + K rho)``, or a
    :class:`FixedAlpha`; a number is taken as a fixed alpha); ``point_estimate``: the client keeps the
    server's precision (no curvature), which keeps the sites' quadratic part at zero (FedLap, federated
    ADMM). The named presets are built by :func:`fedvb.core.registry.preset`.
    """

    name: str
    family: Family
    rho: float
    damping: float = 1.0
    alpha: AlphaRule | float = default_alpha
    site_step: SiteStep = site_update
    solver: ClientSolver = EXACT
    point_estimate: bool = False

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {self.damping}")
        if isinstance(self.alpha, int | float):
            object.__setattr__(self, "alpha", FixedAlpha(float(self.alpha)))
        problem = self.solver.supports(self.family)
        if problem is not None:
            raise ValueError(f"solver: {self.solver.name} cannot serve the {self.family.name} family ({problem})")

    def mixing(self, num_clients: int) -> float:
        """The server weight ``alpha`` for ``num_clients`` clients."""
        return self.alpha(num_clients, self.rho)

    def update_site(self, site: NaturalParams, client: Gaussian, server: Gaussian) -> NaturalParams:
        return self.site_step(site, client, server, rho=self.rho, damping=self.damping)

    def bound_to(self, model: nn.Module) -> Preset:
        """This preset with its family bound to ``model``'s layers (:meth:`~fedvb.core.gaussian.Family.bind`;
        itself when the family's layout does not depend on the model)."""
        family = self.family.bind(model)
        return self if family is self.family else dataclasses.replace(self, family=family)
