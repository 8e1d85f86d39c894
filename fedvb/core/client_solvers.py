"""The client step of the BayesADMM family as one protocol with three solvers: exact, Laplace, IVON.

Client ``k`` receives the server's Gaussian ``q_bar = N(m_bar, S_bar^-1)`` and holds its site ``(v, V)``; a
solver returns its new posterior ``q_k`` (docs/algorithms.md §2-§4):

- :data:`EXACT`: closed form (linear regression) or Newton (softmax regression) on the cavity objective;
  exact for every family, the dense Newton variant's solver (docs/algorithms.md §3);
- :data:`LAPLACE`: MAP by the trainer's optimizer on ``loss / tau`` plus the cavity ``rho lambda_bar - v``
  (:func:`~fedvb.core.solvers.local_penalty`), then the precision from the family's own curvature at the
  mode (:meth:`~fedvb.core.gaussian.Family.laplace_curvature`: the diagonal GGN put in the family's layout,
  or a family's own structure, e.g. Kronecker factors) turned into a client
  precision by the one formula (:func:`~fedvb.core.solvers.posterior_from_curvature`); a point-estimate
  preset (FedLap, federated ADMM) keeps the server's precision and skips the curvature;
- :data:`IVON`: IVON with the server as its prior and start and the site as duals (docs/algorithms.md §4);
  its momentum and step counter are the solver's state across rounds.

Every solver has the same signature, so :class:`~fedvb.core.algorithms.BayesADMM` calls the one it holds
without asking which it is, on the plain-loop driver and the Flower path alike.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fedvb.core.gaussian import Family, Gaussian, NaturalParams
from fedvb.core.solvers import local_penalty, posterior_from_curvature
from fedvb.core.trainers import TorchTrainer

__all__ = ["EXACT", "IVON", "LAPLACE", "SOLVERS", "ClientSolver", "ExactSolver", "IVONSolver", "LaplaceSolver"]

State = dict[str, Tensor]


class ClientSolver(Protocol):
    """One way to compute a client's posterior in the BayesADMM client step."""

    name: str

    def supports(self, family: Family) -> str | None:
        """Why this solver cannot serve ``family`` (``None``: it can)."""

    def solve(
        self,
        trainer: TorchTrainer,
        server: Gaussian,
        site: NaturalParams,
        *,
        rho: float,
        temperature: float,
        point_estimate: bool,
        generator: torch.Generator,
        state: State,
        first_round: bool,
        start: Tensor | None = None,
    ) -> tuple[Gaussian, State]:
        """The client's posterior (in the server's dtype and device) and the solver's new state. ``start``:
        where local training starts (``None``: the server's mean; it differs in round 1 when the clients are
        anchored at the prior, :class:`~fedvb.core.algorithms.BayesADMM`)."""


class ExactSolver:
    """Closed form / Newton on the client's whole data set (models ``linear`` and ``softmax``)."""

    name = "exact"

    def supports(self, family: Family) -> str | None:
        return None

    def solve(
        self, trainer, server, site, *, rho, temperature, point_estimate, generator, state, first_round, start=None
    ):
        posterior = trainer.exact(server, site, rho=rho, temperature=temperature, point_estimate=point_estimate)
        return posterior, {}


class LaplaceSolver:
    """MAP on the cavity objective, then the diagonal GGN at the mode (docs/algorithms.md §5)."""

    name = "laplace"

    def supports(self, family: Family) -> str | None:
        return None

    def solve(
        self, trainer, server, site, *, rho, temperature, point_estimate, generator, state, first_round, start=None
    ):
        cavity = local_penalty(server, site, rho)
        mean = trainer.map(server.mean if start is None else start, cavity, temperature=temperature,
                           generator=generator)  # fmt: skip
        mean = mean.to(server.mean)  # the server's dtype and device (the trainer may be on a GPU)
        if point_estimate:
            return Gaussian(mean, server.precision, server.family), {}
        curvature = server.family.laplace_curvature(trainer, mean, generator=generator).to(server.mean)
        return posterior_from_curvature(server, site, mean, curvature, rho=rho, temperature=temperature), {}


class IVONSolver:
    """IVON with the server as prior and start, ``ess = N / rho`` (docs/algorithms.md §4)."""

    name = "ivon"

    def supports(self, family: Family) -> str | None:
        if family.coordinatewise:
            return None
        return f"IVON keeps a diagonal Hessian estimate; a {family.name} family needs exact or laplace"

    def solve(
        self, trainer, server, site, *, rho, temperature, point_estimate, generator, state, first_round, start=None
    ):
        ivon_state = {k: v for k, v in state.items() if k.startswith("ivon_")}
        posterior, new_state = trainer.ivon(
            server, site, rho=rho, temperature=temperature, generator=generator, state=ivon_state,
            first_round=first_round, start=start,
        )  # fmt: skip
        return posterior.to(server.dtype), new_state


EXACT, LAPLACE, IVON = ExactSolver(), LaplaceSolver(), IVONSolver()
SOLVERS: dict[str, ClientSolver] = {solver.name: solver for solver in (EXACT, LAPLACE, IVON)}
