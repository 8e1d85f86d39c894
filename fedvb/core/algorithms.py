"""Every algorithm as a client step and a server step over named tensors.

An :class:`Algorithm` says what the server broadcasts (``payload``), what a
client does with it (``client_round``: train locally with a trainer, return a
reply and its new private state), and how the server folds the replies in
(``server_round``).  Payloads, replies and client states are ``dict[str, Tensor]``
so that Flower can carry them as ArrayRecords unchanged; the Flower strategy
and ClientApp only move them, and the plain-loop driver calls the same methods.

The BayesADMM family (FedLap, FedLap-Cov, IVON-ADMM, BayesADMM-Newton, PVI) is
one class over a :class:`~fedvb.core.duality.Preset`; the baselines (FedAvg,
FedProx, FedDyn, FedADMM, SCAFFOLD) follow their papers (docs/algorithms.md §7)
with squared proximal norms.  Losses are sums over a client's examples unless
a docstring says "mean loss".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fedvb.core.client_solvers import ClientSolver
from fedvb.core.client_store import ClientStore, SitesView
from fedvb.core.duality import Preset, aggregate
from fedvb.core.gaussian import ISOTROPIC, Gaussian, NaturalParams, NonPositivePrecisionError, sum_natural
from fedvb.core.robust import MEAN, Combination, beyond_cohort, clip_to_cohort
from fedvb.core.tensor_checks import all_finite
from fedvb.core.trainers import CARRIED_OPTIMIZER, TorchTrainer

__all__ = [
    "Algorithm",
    "BayesADMM",
    "FedLapFunc",
    "FedADMM",
    "FedAvg",
    "FedDyn",
    "FedProx",
    "RejectedReply",
    "Scaffold",
    "ServerState",
    "client_step",
]

Arrays = dict[str, Tensor]


@dataclass
class ServerState:
    """What the server holds between rounds: tensors by name (those named ``_...`` are the server's own, never
    sent) plus its record of the clients' sites (BayesADMM): a mapping, read client by client (a
    :class:`~fedvb.core.client_store.SitesView` over the client store; after a round, the cohort's new
    sites in front of it until the strategy commits them)."""

    arrays: Arrays
    sites: Mapping[Any, NaturalParams] = field(default_factory=dict)


class RejectedReply(ValueError):
    """A client reply the server will not use; the message says why."""


class Algorithm(ABC):
    """A federated algorithm as pure steps; see the module docstring."""

    name: str
    uncertainty = False  # True when the server's Gaussian is a posterior worth sampling for predictions
    robust_clip = 0.0  # bound on one reply's change, in medians of the cohort's (fedvb.core.robust); 0: none
    combination: Combination = MEAN  # what replaces each average over the cohort (fedvb.core.robust)
    clipped: tuple = ()  # the clients whose replies the last server round clipped
    outliers: tuple = ()  # the clients whose replies' changes were beyond the cohort's (fedvb.core.robust)

    @abstractmethod
    def init_server(self, initial_mean: Tensor, num_clients: int) -> ServerState: ...

    def payload(self, server: ServerState) -> Arrays:
        """What every sampled client receives this round."""
        return {k: v for k, v in server.arrays.items() if not k.startswith("_")}

    @abstractmethod
    def client_round(
        self, payload: Arrays, state: Arrays, trainer: TorchTrainer, *, generator: torch.Generator
    ) -> tuple[Arrays, Arrays]:
        """``(reply, new_state)``; ``state`` is empty the first time a client is sampled."""

    @abstractmethod
    def server_round(self, server: ServerState, replies: dict[Any, Arrays], num_clients: int) -> ServerState:
        """The new server state from this round's replies (keyed by client)."""

    def reply_shapes(self, server: ServerState) -> dict[str, tuple[int, ...]]:
        """The tensors a reply must hold and their shapes (``-1``: any length); ``num_examples`` is implied."""
        return {"mean": tuple(server.arrays["mean"].shape)}

    def check_reply(self, server: ServerState, reply: Arrays, client: Any = None) -> None:
        """Raise :class:`RejectedReply` unless ``reply`` has exactly the expected tensors, each of the server's
        dtype and shape and finite, with a non-negative example count. ``client``: who sent it, where the
        check depends on what the server holds for that client."""
        expected = {**self.reply_shapes(server), "num_examples": ()}
        if set(reply) != set(expected):
            raise RejectedReply(f"holds {sorted(reply)}; expected {sorted(expected)}")
        dtype = server.arrays["mean"].dtype
        for name, shape in expected.items():
            value = reply[name]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise RejectedReply(f"{name} is not a floating-point tensor")
            if name != "num_examples" and value.dtype != dtype:
                raise RejectedReply(f"{name} has dtype {value.dtype}; expected {dtype}")
            if len(value.shape) != len(shape) or any(e not in (-1, g) for e, g in zip(shape, value.shape)):
                raise RejectedReply(f"{name} has shape {tuple(value.shape)}; expected {shape}")
            if not all_finite(value):
                raise RejectedReply(f"{name} has non-finite values")
        if float(reply["num_examples"]) < 0:
            raise RejectedReply("num_examples is negative")

    def bound(self, server: ServerState, replies: dict[Any, Arrays]) -> dict[Any, Arrays]:
        """The replies with each tensor's change (from the server's tensor of that name, else from zero)
        clipped to the cohort (:func:`fedvb.core.robust.clip_to_cohort`, ``robust_clip`` medians); the
        clients clipped are left in :attr:`clipped`, the outliers (clipped or not) in :attr:`outliers`."""
        self.clipped = ()
        keys = [k for k in self.reply_shapes(server) if k != "num_examples"]
        sizes = [float(r["num_examples"]) for r in replies.values()]
        clipping = self.robust_clip > 0 and len(replies) >= 3
        # each reply's change of each tensor, kept for the clip below only where it clips
        changes = ([r[k] - server.arrays[k] if k in server.arrays else r[k] for k in keys] for r in replies.values())
        if clipping:
            changes = list(changes)
        self._watch(replies, sizes, ([change.double().norm() for change in per_key] for per_key in changes))
        if not clipping:
            return replies
        bounded = {client: dict(reply) for client, reply in replies.items()}
        for column, key in enumerate(keys):
            reference = server.arrays.get(key)
            changes_of_key = [per_key[column] for per_key in changes]
            clipped_changes = clip_to_cohort(changes_of_key, sizes, self.robust_clip)
            for client, change, clipped in zip(replies, changes_of_key, clipped_changes):
                if clipped is not change:  # only clipped tensors are rebuilt: the others stay bit for bit
                    bounded[client][key] = clipped + reference if reference is not None else clipped
        self.clipped = tuple(c for c in replies if any(bounded[c][k] is not replies[c][k] for k in keys))
        return bounded

    def _watch(self, replies: dict[Any, Arrays], sizes: list[float], norms: Iterable[Sequence[Tensor]]) -> None:
        """:attr:`outliers`: the clients one of whose changes (``norms``, per reply and tensor, computed one
        reply at a time) is beyond the cohort's (:func:`fedvb.core.robust.beyond_cohort`)."""
        per_tensor = list(zip(*norms)) if replies else []
        flags = [beyond_cohort(column, sizes) for column in per_tensor]
        self.outliers = tuple(c for i, c in enumerate(replies) if any(f[i] for f in flags))

    def kept_reply(self, reply: Arrays) -> Arrays:
        """What of a checked reply :meth:`server_round` reads (all of it, by default): a server taking in a
        large cohort drops the rest as each reply passes the screen."""
        return reply

    def kept_state(self, state: Arrays) -> Arrays:
        """What of a client's new state the server holds until :meth:`commit` (all of it, by default);
        :meth:`committed_state` puts back what the server itself sets."""
        return state

    def committed_state(self, server: ServerState, client: Any, state: Arrays) -> Arrays:
        """The state kept for ``client`` after the server accepted its reply (the client's own, by default)."""
        return state

    def commit(self, server: ServerState, states: dict[Any, Arrays], store: ClientStore) -> ServerState:
        """After a server round: each accepted client's :meth:`committed_state` put into ``store``; the server
        state then reads its record of the clients from the store."""
        for client, state in states.items():
            store.put(client, self.committed_state(server, client, state))
        return self.attach(server, store)

    def attach(self, server: ServerState, store: ClientStore) -> ServerState:
        """``server`` reading its per-client records from ``store`` (nothing to read but for sites)."""
        return server

    def server_mean(self, server: ServerState) -> Tensor:
        return server.arrays["mean"]

    def server_posterior(self, server: ServerState) -> Gaussian | None:
        return None


