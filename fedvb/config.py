"""The run configuration: one typed, validated object from TOML plus ``key=value`` overrides.

Every key, its type, default and meaning is in :data:`FIELDS`; ``fedvb run
--help`` prints that table.  Validation happens before any training and
raises :class:`ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedvb.core import client_solvers, gaussian, registry
from fedvb.core.algorithms import ROUND_ONE_ANCHORS
from fedvb.core.registry import ALGORITHMS, BASELINES, BAYES_ADMM, COMMON_DEFAULTS, DEFAULTS, default_value
from fedvb.core.robust import COMBINATIONS
from fedvb.core.trainers import CURVATURES, LR_SCHEDULES, OPTIMIZER_STATES

CLIENT_STREAMS = ("independent", "shared")

__all__ = [
    "STRATEGIES",
    "ConfigError",
    "RunConfig",
    "algorithm_rows",
    "describe_algorithms",
    "describe_defaults",
    "describe_fields",
]

STRATEGIES = tuple(ALGORITHMS)  # the registry's order (fedvb.core.registry)
BACKENDS = ("inprocess", "ray")
OPTIMIZERS = ("", "adam", "sgd")  # "": the strategy's default
SOLVERS = ("", *client_solvers.SOLVERS)  # "": the strategy's own
FAMILIES = ("", *gaussian.FAMILIES)
IVON_KERNELS = ("auto", "torch", "native")
ENGINES = ("loop", "vectorised")
LOGGERS = ("", "tensorboard")
EVAL_CLIENTS_AUTO = 100  # eval_clients = -1: past this many clients a sample, so evaluation follows the cohort
# the client solver of each BayesADMM preset when the solver key is left empty
DEFAULT_SOLVER = {name: ALGORITHMS[name].solver.name for name in BAYES_ADMM}
# the models a user's own --data may name: linear (a regression), or a classifier (logreg is softmax regression)
DATA_MODELS = ("linear", "logreg", "mlp", "zenke-cnn", "acar-cnn", "resnet20")
PROVENANCE = "provenance"  # the table of a saved config.toml that records what produced the run
# The keys whose default is the strategy's own (fedvb.core.registry.DEFAULTS), and the value that asks for it:
# 0 ("" for text; -1 for ivon_hess_init, where 0 is a setting the papers use).
PER_STRATEGY: dict[str, Any] = {key: -1.0 if key == "ivon_hess_init" else type(value)() for key, value in
                                COMMON_DEFAULTS.items()}  # fmt: skip


class ConfigError(ValueError):
    """Invalid configuration: ``field`` names the offending key."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _meta(help_text: str, **checks) -> dict:
    return {"help": help_text, **checks}


