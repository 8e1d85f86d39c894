"""Every algorithm fedvb runs, each as one typed value: the registry the CLI, the configuration, ``--help``,
the README's table and both drivers read.

A BayesADMM-family entry (:class:`BayesADMMSpec`) holds its Gaussian family (or ``None``: the ``family``
key chooses, diagonal by default), its default client solver and the solvers it allows
(:mod:`fedvb.core.client_solvers`), its site step (natural or expectation parameters), whether its
clients keep the server's precision (point estimates), and which of ``rho`` and ``alpha`` it fixes; it
builds the :class:`~fedvb.core.duality.Preset` from the run's hyperparameters. A baseline
(:class:`BaselineSpec`) builds its :class:`~fedvb.core.algorithms.Algorithm` from them. The maths of each
is in docs/algorithms.md (the section each entry cites).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fedvb.core.algorithms import Algorithm, FedADMM, FedAvg, FedDyn, FedProx, Scaffold
from fedvb.core.client_solvers import EXACT, IVON, LAPLACE, SOLVERS, ClientSolver
from fedvb.core.duality import Preset, SiteStep, bregman_site_update, default_alpha, site_update
from fedvb.core.gaussian import DENSE, DIAGONAL, ISOTROPIC, Family, family_by_name
from fedvb.core.kronecker import KRONECKER

__all__ = [
    "ALGORITHMS", "BASELINES", "BAYES_ADMM", "COMMON_DEFAULTS", "DATASET_DEFAULTS", "DEFAULTS", "ONE_OVER_K",
    "BaselineSpec", "BayesADMMSpec", "Hyperparameters", "default_value", "preset",
]  # fmt: skip


class Hyperparameters(Protocol):
    """The hyperparameters an algorithm may read (``fedvb.config.RunConfig`` has them all)."""

    rho: float
    damping: float
    alpha: float  # 0: 1 / (1 + K rho)
    family: str  # "": the entry's default
    solver: str  # "": the entry's default
    proximal_mu: float
    feddyn_alpha: float
    admm_rho: float
    server_lr: float


@dataclass(frozen=True)
class BayesADMMSpec:
    """One member of the BayesADMM family (the module docstring)."""

    name: str
    summary: str
    section: str  # of docs/algorithms.md
    solver: ClientSolver
    family: Family | None = None  # None: the `family` key chooses (DIAGONAL when empty)
    solvers: tuple[ClientSolver, ...] = (EXACT, LAPLACE, IVON)
    fixed_rho: float | None = None  # None: the `rho` key
    fixed_alpha: float | None = None  # None: the `alpha` key (0: 1 / (1 + K rho))
    point_estimate: bool = False
    site_step: SiteStep = site_update
    function_space: bool = False  # FedLap-Func: the server also fits soft labels on unlabelled inputs
    kind: str = "bayes-admm"

    def family_for(self, hyper: Hyperparameters) -> Family:
        return self.family or family_by_name(hyper.family or "diagonal")

    def preset(
        self,
        *,
        rho: float | None = None,
        damping: float = 1.0,
        alpha: float | None = None,
        family: Family | None = None,
        solver: ClientSolver | str | None = None,
    ) -> Preset:
        """The :class:`~fedvb.core.duality.Preset` of this entry with these hyperparameters (``None``: the
        entry's own, where it fixes one; ``alpha`` ``None`` or 0: ``1 / (1 + K rho)``). ``ValueError`` for a
        value the entry fixes otherwise, or a solver or family it does not allow."""
        for key, given, fixed in (("rho", rho, self.fixed_rho), ("alpha", alpha, self.fixed_alpha)):
            if fixed is not None and given not in (None, fixed):
                raise ValueError(f"{self.name} fixes {key} = {fixed}, got {given}")
        if self.family is not None and family not in (None, self.family):
            raise ValueError(f"{self.name} has the {self.family.name} family, got {family.name}")
        if rho is None and self.fixed_rho is None:
            raise ValueError(f"{self.name} needs rho")
        return Preset(
            self.name, family or self.family or DIAGONAL, self.fixed_rho or rho, damping,
            self.fixed_alpha or alpha or default_alpha, self.site_step,
            self.solver_named(getattr(solver, "name", solver) or ""),
            self.point_estimate,
        )  # fmt: skip

    def preset_for(self, hyper: Hyperparameters) -> Preset:
        """The preset a run configuration (``rho``, ``damping``, ``alpha``, ``family``, ``solver`` keys) asks for."""
        rho = None if self.fixed_rho is not None else hyper.rho
        alpha = None if self.fixed_alpha is not None else hyper.alpha
        family = None if self.family is not None else self.family_for(hyper)
        return self.preset(rho=rho, damping=hyper.damping, alpha=alpha, family=family, solver=hyper.solver)

    def solver_named(self, name: str) -> ClientSolver:
        """The client solver ``name`` ("" for the default), or ValueError naming the allowed ones."""
        if not name:
            return self.solver
        allowed = [s.name for s in self.solvers]
        if name not in allowed:
            raise ValueError(f"{self.name} allows the solvers {', '.join(allowed)}, not {name!r}")
        return SOLVERS[name]

    @property
    def keys(self) -> tuple[str, ...]:
        """The configuration keys this entry reads beyond the whole family's (prior, damping, ...)."""
        keys = [k for k, free in (("rho", self.fixed_rho is None), ("alpha", self.fixed_alpha is None),
                                  ("family", self.family is None)) if free]  # fmt: skip
        if self.function_space:
            keys += ["func_inputs", "func_weight", "func_steps", "func_lr"]
        if not self.point_estimate:
            keys.append("eval_samples")  # a posterior worth sampling for predictions
        return tuple(keys)


@dataclass(frozen=True)
class BaselineSpec:
    """A point-estimate baseline from its paper (docs/algorithms.md §7)."""

    name: str
    summary: str
    section: str
    build: Callable[[Hyperparameters], Algorithm]
    keys: tuple[str, ...] = ()
    kind: str = "baseline"


_ENTRIES: tuple[BayesADMMSpec | BaselineSpec, ...] = (
    BaselineSpec("fedavg", "FedAvg (McMahan et al. 2017): example-weighted average of local models", "§7",
                 lambda h: FedAvg()),
    BaselineSpec("fedprox",
                 "FedProx (Li et al. 2020): local proximal term, mu/2 times the squared distance to w_bar", "§7",
                 lambda h: FedProx(h.proximal_mu), ("proximal_mu",)),
    BaselineSpec("feddyn", "FedDyn (Acar et al. 2021): dynamic regulariser, server correction h", "§7",
                 lambda h: FedDyn(h.feddyn_alpha), ("feddyn_alpha",)),
    BaselineSpec("fedadmm", "FedADMM (Gong et al. 2022): primal-dual clients, server step on augmented models",
                 "§7", lambda h: FedADMM(h.admm_rho, h.server_lr), ("admm_rho", "server_lr")),
    BaselineSpec("scaffold", "SCAFFOLD (Karimireddy et al. 2020), option II control variates", "§7",
                 lambda h: Scaffold(h.server_lr), ("server_lr",)),
    BayesADMMSpec("fedlap", "FedLap: isotropic fixed precision, MAP clients, site-sum server", "§5", LAPLACE,
                  ISOTROPIC, (EXACT, LAPLACE), fixed_rho=1.0, fixed_alpha=1.0, point_estimate=True),
    BayesADMMSpec("fedlap-cov", "FedLap-Cov: diagonal Laplace clients (diagonal GGN), site-sum server", "§5",
                  LAPLACE, DIAGONAL, (EXACT, LAPLACE), fixed_rho=1.0, fixed_alpha=1.0),
    BayesADMMSpec("fedlap-kfac", "FedLap-KFAC: FedLap-Cov with Kronecker-factored (K-FAC) Laplace clients per layer",
                  "§10", LAPLACE, KRONECKER, (EXACT, LAPLACE), fixed_rho=1.0, fixed_alpha=1.0),
    BayesADMMSpec("fedlap-func", "FedLap-Func: FedLap plus a function-space fit to clients' soft labels", "§5",
                  LAPLACE, ISOTROPIC, (LAPLACE,), fixed_rho=1.0, fixed_alpha=1.0, point_estimate=True,
                  function_space=True),
    BayesADMMSpec("ivon-admm", "IVON-ADMM: diagonal BayesADMM with IVON clients", "§4", IVON, DIAGONAL, (IVON,)),
    BayesADMMSpec("bayes-admm-newton", "BayesADMM, Newton-like: dense family, exact / Newton clients", "§3",
                  EXACT, DENSE, (EXACT,)),
    BayesADMMSpec("pvi", "Partitioned VI as the BayesADMM paper runs it: IVON clients, alpha = 1, KL weight 1",
                  "§6", IVON, None, fixed_rho=1.0, fixed_alpha=1.0),
    BayesADMMSpec("bayes-admm", "BayesADMM over any family and client solver", "§2", LAPLACE, None),
    BayesADMMSpec("federated-admm", "Federated ADMM: isotropic point estimates (alpha = 1: Tseng's AMA)", "§6",
                  LAPLACE, ISOTROPIC, (EXACT, LAPLACE), point_estimate=True),
    BayesADMMSpec("bregman-admm", "Bregman ADMM: the dual step in expectation parameters", "§6", LAPLACE, None,
                  site_step=bregman_site_update),
)  # fmt: skip

ALGORITHMS: dict[str, BayesADMMSpec | BaselineSpec] = {entry.name: entry for entry in _ENTRIES}
BAYES_ADMM = tuple(name for name, entry in ALGORITHMS.items() if isinstance(entry, BayesADMMSpec))
BASELINES = tuple(name for name, entry in ALGORITHMS.items() if isinstance(entry, BaselineSpec))


def preset(name: str, **hyperparameters: Any) -> Preset:
    """The BayesADMM preset ``name`` with explicit hyperparameters (:meth:`BayesADMMSpec.preset`: ``rho``,
    ``damping``, ``alpha``, ``family``, ``solver``), as the tests, simulations and a user's own loop build
    one; ``ValueError`` naming the allowed names for another name."""
    entry = ALGORITHMS.get(name)
    if not isinstance(entry, BayesADMMSpec):
        raise ValueError(f"preset: unknown {name!r}; allowed: {', '.join(BAYES_ADMM)}")
    return entry.preset(**hyperparameters)


# Each strategy's default hyperparameters: the keys a run configuration leaves at 0 ("" for text) take these
# (fedvb.config resolves them; `fedvb run --help` prints this table). They are the papers' closest setting;
# docs/algorithms.md §11 says which, and what was changed so that a default run learns on fedvb's standardised
# inputs. A key a strategy does not name takes the common value.
ONE_OVER_K = "1/K"  # a damping of one over the number of clients (P1's 0.1 at K = 10, 0.01 at K = 100)
_ADAM = {"lr": 1e-3, "local_epochs": 10, "batch_size": 64}  # the papers' Adam baselines (MNIST, FMNIST)
# A site-sum server (alpha = 1: the prior plus the sites) anchored at the initialisation in round 1 would
# lose it (the sites hold only the clients' moves from it, and an MLP's hidden units come out near
# symmetric): these strategies anchor round 1 at the prior, as the papers' code, with sites damped by 1/K
# (round 1's server mean is then the clients' average).
_SITE_SUM = {**_ADAM, "damping": ONE_OVER_K, "round_one_anchor": "prior"}
_IVON = {  # the papers' IVON-ADMM on Fashion-MNIST heterogeneous, lr scaled for standardised inputs
    "lr": 2e-4, "local_epochs": 10, "batch_size": 32, "ivon_hess_init": 1e-3, "ivon_beta2": 0.9998,
    "temperature": 1e-3, "damping": 1e-3, "rho": 0.2,
}  # fmt: skip
COMMON_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "local_epochs": 10, "batch_size": 64, "optimizer": "adam", "prior_precision": 1.0, "rho": 1.0,
    "damping": 1.0, "temperature": 1.0, "ivon_hess_init": 0.1, "ivon_beta2": 0.99995, "lr_schedule": "constant",
    "round_one_anchor": "init",
}  # fmt: skip
DEFAULTS: dict[str, dict[str, Any]] = {
    "fedavg": _ADAM,
    "fedprox": _ADAM,
    "feddyn": _ADAM,
    "fedadmm": _ADAM,
    "scaffold": {**_ADAM, "lr": 0.5},  # plain SGD steps (its control variates assume them)
    "fedlap": _SITE_SUM,
    "fedlap-cov": _SITE_SUM,
    "fedlap-kfac": _SITE_SUM,
    "fedlap-func": _SITE_SUM,
    "ivon-admm": _IVON,
    # exact solves; undamped, a softmax likelihood's round-2 cavity is indefinite (exactness: damping 1 on quadratics)
    "bayes-admm-newton": {"damping": 0.5},
    # rho fixed at 1 (KL weight 1): temperature tau rho of IVON-ADMM's row keeps its clients' IVON effective sample
    # size N / (tau rho); at IVON-ADMM's 1e-3 a PVI client's posterior is 5 times wider and CIFAR-10 stays near 0.18
    "pvi": {
        **_IVON,
        "rho": 1.0,
        "temperature": _IVON["temperature"] * _IVON["rho"],
        "damping": ONE_OVER_K,
        "round_one_anchor": "prior",
    },
    "bayes-admm": {**_ADAM, "damping": 0.1},
    "federated-admm": {**_ADAM, "damping": 0.1},
    "bregman-admm": {**_ADAM, "damping": 0.2},  # P2: "diverged if larger"
}