def client_step(
    algorithm: Algorithm, payload: Arrays, state: Arrays, trainer: TorchTrainer, *, generator: torch.Generator
) -> tuple[Arrays, Arrays]:
    """``algorithm.client_round`` as every driver runs it: the trainer's Adam state, where the run keeps it
    (``optimizer_state = "kept"``), carried in the client's state under :data:`CARRIED_OPTIMIZER` beside
    what the algorithm keeps, so that every MAP algorithm and the Laplace solver carry it alike."""
    trainer.carry_optimizer({k: v for k, v in state.items() if k in CARRIED_OPTIMIZER})
    own = {k: v for k, v in state.items() if k not in CARRIED_OPTIMIZER}
    reply, new_state = algorithm.client_round(payload, own, trainer, generator=generator)
    return reply, {**new_state, **trainer.carried_optimizer()}


ROUND_ONE_ANCHORS = ("init", "prior")  # BayesADMM's round_one_anchor (docs/algorithms.md §2: round 1)


def _weighted_mean(replies: dict[Any, Arrays], key: str, combination: Combination) -> Tensor:
    weights = torch.stack([r["num_examples"].double() for r in replies.values()])
    return combination.mean([r[key] for r in replies.values()], weights)


class BayesADMM(Algorithm):
    """The BayesADMM machinery for any preset (docs/algorithms.md §2): the preset's client solver
    (:mod:`fedvb.core.client_solvers`), its site step and its alpha rule.
    The server starts at ``N(initial_mean, delta^-1)`` (the model's initialisation) while the prior is
    ``N(0, delta^-1 I)``. ``round_one_anchor``: what round 1's clients are anchored at (their cavity and site
    step): ``"init"``, the server's starting mean, or ``"prior"``, the prior mean 0 while they still start
    training from the initialisation, as the papers' code (docs/algorithms.md §2: round 1).
    """

    def __init__(
        self,
        preset: Preset,
        *,
        prior_precision: float,
        temperature: float = 1.0,
        precision_floor: float | None = None,
        round_one_anchor: str = "init",
    ) -> None:
        if round_one_anchor not in ROUND_ONE_ANCHORS:
            raise ValueError(f"round_one_anchor: got {round_one_anchor!r}; allowed: {', '.join(ROUND_ONE_ANCHORS)}")
        self.round_one_anchor = round_one_anchor
        self.preset = preset
        self.name = preset.name
        # FedLap's fixed precision is a prior scale, not a posterior: no predictive sampling for it.
        self.uncertainty = not preset.point_estimate
        self.prior_precision, self.temperature, self.precision_floor = prior_precision, temperature, precision_floor

    @property
    def solver(self) -> ClientSolver:
        return self.preset.solver

    def bind(self, model: nn.Module) -> BayesADMM:
        """Bind the preset's family to ``model`` (a family whose layout follows the layers; a no-op for the
        others); the server's and the clients' algorithm are bound to the same architecture."""
        self.preset = self.preset.bound_to(model)
        return self

    def _prior(self, like: Tensor) -> Gaussian:
        return Gaussian.isotropic_prior(like.numel(), self.prior_precision, self.preset.family, dtype=like.dtype)

    def init_server(self, initial_mean, num_clients):
        prior = self._prior(initial_mean)
        round_zero = torch.tensor(0.0, dtype=initial_mean.dtype)
        zero = NaturalParams.zeros(prior.dim, self.preset.family, dtype=prior.dtype)
        return ServerState({"mean": initial_mean.clone(), "precision": prior.precision.clone(), "round": round_zero,
                            **_site_sum_arrays(zero)})  # fmt: skip

    def client_round(self, payload, state, trainer, *, generator):
        if self.preset.family.needs_model:  # a client's algorithm learns the architecture from its trainer
            self.bind(trainer.model)
        family = self.preset.family
        server = self._anchor(payload)
        site = (
            NaturalParams(state["site_linear"], state["site_quadratic"], family)
            if state
            else NaturalParams.zeros(server.dim, family, dtype=server.dtype)
        )
        posterior, new_state = self.solver.solve(
            trainer, server, site, rho=self.preset.rho, temperature=self.temperature,
            point_estimate=self.preset.point_estimate, generator=generator, state=state,
            first_round=int(payload["round"]) == 0, start=payload["mean"],
        )  # fmt: skip
        # The reply is the posterior alone, the new state the solver's alone: the client's new site is the
        # site step from the server's record to this posterior, which the server computes itself
        # (server_round) and hands back with the client's next message (committed_state). A site sent up
        # would be two model-sized float64 vectors a reply that the server could only check and drop: 5.7 of
        # an IVON-ADMM reply's 9.3 MB on the papers' MLP, when the site went up both in the reply and the state.
        reply = {
            "mean": posterior.mean,
            "precision": posterior.precision,
            "num_examples": torch.tensor(float(trainer.num_examples)),
        }
        return reply, dict(new_state)

    def reply_shapes(self, server):
        return {"mean": tuple(server.arrays["mean"].shape), "precision": tuple(server.arrays["precision"].shape)}

    def check_reply(self, server, reply, client=None):
        """Also: a positive precision."""
        super().check_reply(server, reply, client)
        try:
            Gaussian(reply["mean"], reply["precision"], self.preset.family)
        except (ValueError, NonPositivePrecisionError) as error:
            raise RejectedReply(f"precision: {error}") from None

    def _site(self, server: ServerState, client: Any) -> NaturalParams:
        """The server's record of ``client``'s site (zero before its first accepted reply)."""
        mean = server.arrays["mean"]
        return server.sites.get(client) or NaturalParams.zeros(mean.numel(), self.preset.family, dtype=mean.dtype)

    def bound(self, server, replies):
        """Each reply's posterior moved towards the server's: its natural parameters' change from the server's
        ``(S_bar m_bar, S_bar)``, linear and quadratic part each clipped to the cohort (a convex combination, so
        the precision stays positive)."""
        self.clipped = ()
        family = self.preset.family
        centre = self._anchor(server.arrays).natural()
        sizes = [float(r["num_examples"]) for r in replies.values()]
        clipping = self.robust_clip > 0 and len(replies) >= 3
        naturals = (Gaussian(r["mean"], r["precision"], family).natural() for r in replies.values())
        changes = ((n.linear - centre.linear, n.quadratic - centre.quadratic) for n in naturals)
        if clipping:  # the clip below reads them again; else they are made, measured and dropped one at a time
            changes = list(changes)
        self._watch(
            replies, sizes, ([linear.double().norm(), quadratic.double().norm()] for linear, quadratic in changes)
        )
        if not clipping:
            return replies
        linear = [change[0] for change in changes]
        quadratic = [change[1] for change in changes]
        clipped_linear = clip_to_cohort(linear, sizes, self.robust_clip)
        clipped_quadratic = clip_to_cohort(quadratic, sizes, self.robust_clip)
        bounded, self.clipped = {}, ()
        for i, (client, reply) in enumerate(replies.items()):
            if clipped_linear[i] is linear[i] and clipped_quadratic[i] is quadratic[i]:
                bounded[client] = reply  # within the bound: bit for bit as sent
                continue
            natural = NaturalParams(centre.linear + clipped_linear[i], centre.quadratic + clipped_quadratic[i], family)
            clipped = Gaussian.from_natural(natural, what="a clipped reply")
            bounded[client] = {**reply, "mean": clipped.mean, "precision": clipped.precision}
            self.clipped += (client,)
        return bounded

    def committed_state(self, server, client, state):
        """The client's solver state plus the site the server recorded for it (the site step to its reply's
        posterior, as clipped where :meth:`bound` clipped it), which its next message carries."""
        if client not in server.sites:
            return state
        site = server.sites[client]
        return {**state, "site_linear": site.linear, "site_quadratic": site.quadratic}

    def server_round(self, server, replies, num_clients):
        """Fold in replies that passed :meth:`check_reply`, bounded by :meth:`bound`; each replying client's
        site is the site step to its (bounded) posterior, computed here from the server's record."""
        family = self.preset.family
        replies = self.bound(server, replies)
        anchor = self._anchor(server.arrays)
        running = self._running_site_sum(server, len(replies), num_clients)
        posteriors = [Gaussian(replies[key]["mean"], replies[key]["precision"], family) for key in sorted(replies)]
        sites = _SitesAfterRound(self, server, dict(zip(sorted(replies), posteriors)), anchor)
        if running is not None:
            for key in sorted(replies):  # one client at a time: its old and new site made, used and dropped
                running = running + (sites[key] - self._site(server, key))
        prior = self._prior(server.arrays["mean"])
        next_round = server.arrays["round"] + 1
        if not posteriors and self.preset.mixing(num_clients) < 1:
            return ServerState({**server.arrays, "round": next_round}, server.sites)
        site_sum = running if running is not None else self._exact_site_sum(server, sites)
        new = aggregate(
            prior, posteriors, [], alpha=self.preset.mixing(num_clients), precision_floor=self.precision_floor,
            combination=self.combination, site_sum=site_sum,
        )  # fmt: skip
        arrays = {"mean": new.mean, "precision": new.precision, "round": next_round, **_site_sum_arrays(site_sum)}
        return ServerState(arrays, sites)

    def _running_site_sum(self, server: ServerState, cohort: int, num_clients: int) -> NaturalParams | None:
        """The server's running total ``sum_k v_k``, which the cohort's site changes update, so that a round
        reads no other client's site; ``None`` where the round sums every site exactly instead: when the
        cohort is every client (nothing else to read), when there is no running total (an older checkpoint),
        for a robust combination of the sites (:mod:`fedvb.core.robust`), which is not a sum of changes, and
        for a family not closed under addition, whose running total would gather one projection a round
        (it projects the exact sum once instead)."""
        running = "_site_sum_linear" in server.arrays
        exact = self.combination.rule != "mean" or not self.preset.family.closed_under_addition
        if exact or not running or cohort >= num_clients:
            return None
        return NaturalParams(server.arrays["_site_sum_linear"], server.arrays["_site_sum_quadratic"],
                             self.preset.family)  # fmt: skip

    def _exact_site_sum(self, server: ServerState, sites: Mapping[Any, NaturalParams]) -> NaturalParams:
        """``sum_k v_k`` over every client, in client order (clients never heard from have zero sites)."""
        every = [sites[k] for k in sorted(sites)]
        if not every:
            like = server.arrays["mean"]
            return NaturalParams.zeros(like.numel(), self.preset.family, dtype=like.dtype)
        return sum_natural(every) if self.combination.rule == "mean" else self.combination.natural_sum(every)

    def attach(self, server, store):
        return ServerState(server.arrays, SitesView(store, self.preset.family))

    def server_posterior(self, server):
        return Gaussian(server.arrays["mean"], server.arrays["precision"], self.preset.family)

    def _anchor(self, arrays: Arrays) -> Gaussian:
        """What a round's clients are anchored at (cavity and site step): the server's posterior, but in round
        1 under ``round_one_anchor = "prior"`` the prior's mean 0 with the server's precision."""
        mean = arrays["mean"]
        if self.round_one_anchor == "prior" and int(arrays["round"]) == 0:
            mean = torch.zeros_like(mean)
        return Gaussian(mean, arrays["precision"], self.preset.family)