@dataclass
class RunConfig:
    """One experiment. Defaults give the README's headline comparison on digits."""

    strategy: str = field(default="ivon-admm", metadata=_meta("algorithm", choices=STRATEGIES))
    dataset: str = field(default="digits", metadata=_meta("named dataset (see fedvb.data.DATASETS)"))
    data: str = field(
        default="", metadata=_meta("bring-your-own .npz (x (N, d) or (N, C, H, W), y, client[, x_test, y_test])")
    )
    model: str = field(
        default="",
        metadata=_meta("model name; default: mlp for images, the linear model (softmax for classes, linear for a "
                       "regression) for tables and for an exact client solver"),
    )  # fmt: skip
    num_clients: int = field(default=10, metadata=_meta("number of clients K", min=1))
    rounds: int = field(default=10, metadata=_meta("communication rounds R", min=1))
    seed: int = field(default=0, metadata=_meta("seed of data split, init and every random stream", min=0))
    backend: str = field(default="inprocess", metadata=_meta("where clients run", choices=BACKENDS))
    ray_address: str = field(default="", metadata=_meta("attach the ray backend to a running Ray cluster"))
    workers: int = field(
        default=0,
        metadata=_meta("inprocess: worker processes running a round's clients, one torch thread each; 0: one per "
                       "CPU core (one on a GPU), 1: in the server's process", min=0),
    )  # fmt: skip
    out: str = field(default="runs/latest", metadata=_meta("run folder"))
    data_dir: str = field(default="", metadata=_meta("where dataset files are looked for first"))
    preprocessing: str = field(default="standardize", metadata=_meta("input scaling", choices=("standardize", "raw")))
    data_fraction: float = field(
        default=1.0, metadata=_meta("fraction of the training set used (papers: 0.1)", gt=0, max=1)
    )
    partition: str = field(
        default="auto",
        metadata=_meta("split over clients: auto = the data's own clients where it has them, else papers-dirichlet; "
                       "or one of fedvb.data.SCHEMES"),
    )  # fmt: skip
    partition_alpha: float = field(
        default=0.0,
        metadata=_meta("Dirichlet concentration of dirichlet, inner-dirichlet and papers-dirichlet (its class mix); "
                       "0: the scheme's default, 0.5", ge=0),
    )  # fmt: skip
    class_counts: str = field(
        default="",
        metadata=_meta("partition class-counts: each client's rows of each class, classes separated by ';', clients "
                       "by ',', N*R for N repeated R times (the papers' UCI Credit homogeneous split: '28*10; "
                       "23*3,24*7')"),
    )  # fmt: skip
    local_test_fraction: float = field(
        default=-1.0,
        metadata=_meta("share of each client's rows kept as its local test split; -1: 0.2 for named datasets, "
                       "0 for --data (your own data is trained in full)", ge=-1, lt=1),
    )  # fmt: skip
    fraction_train: float = field(default=1.0, metadata=_meta("fraction of clients per round", gt=0, max=1))
    prior_precision: float = field(default=0.0, metadata=_meta("delta: prior N(0, 1/delta I)", gt=0))
    rho: float = field(default=0.0, metadata=_meta("KL weight / ADMM penalty of BayesADMM presets", gt=0))
    damping: float = field(default=0.0, metadata=_meta("gamma: dual step damping", gt=0, max=1))
    alpha: float = field(default=0.0, metadata=_meta("server mixing; 0 means 1/(1 + K rho)", ge=0, max=1))
    temperature: float = field(default=0.0, metadata=_meta("tau: likelihood temperature", gt=0))
    family: str = field(
        default="",
        metadata=_meta("Gaussian family of pvi, bayes-admm and bregman-admm; default diagonal", choices=FAMILIES),
    )
    solver: str = field(default="", metadata=_meta("client solver of BayesADMM presets", choices=SOLVERS))
    precision_floor: float = field(default=0.0, metadata=_meta("lower bound on server precision; 0: none", ge=0))
    round_one_anchor: str = field(
        default="",
        metadata=_meta("BayesADMM presets: round 1's clients are anchored at init (the model's initialisation, "
                       "where the server starts) or prior (the prior mean 0, training still from the "
                       "initialisation: the papers' code)", choices=("", *ROUND_ONE_ANCHORS)),
    )  # fmt: skip
    local_epochs: int = field(default=0, metadata=_meta("local epochs per round", min=1))
    lr: float = field(default=0.0, metadata=_meta("local learning rate (IVON: Newton step size)", gt=0))
    lr_schedule: str = field(
        default="",
        metadata=_meta("local learning rate over rounds: cosine = lr (1 + cos(pi (r-1) / rounds)) / 2 in round r, "
                       "as the papers' code", choices=("", *LR_SCHEDULES)),
    )  # fmt: skip
    batch_size: int = field(default=0, metadata=_meta("local minibatch size", min=1))
    optimizer: str = field(default="", metadata=_meta("MAP optimizer", choices=OPTIMIZERS))
    weight_decay: float = field(
        default=0.0,
        metadata=_meta("MAP clients: the optimizer's L2 weight decay (torch's weight_decay; the papers' code gives "
                       "FedDyn's Adam its local prior precision here); 0: none", ge=0),
    )  # fmt: skip
    grad_clip: float = field(
        default=0.0,
        metadata=_meta("MAP clients: each step's gradient clipped to this norm (the papers' CIFAR-10 Acar-CNN "
                       "baselines use 10); 0: none", ge=0),
    )  # fmt: skip
    optimizer_state: str = field(
        default="fresh",
        metadata=_meta("MAP clients' Adam each round: fresh (a new one, the textbook) or kept (its moments and step "
                       "count carried in the client's state from its last round, as the papers' code)",
                       choices=OPTIMIZER_STATES),
    )  # fmt: skip
    client_streams: str = field(
        default="independent",
        metadata=_meta("each client's random stream each round (minibatch order, IVON's weight noise): independent "
                       "(one per run, round and client) or shared (the run seed's stream for every client in every "
                       "round, as the papers' code reseeds each client's training with the run seed)",
                       choices=CLIENT_STREAMS),
    )  # fmt: skip
    hidden: str = field(default="200,100", metadata=_meta("MLP hidden sizes, comma-separated"))
    activation: str = field(default="sigmoid", metadata=_meta("MLP activation (sigmoid, relu, tanh, gelu)"))
    proximal_mu: float = field(default=0.01, metadata=_meta("FedProx mu", ge=0))
    feddyn_alpha: float = field(default=0.01, metadata=_meta("FedDyn alpha", gt=0))
    admm_rho: float = field(default=0.01, metadata=_meta("FedADMM penalty rho", gt=0))
    server_lr: float = field(default=1.0, metadata=_meta("FedADMM / SCAFFOLD server step", gt=0))
    func_inputs: int = field(
        default=0,
        metadata=_meta("fedlap-func: unlabelled inputs held out for the server; 0: 256, or a tenth of the training "
                       "rows where that is fewer", min=0),
    )  # fmt: skip
    func_weight: float = field(default=1.0, metadata=_meta("fedlap-func: weight beta of the function-space term", ge=0))
    func_steps: int = field(
        default=50, metadata=_meta("fedlap-func: at most this many L-BFGS iterations of the server fit a round", min=0)
    )
    func_lr: float = field(
        default=1.0,
        metadata=_meta("fedlap-func: the server fit's L-BFGS step scale (1: the line search's own step; the fit was "
                       "Adam at 1e-3 before 2026-12-07, docs/algorithms.md §5)", gt=0),
    )  # fmt: skip
    ivon_hess_init: float = field(default=-1.0, metadata=_meta("IVON initial h", ge=0))
    ivon_beta2: float = field(default=0.0, metadata=_meta("IVON beta2", gt=0, lt=1))
    ivon_mc_samples: int = field(default=1, metadata=_meta("IVON Monte Carlo samples per step", min=1))
    ivon_clip_radius: float = field(
        default=0.0,
        metadata=_meta("IVON: each coordinate's preconditioned step clipped to this size before the learning rate "
                       "(the IVON library's clip_radius; the papers' runs use none); 0: none", ge=0),
    )  # fmt: skip
    ivon_kernel: str = field(
        default="auto",
        metadata=_meta("IVON on CPU: auto (native if a C compiler builds it), torch, native", choices=IVON_KERNELS),
    )
    curvature: str = field(
        default="exact",
        metadata=_meta("diagonal GGN of Laplace clients (fedlap-cov, bayes-admm): exact, or mc (one label drawn "
                       "per example from the model: one backward pass, unbiased)", choices=CURVATURES),
    )  # fmt: skip
    eval_samples: int = field(default=32, metadata=_meta("posterior-predictive samples at evaluation", min=0))
    eval_every: int = field(
        default=1, metadata=_meta("evaluate the server model every this many rounds (and after the last)", min=1)
    )
    predictive_every: int = field(
        default=1,
        metadata=_meta("add the predictive (eval_samples draws) to evaluated rounds that are multiples of this "
                       "(and to the last)", min=1),
    )  # fmt: skip
    eval_clients: int = field(
        default=-1,
        metadata=_meta("clients whose local test split is scored (a sample drawn once per run); -1: every "
                       f"client up to {EVAL_CLIENTS_AUTO}, else {EVAL_CLIENTS_AUTO}; 0: every client", min=-1),
    )  # fmt: skip
    engine: str = field(
        default="loop",
        metadata=_meta("how a round's clients train: loop (one after another, on the workers or Ray actors), "
                       "vectorised (a cohort at once, stacked weights: fedvb.core.cohort; on Ray a chunk per "
                       "actor)", choices=ENGINES),
    )  # fmt: skip
    cohort_chunk: int = field(
        default=0,
        metadata=_meta("engine = vectorised: clients trained together at most (memory); 0: the cohort", min=0),
    )
    device: str = field(default="cpu", metadata=_meta("cpu, cuda or auto (cuda when available)"))
    client_cpus: float = field(default=1.0, metadata=_meta("ray: CPUs per client", gt=0))
    client_gpus: float = field(default=0.0, metadata=_meta("ray: GPUs per client (fractions share a GPU)", ge=0))
    client_timeout_s: float = field(
        default=0.0,
        metadata=_meta(
            "seconds a client may take from its start (ray: from when an actor starts it); 0: no limit", ge=0
        ),
    )
    min_replies: int = field(default=1, metadata=_meta("accepted replies a round needs, else it is retried", min=1))
    round_retries: int = field(
        default=1, metadata=_meta("retries of a round short of min_replies before the run stops", min=0)
    )
    robust_clip: float = field(
        default=0.0,
        metadata=_meta("bound on one reply's change, in multiples of the cohort's median change (scaled up for "
                       "clients with more examples; fedvb.core.robust); 0: no bound", ge=0),
    )  # fmt: skip
    combine: str = field(
        default="mean",
        metadata=_meta("how the server combines the cohort's replies: mean (the algorithm's own), trimmed "
                       "(coordinate-wise trimmed mean), median (coordinate-wise; fedvb.core.robust)",
                       choices=COMBINATIONS),
    )  # fmt: skip
    combine_trim: float = field(
        default=0.1,
        metadata=_meta("combine = trimmed: fraction of replies dropped at each end per coordinate (at least one "
                       "once 3 replies)", ge=0, lt=0.5),
    )  # fmt: skip
    faults: str = field(default="", metadata=_meta("fault injection, e.g. 'raise=0.1,nan=0.1' (fedvb.faults)"))
    attack: str = field(
        default="", metadata=_meta("crafted replies from chosen clients: 'huge@0', 'takeover@0:once' (fedvb.faults)")
    )
    log: str = field(
        default="", metadata=_meta("extra metrics log: tensorboard (event files in OUT/tensorboard)", choices=LOGGERS)
    )
    target_accuracy: float = field(
        default=0.0, metadata=_meta("summary reports the first round reaching it; 0: none", ge=0, max=1)
    )

    def __post_init__(self) -> None:
        """Keys left at their "per strategy" value (:data:`PER_STRATEGY`) take the strategy's default
        (fedvb.core.registry.DEFAULTS); which ones did is kept, so that a change of strategy re-resolves them
        (:meth:`replace`, :meth:`explicit`). The resolved values are what a run folder's config.toml holds."""
        self._defaulted = tuple(key for key, ask in PER_STRATEGY.items() if getattr(self, key) == ask)
        if self.strategy in DEFAULTS:  # an unknown strategy is validate's to report
            for key in self._defaulted:
                setattr(self, key, default_value(self.strategy, key, max(self.num_clients, 1), self.dataset))

    # -- building --------------------------------------------------------------------
    @classmethod
    def from_sources(cls, toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Defaults, then the TOML file, then ``overrides`` (CLI flags and ``--set``)."""
        values: dict[str, Any] = {}
        if toml_path is not None:
            try:
                with open(toml_path, "rb") as handle:
                    table = tomllib.load(handle)
                provenance = table.pop(PROVENANCE, None)
                values.update(_flatten(table))
                if provenance is not None:
                    values[PROVENANCE] = provenance
            except FileNotFoundError:
                raise ConfigError("config", f"file not found: {toml_path}") from None
            except IsADirectoryError:
                raise ConfigError("config", f"{toml_path} is a directory, not a TOML file") from None
            except tomllib.TOMLDecodeError as error:
                raise ConfigError("config", f"{toml_path} is not valid TOML ({error})") from None
        values.update(overrides or {})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, raw in values.items():
            if key == PROVENANCE:  # what produced a saved run (config.toml), not configuration
                continue
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(key, f"unknown key; allowed: {', '.join(known)}")
            kwargs[name] = _coerce(name, raw, known[name].type)
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f.name, f"must be a finite number, got {value}")
            if "choices" in meta and value not in meta["choices"]:
                allowed = ", ".join(repr(c) for c in meta["choices"])
                raise ConfigError(f.name, f"got {value!r}; allowed: {allowed}")
            for key, test, words in (
                ("min", lambda v, b: v >= b, ">="),
                ("gt", lambda v, b: v > b, ">"),
                ("ge", lambda v, b: v >= b, ">="),
                ("max", lambda v, b: v <= b, "<="),
                ("lt", lambda v, b: v < b, "<"),
            ):
                if key in meta and not test(value, meta[key]):
                    raise ConfigError(f.name, f"must be {words} {meta[key]}, got {value}")
        from fedvb.data import DATASETS, SCHEMES
        from fedvb.models import ACTIVATIONS, MODELS

        if not self.data and self.dataset not in DATASETS:
            raise ConfigError("dataset", f"got {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.data and self.model not in DATA_MODELS:
            raise ConfigError("model", f"--data needs --model linear (a regression) or a classifier: "
                                       f"{', '.join(DATA_MODELS[1:])}; got {self.model!r}")  # fmt: skip
        if self.model and not self.data and self.model not in MODELS:
            raise ConfigError("model", f"got {self.model!r}; allowed: {', '.join(MODELS)}")
        if self.partition not in ("auto", *SCHEMES):
            raise ConfigError("partition", f"got {self.partition!r}; allowed: auto, {', '.join(SCHEMES)}")
        if -1 < self.local_test_fraction < 0:
            raise ConfigError(
                "local_test_fraction", f"must be -1 (automatic) or in [0, 1), got {self.local_test_fraction}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError("activation", f"got {self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        try:
            sizes = self.hidden_sizes
        except ValueError:
            sizes = []
        if not sizes or any(s < 1 for s in sizes):
            raise ConfigError("hidden", f"comma-separated positive integers, got {self.hidden!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError("device", f"got {self.device!r}; allowed: cpu, cuda, cuda:N, auto")
        self._validate_algorithm()
        self._validate_engine()
        participants = max(1, int(round(self.fraction_train * self.num_clients)))
        if self.min_replies > participants:
            raise ConfigError(
                "min_replies", f"must be <= the {participants} clients sampled per round, got {self.min_replies}"
            )
        if self.log == "tensorboard":
            from fedvb.servers.tensorboard import tensorboard_missing

            if tensorboard_missing():
                raise ConfigError("log", tensorboard_missing())
        self._validate_faults()

    def _validate_algorithm(self) -> None:
        """The solver, family and combine keys against the strategy's registry entry (fedvb.core.registry)."""
        entry = ALGORITHMS[self.strategy]
        if entry.kind != "bayes-admm":
            return
        family = entry.family_for(self)
        if self.combine != "mean" and not family.coordinatewise:
            raise ConfigError(
                "combine", f"{self.combine} combines precisions entry by entry, which need not keep a {family.name} "
                f"one positive definite; allowed with a {family.name} family: 'mean'"
            )  # fmt: skip
        try:
            solver = entry.solver_named(self.solver)
        except ValueError as error:
            raise ConfigError("solver", str(error)) from None
        if self.family and entry.family is not None:
            free = ", ".join(n for n in BAYES_ADMM if ALGORITHMS[n].family is None)
            raise ConfigError("family", f"{self.strategy} has the {entry.family.name} family; the key chooses the "
                              f"family of {free}")  # fmt: skip
        problem = solver.supports(family)
        if problem is not None:
            raise ConfigError("solver", f"{solver.name} cannot serve the {family.name} family ({problem})")

    def _validate_engine(self) -> None:
        """The vectorised engine trains a cohort (a chunk of it on each Ray actor) in one step: no per-client
        deadline."""
        if self.engine != "vectorised":
            return
        if self.client_timeout_s > 0:
            raise ConfigError("engine", "vectorised trains a cohort in one step, so no client has a deadline of its "
                                        "own; allowed with client_timeout_s > 0: 'loop'")  # fmt: skip

    def _validate_faults(self) -> None:
        from fedvb.faults import parse_attack, parse_faults

        try:
            faults = parse_faults(self.faults)
        except ValueError as error:
            raise ConfigError("faults", str(error)) from None
        try:
            _, attackers, _ = parse_attack(self.attack)
        except ValueError as error:
            raise ConfigError("attack", str(error)) from None
        if attackers and max(attackers) >= self.num_clients:
            raise ConfigError("attack", f"clients must be < num_clients ({self.num_clients}), got {self.attack!r}")
        if faults.get("timeout") and self.client_timeout_s <= 0:
            raise ConfigError("faults", "timeout faults need client_timeout_s > 0")
        if faults.get("negative-precision") and self.strategy in BASELINES:
            raise ConfigError(
                "faults", f"negative-precision needs a strategy that sends a precision, not {self.strategy}"
            )

    # -- derived -----------------------------------------------------------------------
    @property
    def local_test_share(self) -> float:
        """The share of each client's rows held out as its local test split (resolving -1)."""
        if self.local_test_fraction >= 0:
            return self.local_test_fraction
        return 0.0 if self.data else 0.2

    @property
    def eval_client_count(self) -> int:
        """How many clients' local test splits are scored (resolving -1 and 0)."""
        if self.eval_clients == 0 or (self.eval_clients < 0 and self.num_clients <= EVAL_CLIENTS_AUTO):
            return self.num_clients
        return min(self.num_clients, EVAL_CLIENTS_AUTO if self.eval_clients < 0 else self.eval_clients)

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` ends with the server model scored on the test set."""
        return server_round % self.eval_every == 0 or server_round == self.rounds

    def predicts(self, server_round: int) -> bool:
        """Whether an evaluated ``server_round`` adds the Monte Carlo predictive."""
        return (self.evaluates(server_round) and server_round % self.predictive_every == 0) or (
            server_round == self.rounds
        )

    @property
    def hidden_sizes(self) -> list[int]:
        return [int(s) for s in self.hidden.split(",") if s.strip()]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def explicit(self) -> dict[str, Any]:
        """The keys as given: those the strategy's defaults filled are back at their "per strategy" value, so
        that the same settings under another strategy take that strategy's defaults."""
        return {**self.as_dict(), **{key: PER_STRATEGY[key] for key in self._defaulted}}

    def to_toml(self, provenance: dict[str, str] | None = None) -> str:
        """The configuration as TOML; ``provenance`` (versions, commit) goes in a ``[provenance]`` table,
        which :meth:`from_sources` skips."""
        import tomli_w

        return tomli_w.dumps({**self.as_dict(), **({PROVENANCE: provenance} if provenance else {})})

    def replace(self, **changes) -> RunConfig:
        """This configuration with ``changes``; a new strategy, dataset or client count takes its own defaults
        where this one's were used."""
        resolved_by = ("strategy", "dataset", "num_clients")  # what the defaults depend on (damping 1/K)
        moved = any(changes.get(key, getattr(self, key)) != getattr(self, key) for key in resolved_by)
        values = self.explicit() if moved else self.as_dict()
        new = RunConfig(**{**values, **changes})
        new.validate()
        return new


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables become flat keys (``[ivon] beta2`` is ``ivon_beta2``)."""
    flat = {}
    for key, value in table.items():
        name = f"{prefix}_{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _coerce(name: str, raw: Any, kind: Any) -> Any:
    """Strings from ``--set key=value`` (and numbers from TOML) into the field's type."""
    kind = {"str": str, "int": int, "float": float}.get(kind, kind) if isinstance(kind, str) else kind
    try:
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected {kind.__name__}, got {raw!r}") from None


def _strategies_reading(key: str) -> tuple[str, ...]:
    return tuple(name for name, entry in ALGORITHMS.items() if key in entry.keys)


# Keys that only some strategies read (every other key applies to every strategy), from the registry.
# ``fedvb compare`` names a setting by the keys that differ *and* apply to it.
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    **{key: BAYES_ADMM for key in ("prior_precision", "damping", "temperature", "solver", "precision_floor",
                                   "round_one_anchor")},  # fmt: skip
    **{key: _strategies_reading(key) for key in (
        "rho", "alpha", "family", "proximal_mu", "feddyn_alpha", "admm_rho", "server_lr", "func_inputs",
        "func_weight", "func_steps", "func_lr", "eval_samples")},
}  # fmt: skip
# with the ivon solver
IVON_KEYS = ("ivon_hess_init", "ivon_beta2", "ivon_mc_samples", "ivon_clip_radius", "ivon_kernel")
LOCAL_TRAINING_KEYS = ("local_epochs", "lr", "batch_size")  # all but the exact solver
MAP_KEYS = ("optimizer", "weight_decay", "grad_clip", "optimizer_state")  # baselines and the laplace solver


def applies(key: str, config: dict[str, Any]) -> bool:
    """Whether ``key`` changes what the run of ``config`` (a configuration as a mapping) computes."""
    strategy = config.get("strategy", "")
    solver = (config.get("solver") or DEFAULT_SOLVER.get(strategy, "")) if strategy in BAYES_ADMM else "map"
    if key in STRATEGY_KEYS:
        return strategy in STRATEGY_KEYS[key]
    if key in IVON_KEYS:
        return solver == "ivon"
    if key in LOCAL_TRAINING_KEYS:
        return solver != "exact"
    if key in MAP_KEYS:
        return solver in ("map", "laplace")
    return True


def at_strategy_default(key: str, config: dict[str, Any]) -> bool:
    """Whether ``key`` of ``config`` (a configuration as a mapping) holds its strategy's own default
    (fedvb.core.registry.DEFAULTS): ``fedvb compare`` does not name a setting by it."""
    strategy = config.get("strategy")
    if key not in PER_STRATEGY or strategy not in DEFAULTS:
        return False
    num_clients = max(int(config.get("num_clients", 1)), 1)
    return config.get(key) == default_value(strategy, key, num_clients, str(config.get("dataset", "")))


def algorithm_rows() -> list[tuple[str, str, str, str, str]]:
    """``(strategy, family, client solver, what it is, docs/algorithms.md section)`` per registry entry: the
    README's strategy table and ``--help``."""
    rows = []
    for name, entry in ALGORITHMS.items():
        if entry.kind == "bayes-admm":
            family = entry.family.name if entry.family else "any (diagonal)"
            solvers = ", ".join(s.name + (" (default)" if s is entry.solver and len(entry.solvers) > 1 else "")
                                for s in entry.solvers)  # fmt: skip
        else:
            family, solvers = "point estimate", "map"
        rows.append((name, family, solvers, entry.summary, entry.section))
    return rows


def describe_algorithms() -> str:
    """The registry's strategies, one line each, for ``--help``."""
    return "\n".join(f"  {name:18s} {summary} [family {family}; solver {solvers}]"
                     for name, family, solvers, summary, _ in algorithm_rows())  # fmt: skip


def describe_fields() -> str:
    """The configuration keys as a table for ``--help``."""
    lines = []
    for f in fields(RunConfig):
        meta = f.metadata
        extra = f" [{'|'.join(c or '(default)' for c in meta['choices'])}]" if "choices" in meta else ""
        default = f"{f.default!r} (per strategy)" if f.name in PER_STRATEGY else repr(f.default)
        lines.append(f"  {f.name:18s} {default:14s} {meta['help']}{extra}")
    return "\n".join(lines)


def describe_defaults() -> str:
    """Each strategy's defaults for the "per strategy" keys (fedvb.core.registry.DEFAULTS), for ``--help``: one
    line of common values, then what each strategy sets otherwise."""

    def wrapped(head: str, values: dict[str, Any] | str) -> list[str]:
        text = values if isinstance(values, str) else ", ".join(f"{key} {value}" for key, value in values.items())
        indent = f"  {head:18s} "
        return textwrap.wrap(text or "common", 110, initial_indent=indent, subsequent_indent=" " * len(indent),
                             break_on_hyphens=False)  # fmt: skip

    lines = wrapped("common", COMMON_DEFAULTS)
    for strategy in STRATEGIES:
        lines += wrapped(strategy, {k: v for k, v in DEFAULTS[strategy].items() if v != COMMON_DEFAULTS[k]})
    lines.append("  on these datasets, these strategies take instead (fedvb.core.registry.DATASET_DEFAULTS):")
    for dataset, rows in registry.DATASET_DEFAULTS.items():
        for values in dict.fromkeys(tuple(row.items()) for row in rows.values()):  # each distinct row, in order
            names = " ".join(name for name, row in rows.items() if tuple(row.items()) == values)
            lines += wrapped(dataset, dict(values)) + wrapped("", f"for {names}")
    return "\n".join(lines)
