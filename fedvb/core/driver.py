"""Plain-loop driver: R rounds of any preset over K in-memory clients.

No Flower, no Ray: a Python loop over clients.  The Flower layers are tested
against it and benchmarks use it as the floor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedvb.core.algorithms import Algorithm, RejectedReply, ServerState, client_step
from fedvb.core.client_store import MemoryStore
from fedvb.core.cohort import CohortEngine
from fedvb.core.duality import Preset, aggregate
from fedvb.core.gaussian import Gaussian, NaturalParams
from fedvb.core.trainers import TorchTrainer

__all__ = ["DriverResult", "run_algorithm", "run_plain_loop", "sample_participants"]


def sample_participants(num_clients: int, fraction: float, *, seed: int, server_round: int) -> list[int]:
    """The clients taking part in ``server_round``: ``max(1, round(fraction K))`` of them.

    Drawn from a generator seeded by ``(seed, server_round)`` alone, so the
    choice does not depend on what happened in earlier rounds.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(1, int(round(fraction * num_clients)))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(np.random.SeedSequence([seed, server_round]))
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))


@dataclass
class DriverResult:
    """Server posterior after each round (``servers[r]`` follows round ``r + 1``) and the final sites."""

    servers: list[Gaussian] = field(default_factory=list)
    sites: list[NaturalParams] = field(default_factory=list)
    participants: list[list[int]] = field(default_factory=list)

    @property
    def final(self) -> Gaussian:
        return self.servers[-1]


def run_plain_loop(
    preset: Preset,
    prior: Gaussian,
    clients: Sequence[TorchTrainer],
    rounds: int,
    *,
    temperature: float = 1.0,
    server_init: Gaussian | None = None,
    initial_sites: Sequence[NaturalParams] | None = None,
    fraction: float = 1.0,
    seed: int = 0,
    precision_floor: float | None = None,
) -> DriverResult:
    """Run ``rounds`` rounds of ``preset`` starting from ``server_init`` (default: the prior)
    and ``initial_sites`` (default: all zero).

    Each round the sampled clients run the preset's client solver (:mod:`fedvb.core.client_solvers`, the
    same protocol as on the Flower path) against the current server on their trainers, update their
    sites, and the server aggregates (:func:`fedvb.core.duality.aggregate`). Each client's random stream is
    seeded by ``(seed, round, client)``; its solver state (IVON's momentum) is kept across rounds.
    """
    if prior.family != preset.family:
        raise ValueError(f"prior family {prior.family.name!r} differs from preset family {preset.family.name!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    server = prior if server_init is None else server_init
    if initial_sites is None:
        sites = [
            NaturalParams.zeros(prior.dim, prior.family, dtype=prior.dtype, device=prior.mean.device) for _ in clients
        ]
    elif len(initial_sites) != len(clients):
        raise ValueError(f"initial_sites: need one per client ({len(clients)}), got {len(initial_sites)}")
    else:
        sites = list(initial_sites)
    states: list[dict[str, torch.Tensor]] = [{} for _ in clients]
    alpha = preset.mixing(len(clients))
    result = DriverResult()
    for server_round in range(1, rounds + 1):
        chosen = sample_participants(len(clients), fraction, seed=seed, server_round=server_round)
        posteriors = []
        for k in chosen:
            stream = np.random.SeedSequence([seed, server_round, k]).generate_state(1)[0]
            posterior, states[k] = preset.solver.solve(
                clients[k], server, sites[k], rho=preset.rho, temperature=temperature,
                point_estimate=preset.point_estimate, generator=torch.Generator().manual_seed(int(stream)),
                state=states[k], first_round=server_round == 1,
            )  # fmt: skip
            sites[k] = preset.update_site(sites[k], posterior, server)
            posteriors.append(posterior)
        server = aggregate(prior, posteriors, sites, alpha=alpha, precision_floor=precision_floor)
        result.servers.append(server)
        result.participants.append(chosen)
    result.sites = sites
    return result


def _client_step(algorithm: Algorithm, payload: dict, state: dict, generator: torch.Generator, trainer) -> tuple:
    return client_step(algorithm, payload, state, trainer, generator=generator)


def run_algorithm(
    algorithm: Algorithm,
    trainers: Sequence,
    rounds: int,
    initial_mean: torch.Tensor,
    *,
    generator_for: Callable[[int, int], torch.Generator],
    fraction: float = 1.0,
    seed: int = 0,
    on_round: Callable[[int, ServerState], None] | None = None,
    lr_for: Callable[[int], float] | None = None,
    engine: str = "loop",
) -> ServerState:
    """Any :class:`~fedvb.core.algorithms.Algorithm` over in-memory trainers, one client after another.
    ``lr_for(round)``: each round's local learning rate (a schedule), given to each trainer's ``begin_round``.

    ``generator_for(round, client)`` gives each client's random stream; the
    Flower backends draw participants and streams the same way, so they
    reproduce this loop's numbers. ``engine = "vectorised"``: each round's clients train together
    (:class:`~fedvb.core.cohort.CohortEngine`; the same numbers to float tolerance). A reply the algorithm rejects
    (:meth:`~fedvb.core.algorithms.Algorithm.check_reply`) is dropped and
    that client keeps its previous state, as on the Flower backends.
    """
    store = MemoryStore()
    server = algorithm.attach(algorithm.init_server(initial_mean, len(trainers)), store)
    for server_round in range(1, rounds + 1):
        payload = algorithm.payload(server)
        replies, states = {}, {}
        chosen = sample_participants(len(trainers), fraction, seed=seed, server_round=server_round)
        for k in chosen:
            if lr_for is not None:
                trainers[k].begin_round(lr_for(server_round))

        steps = [functools.partial(_client_step, algorithm, payload, store.get(k), generator_for(server_round, k))
                 for k in chosen]  # fmt: skip
        if engine == "vectorised":
            outcomes = CohortEngine().run(steps, [trainers[k] for k in chosen])
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        else:
            outcomes = [step(trainers[k]) for step, k in zip(steps, chosen)]
        for k, (reply, state) in zip(chosen, outcomes):
            try:
                algorithm.check_reply(server, reply, k)
            except RejectedReply:
                continue
            replies[k], states[k] = reply, state
        server = algorithm.commit(algorithm.server_round(server, replies, len(trainers)), states, store)
        if on_round is not None:
            on_round(server_round, server)
    return server