HELD_SITES_BYTES = 64 * 2**20  # new sites a server round keeps for its commit (_SitesAfterRound)


class _SitesAfterRound(Mapping):
    """Every client's site after a server round: a replying client's is the site step from its old site to
    its posterior; every other client's is the old record. Each new site is read twice (the site sum, then the
    commit that stores it): the first :data:`HELD_SITES_BYTES` of them are kept from the first read, the rest
    computed again (the same operations, so bit for bit). Held whole, a cohort of 100 papers'-MLP sites would
    be 285 MB; computed twice, the site steps and old-site reads were a third of a 10-client IVON-ADMM server
    round and its commit."""

    def __init__(self, algorithm: BayesADMM, server: ServerState, posteriors: dict[Any, Gaussian],
                 server_posterior: Gaussian) -> None:  # fmt: skip
        self._algorithm, self._server, self._posteriors = algorithm, server, posteriors
        self._server_posterior = server_posterior
        self._held: dict[Any, NaturalParams] = {}
        self._held_bytes = 0

    def __getitem__(self, client: Any) -> NaturalParams:
        if client not in self._posteriors:
            return self._server.sites[client]
        if client in self._held:
            return self._held[client]
        old = self._algorithm._site(self._server, client)
        site = self._algorithm.preset.update_site(old, self._posteriors[client], self._server_posterior)
        size = sum(t.numel() * t.element_size() for t in (site.linear, site.quadratic))
        if self._held_bytes + size <= HELD_SITES_BYTES:
            self._held[client], self._held_bytes = site, self._held_bytes + size
        return site

    def __contains__(self, client: object) -> bool:
        return client in self._posteriors or client in self._server.sites

    def __iter__(self):
        return iter(sorted(set(self._posteriors) | set(self._server.sites)))

    def __len__(self) -> int:
        return len(set(self._posteriors) | set(self._server.sites))