# Where a built-in dataset's own setting differs from the image sets' for some strategies: dataset -> strategy ->
# keys, taken before the strategy's row (docs/algorithms.md §11 says why each is there).
_FEDPROX_PAPER = {"lr": 1e-2, "local_epochs": 20, "batch_size": 10}  # FedProx's synthetic(1, 1) setting (SGD there)
DATASET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # Adam at 1e-3 moves a softmax regression from zero about 0.02 a round on 44-158-row clients: these stay on one
    # class for 20 rounds (FedLap-Cov, FedLap-KFAC, FedLap-Func, the IVON and curvature strategies learn at theirs;
    # at 1e-2 FedLap-KFAC and FedLap-Func swing back towards chance)
    "fedprox-synthetic": dict.fromkeys(("fedavg", "fedprox", "feddyn", "fedadmm", "fedlap", "federated-admm"),
                                       _FEDPROX_PAPER),
    # SCAFFOLD's plain SGD at 0.5 is past the least-squares stability bound 2 / L of this regression
    "synthetic-linear": {"scaffold": {"lr": 0.05}},
}  # fmt: skip


def default_value(strategy: str, key: str, num_clients: int, dataset: str = "") -> Any:
    """What ``key`` is for ``strategy`` on ``dataset`` with ``num_clients`` clients when a configuration leaves it
    at its "per strategy" value: the dataset's row for the strategy (:data:`DATASET_DEFAULTS`), else the
    strategy's (:data:`DEFAULTS`), else the common value."""
    dataset_row = DATASET_DEFAULTS.get(dataset, {}).get(strategy, {})
    value = dataset_row.get(key, DEFAULTS[strategy].get(key, COMMON_DEFAULTS[key]))
    return 1.0 / num_clients if value == ONE_OVER_K else value