def _site_sum_arrays(total: NaturalParams) -> Arrays:
    """The running site sum as server tensors (``_``: the server's own, not sent to clients)."""
    return {"_site_sum_linear": total.linear, "_site_sum_quadratic": total.quadratic}


class FedLapFunc(BayesADMM):
    """FedLap plus function-space information on unlabelled inputs (docs/algorithms.md §5), K-prior style.

    The server holds unlabelled inputs ``U``. Each client trains as in FedLap and
    also returns its local model's predicted probabilities ``p_k(x)`` on ``U``.
    After FedLap's update (``m_lap = (S0 m0 + sum_k v_k) / delta``) the server
    fits its model's predictions to the clients' soft labels::

        m_bar = argmin_w  delta/2 ||w - m_lap||^2 + beta sum_{x in U} CE(p_avg(x), softmax f_w(x)),
        p_avg = sum_{k replied} N_k p_k / sum_{k replied} N_k,

    by at most ``steps`` L-BFGS iterations from ``m_lap``. The quadratic term is FedLap's own
    Gaussian (precision ``delta``), so ``beta = 0`` is FedLap exactly; the
    function-space term carries what a weight-space Gaussian loses about the
    clients' functions (the K-prior idea of reconstructing past gradients from
    soft labels on stored inputs).

    The fit's shift ``m_bar - m_lap`` is then held in the replying clients' sites (shares by size), so the
    server stays prior times sites and the next FedLap step starts from the fitted mean instead of undoing the
    fit. At a fixed point the clients' models are the server's, their soft labels its own predictions, the fit
    does not move and the sites gain nothing: FedLap's fixed point (the MAP) is unchanged.
    """

    def __init__(self, preset, *, inputs: Tensor, weight: float, steps: int, lr: float, model, **kwargs) -> None:
        super().__init__(preset, **kwargs)
        self.name = "fedlap-func"
        self.inputs, self.weight, self.steps, self.lr = inputs, weight, steps, lr
        self.model = model  # a TorchTrainer without data: the server's copy of the model

    def client_round(self, payload, state, trainer, *, generator):
        reply, new_state = super().client_round(payload, state, trainer, generator=generator)
        reply["soft_labels"] = trainer.predict(reply["mean"].float(), self.inputs).to(reply["mean"])
        return reply, new_state

    def reply_shapes(self, server):
        return {**super().reply_shapes(server), "soft_labels": (len(self.inputs), -1)}

    def check_reply(self, server, reply, client=None):
        super().check_reply(server, reply, client)
        soft = reply["soft_labels"]
        if bool((soft < 0).any()) or not torch.allclose(soft.sum(-1), torch.ones_like(soft[:, 0]), atol=1e-4):
            raise RejectedReply("soft_labels: rows must be probabilities (non-negative, summing to 1)")

    def function_space_loss(self, theta: Tensor, soft_labels: Tensor) -> Tensor:
        """``sum_{x in U} CE(p_avg(x), softmax f_theta(x))``."""
        logits = self.model.logits_at(theta.float(), self.inputs)
        return -(soft_labels.float() * torch.log_softmax(logits, -1)).sum()

    def fit(self, anchor: Tensor, soft_labels: Tensor) -> Tensor:
        """The server's function-space fit from ``anchor`` (the class docstring's ``argmin``).

        L-BFGS with a strong-Wolfe line search (torch's), not Adam: the objective is stiff (curvature about
        1e3 in some directions against ``delta = 1`` on digits' MLP), and Adam, which steps every coordinate by
        about its learning rate whatever the gradient's size, oscillates around the minimiser; from a fixed
        point (soft labels the anchor's own predictions) 50 Adam steps at 1e-3 moved a weight by 1.4e-3,
        L-BFGS by 1.5e-8. ``lr`` is L-BFGS's step scale (1: the line search's own step)."""
        delta = float(self.prior_precision)
        target = anchor.float()
        theta = target.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], lr=self.lr, max_iter=self.steps, line_search_fn="strong_wolfe")

        def objective() -> Tensor:
            optimizer.zero_grad()
            value = 0.5 * delta * ((theta - target) ** 2).sum() + self.weight * self.function_space_loss(
                theta, soft_labels
            )
            value.backward()
            return value

        optimizer.step(objective)
        return theta.detach().to(anchor.dtype)

    def server_round(self, server, replies, num_clients):
        new = super().server_round(server, replies, num_clients)
        if not replies or self.weight == 0 or self.steps == 0:
            return new
        soft = _weighted_mean(replies, "soft_labels", self.combination)
        soft = soft / soft.sum(-1, keepdim=True)  # a trimmed or median combination need not sum to one
        anchor = new.arrays["mean"]
        refined = self.fit(anchor, soft)
        # The shift in natural parameters (the precision is unchanged), shared among the replying clients' sites.
        family = self.preset.family
        shift = (Gaussian(refined, new.arrays["precision"], family).natural().linear
                 - Gaussian(anchor, new.arrays["precision"], family).natural().linear)  # fmt: skip
        sizes = {client: float(reply["num_examples"]) for client, reply in replies.items()}
        total = sum(sizes.values())
        arrays = {**new.arrays, "mean": refined, "_site_sum_linear": new.arrays["_site_sum_linear"] + shift}
        return ServerState(arrays, _SitesShifted(new.sites, shift, {k: n / total for k, n in sizes.items()}))


class _SitesShifted(Mapping):
    """``sites`` with ``shares[client] * shift`` added to each named client's linear part (FedLap-Func's fit, held
    in the sites of the clients that replied); each share made when read, so a cohort holds one shift, not one a
    client."""

    def __init__(self, sites: Mapping[Any, NaturalParams], shift: Tensor, shares: dict[Any, float]) -> None:
        self._sites, self._shift, self._shares = sites, shift, shares

    def __getitem__(self, client: Any) -> NaturalParams:
        site = self._sites[client]
        if client not in self._shares:
            return site
        return NaturalParams(site.linear + self._shares[client] * self._shift, site.quadratic, site.family)

    def __contains__(self, client: object) -> bool:
        return client in self._sites

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


class FedAvg(Algorithm):
    """FedAvg: local training from the server model; the server averages weighted by client size."""

    name = "fedavg"

    def init_server(self, initial_mean, num_clients):
        return ServerState({"mean": initial_mean.clone()})

    def _penalty(self, payload: Arrays, state: Arrays, trainer: TorchTrainer) -> NaturalParams | None:
        return None

    def client_round(self, payload, state, trainer, *, generator):
        mean = trainer.map(payload["mean"], self._penalty(payload, state, trainer), generator=generator)
        return {"mean": mean.to(payload["mean"]), "num_examples": torch.tensor(float(trainer.num_examples))}, state

    def server_round(self, server, replies, num_clients):
        if not replies:
            return server
        replies = self.bound(server, replies)
        return ServerState({"mean": _weighted_mean(replies, "mean", self.combination).to(server.arrays["mean"])})


class FedProx(FedAvg):
    """FedProx: mean loss + ``mu/2 ||w - w_bar||^2`` (squared, as in the paper)."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def _penalty(self, payload, state, trainer):
        n = trainer.num_examples  # the mean-loss term, in sum-loss units
        return NaturalParams(
            n * self.mu * payload["mean"], torch.tensor(n * self.mu, dtype=payload["mean"].dtype), ISOTROPIC
        )


class FedDyn(Algorithm):
    """FedDyn (Acar et al. 2021), mean loss: client ``min L_k(w) - <g_k, w> + alpha/2 ||w - w_bar||^2``,
    then ``g_k <- g_k - alpha (w_k - w_bar)``; server ``h <- h - alpha/K sum_S (w_k - w_bar)``,
    ``w_bar = mean_S w_k - h / alpha``."""

    name = "feddyn"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def init_server(self, initial_mean, num_clients):
        return ServerState({"mean": initial_mean.clone(), "_h": torch.zeros_like(initial_mean)})

    def client_round(self, payload, state, trainer, *, generator):
        w_bar = payload["mean"]
        g = state.get("g", torch.zeros_like(w_bar))
        n = trainer.num_examples
        penalty = NaturalParams(
            n * (self.alpha * w_bar + g), torch.tensor(n * self.alpha, dtype=w_bar.dtype), ISOTROPIC
        )
        w = trainer.map(w_bar, penalty, generator=generator).to(w_bar)
        new_g = g - self.alpha * (w - w_bar)
        return {"mean": w, "num_examples": torch.tensor(float(n))}, {"g": new_g}

    def server_round(self, server, replies, num_clients):
        if not replies:
            return server
        replies = self.bound(server, replies)
        w_bar = server.arrays["mean"]
        average = self.combination.mean([r["mean"] for r in replies.values()]).to(w_bar)
        drift = len(replies) * (average - w_bar)  # sum_S (w_k - w_bar)
        h = server.arrays["_h"] - self.alpha / num_clients * drift
        mean = average - h / self.alpha
        return ServerState({"mean": mean, "_h": h})


class FedADMM(Algorithm):
    """FedADMM (Gong et al. 2022): client ``min l_k(w) + y_k^T w + rho/2 ||w - w_bar||^2``, then
    ``y_k += rho (w_k - w_bar)``; sends ``delta_k`` = change of ``w_k + y_k / rho``; server
    ``w_bar += eta / K sum delta_k``."""

    name = "fedadmm"

    def __init__(self, rho: float, server_lr: float = 1.0) -> None:
        self.rho, self.server_lr = rho, server_lr

    def init_server(self, initial_mean, num_clients):
        return ServerState({"mean": initial_mean.clone()})

    def reply_shapes(self, server):
        return {"mean": tuple(server.arrays["mean"].shape), "delta": tuple(server.arrays["mean"].shape)}

    def client_round(self, payload, state, trainer, *, generator):
        w_bar = payload["mean"]
        y = state.get("y", torch.zeros_like(w_bar))
        augmented_old = state.get("augmented", w_bar)
        penalty = NaturalParams(self.rho * w_bar - y, torch.tensor(self.rho, dtype=w_bar.dtype), ISOTROPIC)
        w = trainer.map(w_bar, penalty, generator=generator).to(w_bar)
        y = y + self.rho * (w - w_bar)
        augmented = w + y / self.rho
        reply = {
            "mean": w,
            "delta": augmented - augmented_old,
            "num_examples": torch.tensor(float(trainer.num_examples)),
        }
        return reply, {"y": y, "augmented": augmented}

    def server_round(self, server, replies, num_clients):
        if not replies:
            return server
        replies = self.bound(server, replies)
        mean = server.arrays["mean"]
        step = len(replies) * self.combination.mean([r["delta"] for r in replies.values()]).to(mean)
        return ServerState({"mean": server.arrays["mean"] + self.server_lr / num_clients * step})


class Scaffold(Algorithm):
    """SCAFFOLD (Karimireddy et al. 2020), option II: SGD on ``mean loss + (c - c_k)^T y`` (the
    corrected gradient), ``c_k+ = c_k - c + (w_bar - y) / (T lr)``; server ``w_bar += eta mean dy``,
    ``c += |S|/K mean dc``. Clients always use SGD."""

    name = "scaffold"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def init_server(self, initial_mean, num_clients):
        return ServerState({"mean": initial_mean.clone(), "control": torch.zeros_like(initial_mean)})

    def reply_shapes(self, server):
        shape = tuple(server.arrays["mean"].shape)
        return {"delta_mean": shape, "delta_control": shape}

    def client_round(self, payload, state, trainer, *, generator):
        w_bar, c = payload["mean"], payload["control"]
        c_k = state.get("control", torch.zeros_like(w_bar))
        n = trainer.num_examples
        penalty = NaturalParams(n * (c_k - c), torch.tensor(0.0, dtype=w_bar.dtype), ISOTROPIC)
        y = trainer.map(w_bar, penalty, generator=generator, optimizer="sgd").to(w_bar)
        c_new = c_k - c + (w_bar - y) / (trainer.steps_per_round() * trainer.lr)
        reply = {"delta_mean": y - w_bar, "delta_control": c_new - c_k, "num_examples": torch.tensor(float(n))}
        return reply, {"control": c_new}

    def server_round(self, server, replies, num_clients):
        if not replies:
            return server
        replies = self.bound(server, replies)
        mean = server.arrays["mean"]
        dy = self.combination.mean([r["delta_mean"] for r in replies.values()]).to(mean)
        dc = self.combination.mean([r["delta_control"] for r in replies.values()]).to(mean)
        return ServerState(
            {
                "mean": server.arrays["mean"] + self.server_lr * dy,
                "control": server.arrays["control"] + len(replies) / num_clients * dc,
            }
        )
