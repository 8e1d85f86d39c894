"""From a :class:`~fedvb.config.RunConfig` to the pieces of a run, the same on every backend.

Data, partitions and the initial model are deterministic functions of the
configuration, so a Ray actor, a ``flwr run`` process and the in-process
backend all rebuild identical clients from the configuration alone (cached
per process).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedvb.config import ConfigError, RunConfig
from fedvb.core.algorithms import Algorithm, BayesADMM, FedLapFunc
from fedvb.core.client_solvers import EXACT
from fedvb.core.gaussian import Gaussian
from fedvb.core.registry import ALGORITHMS, BayesADMMSpec
from fedvb.core.robust import Combination
from fedvb.core.trainers import LocalSettings, TorchTrainer, lr_in_round
from fedvb.data import (
    GENERATED,
    Dataset,
    load_dataset,
    local_test_split,
    parse_class_counts,
    partition_indices,
    plot_label_distribution,
)
from fedvb.metrics import score
from fedvb.models import build_model
from fedvb.workers import SharedData, attach

__all__ = [
    "Prepared",
    "adopt_parts",
    "adopt_prepared",
    "prepared_parts",
    "share_prepared",
    "write_label_distribution",
    "client_generator",
    "evaluate",
    "check_runnable",
    "initial_mean",
    "make_algorithm",
    "make_trainer",
    "partition_sizes",
    "prepare",
    "resolve_device",
    "round_lr",
    "test_predictions",
    "write_partition",
]


@dataclass(frozen=True, eq=False)
class Prepared:
    """The dataset and each client's training rows."""

    dataset: Dataset
    parts: list[np.ndarray]
    model_name: str
    unlabelled: np.ndarray | None = None  # fedlap-func's server inputs, held out of every client
    local_tests: list[np.ndarray] | None = None  # each client's local test rows (of the training set)
    # each client's rows as the scheme assigned them (before the local test split, in the scheme's order),
    # as indices into the dataset's training set as read, before data_fraction or func_inputs took rows out
    assigned: list[np.ndarray] | None = None


DENSE_LIMIT = 4096  # parameters of a dense family's model (P x P float64: 134 MB a matrix)
FUNC_INPUTS = 256  # fedlap-func's default count of held-out server inputs (fewer on small data)


def _key(config: RunConfig) -> str:
    """The configuration keys that decide data and model (cache key)."""
    keys = ("dataset", "data", "model", "num_clients", "seed", "data_dir", "preprocessing", "partition",
            "partition_alpha", "class_counts", "hidden", "activation", "data_fraction",
            "local_test_fraction")  # fmt: skip
    values = {k: getattr(config, k) for k in keys}
    values["linear_model"] = not config.model and _solves_exactly(config)  # the default model is then linear
    # fedlap-func's held-out inputs: the key's count (0: its default), none (-1) for every other strategy
    values["func_inputs"] = config.func_inputs if getattr(ALGORITHMS[config.strategy], "function_space", False) else -1
    if config.data:  # the file's identity too: a rewritten file must not be served from the cache
        try:
            stat = Path(config.data).stat()
            values["data_file"] = [stat.st_ino, stat.st_size, stat.st_mtime_ns]
        except OSError:
            pass  # reading it will say what is wrong
    return json.dumps(values, sort_keys=True)


def _solves_exactly(config: RunConfig) -> bool:
    """Whether the run's client solver is exact (closed form or Newton), which needs a linear model."""
    entry = ALGORITHMS.get(config.strategy)
    if not isinstance(entry, BayesADMMSpec):
        return False
    try:
        return entry.solver_named(config.solver) is EXACT
    except ValueError:
        return False  # validation names the solver


def prepare(config: RunConfig) -> Prepared:
    return _prepared(_key(config))


def _prepared(key: str) -> Prepared:
    adopted = _ADOPTED.get(key)
    return adopted if adopted is not None else _prepare_cached(key)


_ADOPTED: dict[str, Prepared] = {}  # a worker process's run data, prepared by the server (adopt_prepared)


def prepared_parts(config: RunConfig) -> tuple[str, Prepared, dict[str, np.ndarray]]:
    """The run's prepared data in two parts: its arrays, and the rest (a skeleton without them), with the cache
    key that :func:`prepare` looks it up by; what another process adopts (:func:`adopt_parts`)."""
    key = _key(config)
    prepared = _prepare_cached(key)
    dataset = prepared.dataset
    arrays = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(dataset)}
    arrays = {name: value for name, value in arrays.items() if isinstance(value, np.ndarray)}
    if prepared.unlabelled is not None:
        arrays["unlabelled"] = prepared.unlabelled
    without_arrays = dataclasses.replace(dataset, **{name: None for name in arrays if name != "unlabelled"})
    return key, dataclasses.replace(prepared, dataset=without_arrays, unlabelled=None), arrays


def adopt_parts(parts: tuple[str, Prepared, dict[str, np.ndarray]]) -> None:
    """In a worker process or a Ray actor: serve :func:`prepare` for the run of ``parts``
    (:func:`prepared_parts`, its arrays read-only views of memory the server's process or Ray's object store
    holds) instead of loading and partitioning the data again."""
    key, skeleton, arrays = parts
    _ADOPTED.clear()  # one run's data at a time
    arrays = dict(arrays)
    unlabelled = arrays.pop("unlabelled", None)
    if unlabelled is not None:  # torch.as_tensor keeps a view: a copy of its own (a few hundred rows) is writable
        unlabelled = np.array(unlabelled)
    _ADOPTED[key] = dataclasses.replace(skeleton, dataset=dataclasses.replace(skeleton.dataset, **arrays),
                                        unlabelled=unlabelled)  # fmt: skip


def share_prepared(config: RunConfig) -> tuple[SharedData, tuple]:
    """The run's prepared data with its arrays copied into shared memory (close the :class:`SharedData`
    when the run ends), and the payload a worker process adopts it from (:func:`adopt_prepared`)."""
    key, skeleton, arrays = prepared_parts(config)
    shared = SharedData(arrays)
    return shared, (key, skeleton, shared.spec)


def adopt_prepared(payload: tuple) -> None:
    """In a worker process: :func:`adopt_parts` from the server's shared memory (:func:`share_prepared`)."""
    key, skeleton, spec = payload
    _ADOPTED.clear()  # the previous run's views go before its blocks are closed (attach closes unused ones)
    adopt_parts((key, skeleton, attach(spec)))


def _from_key(key: str) -> tuple[RunConfig, int, bool]:
    """The configuration a :func:`_key` stands for, fedlap-func's held-out input count, and whether the default
    model is the linear one."""
    values = json.loads(key)
    held_out = values.pop("func_inputs")
    values.pop("data_file", None)
    linear_model = values.pop("linear_model")
    return RunConfig.from_mapping(values), held_out, linear_model


@functools.lru_cache(maxsize=4)
def _prepare_cached(key: str) -> Prepared:
    config, held_out, linear_model = _from_key(key)
    if config.data:
        dataset = _load_npz(config)
        model_name = {"logreg": "softmax"}.get(config.model, config.model)
    else:
        generated = {"num_clients": config.num_clients} if config.dataset in GENERATED else {}
        dataset = load_dataset(
            config.dataset, data_dir=config.data_dir or None, preprocessing=config.preprocessing, seed=config.seed,
            **generated,
        )  # fmt: skip
        linear = "softmax" if dataset.task == "classification" else "linear"  # tables, and exact solves
        model_name = config.model or ("mlp" if len(dataset.input_shape) == 3 and not linear_model else linear)
    scheme = config.partition
    if scheme == "auto":
        scheme = "natural" if dataset.natural_clients is not None else "papers-dirichlet"
    options = _partition_options(scheme, config.partition_alpha, config.class_counts)
    source = np.arange(len(dataset.y_train))  # each kept training row's index in the dataset as read
    if scheme == "papers-dirichlet":
        options["fraction"] = config.data_fraction  # the reference takes its share per class, inside the split
    elif config.data_fraction < 1.0:
        dataset, source = _subsample(dataset, config.data_fraction, config.seed)
    unlabelled = None
    if held_out == 0:  # the default: at most FUNC_INPUTS, and no more than a tenth of the training rows
        held_out = max(1, min(FUNC_INPUTS, len(dataset.y_train) // 10))
    held_out = max(held_out, 0)
    if held_out >= len(dataset.y_train):
        raise ConfigError(
            "func_inputs", f"must be < the {len(dataset.y_train)} training rows it is held out of, got {held_out}"
        )
    if held_out:  # a held-out slice of the training distribution, labels discarded
        order = np.random.default_rng(np.random.SeedSequence([config.seed, 9])).permutation(len(dataset.y_train))
        unlabelled = dataset.x_train[np.sort(order[:held_out])]
        keep = np.sort(order[held_out:])
        dataset, source = _keep_rows(dataset, keep), source[keep]
    labels = dataset.y_train if dataset.task == "classification" else np.zeros(len(dataset.y_train), dtype=np.int64)
    parts = partition_indices(
        labels, scheme, config.num_clients, seed=config.seed, natural=dataset.natural_clients, **options
    )
    unassigned = [k for k, rows in enumerate(parts) if len(rows) == 0]
    if unassigned and scheme in ("papers-dirichlet", "two-class"):  # the reference split does the same
        raise ConfigError("num_clients", f"partition {scheme!r} gives clients {unassigned} no rows at seed "
                                         f"{config.seed} (as the reference code would); use another seed or fewer "
                                         "clients")  # fmt: skip
    splits = [local_test_split(rows, config.local_test_share, config.seed, k) for k, rows in enumerate(parts)]
    empty = [k for k, (train, _) in enumerate(splits) if len(train) == 0]
    if empty:
        raise ConfigError("num_clients", f"clients {empty} get no data under partition {scheme!r}; use fewer clients")
    assigned = [source[rows] for rows in parts]
    return Prepared(dataset, [t for t, _ in splits], model_name, unlabelled, [t for _, t in splits], assigned)


# The schemes with a Dirichlet concentration, and the option of partition_indices that takes partition_alpha.
ALPHA_OPTION = {"dirichlet": "alpha", "inner-dirichlet": "alpha", "papers-dirichlet": "class_alpha"}


def _partition_options(scheme: str, alpha: float, class_counts: str = "") -> dict:
    """The options of ``partition_indices`` for ``scheme``; ConfigError naming a key given where it does not
    apply (partition_alpha outside the Dirichlet schemes, class_counts outside class-counts) or malformed."""
    if alpha != 0 and scheme not in ALPHA_OPTION:
        raise ConfigError(
            "partition_alpha", f"partition {scheme!r} has no Dirichlet concentration; it applies to "
            f"{', '.join(ALPHA_OPTION)} (leave it 0 otherwise)",
        )  # fmt: skip
    if (scheme == "class-counts") != bool(class_counts.strip()):
        raise ConfigError("class_counts", "is given with partition 'class-counts' and only with it, as counts per "
                                          "class and client like '28*10; 23*3,24*7'")  # fmt: skip
    if class_counts.strip():
        try:
            return {"counts": parse_class_counts(class_counts)}
        except ValueError as error:
            raise ConfigError("class_counts", str(error).removeprefix("class_counts: ")) from None
    return {ALPHA_OPTION[scheme]: alpha} if alpha != 0 else {}


def _subsample(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, np.ndarray]:
    """A seeded random ``fraction`` of the training rows, and which rows they are; test set unchanged.
    (papers-dirichlet takes its fraction per class instead, as the reference does.)"""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    rows = np.sort(rng.permutation(len(dataset.y_train))[: max(1, int(round(fraction * len(dataset.y_train))))])
    return _keep_rows(dataset, rows), rows


def _keep_rows(dataset: Dataset, rows: np.ndarray) -> Dataset:
    natural = None if dataset.natural_clients is None else dataset.natural_clients[rows]
    return dataclasses.replace(
        dataset, x_train=dataset.x_train[rows], y_train=dataset.y_train[rows], natural_clients=natural
    )


def _load_npz(config: RunConfig) -> Dataset:
    """Bring-your-own data: ``x`` (N, d) or images (N, C, H, W), ``y`` (N,), ``client`` (N,) and optionally
    ``x_test``, ``y_test``.
    Read without pickle (object arrays are refused), every array checked before anything trains."""
    try:
        z = np.load(config.data, allow_pickle=False)
    except Exception as error:  # missing, truncated, not a zip, a pickle: one clear line, never a traceback
        raise ConfigError("data", f"cannot read {config.data}: {type(error).__name__}: {error}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ConfigError("data", f"{config.data} is a single .npy array; give an .npz with x, y and client")
    try:
        arrays = _read_arrays(z, config.data)
    except ConfigError:
        raise
    except Exception as error:  # a member that is truncated, compressed badly or holds objects
        raise ConfigError("data", f"cannot read {config.data}: {type(error).__name__}: {error}") from None
    finally:
        z.close()
    return _checked_dataset(config, *arrays)


def _read_arrays(z, path: str) -> tuple[np.ndarray, ...]:
    for key in ("x", "y", "client"):
        if key not in z.files:
            raise ConfigError("data", f"{path} lacks the array {key!r} (has {', '.join(z.files) or 'nothing'})")
    x, y, client = z["x"], z["y"], z["client"]
    x_test = z["x_test"] if "x_test" in z.files else x[:0]
    y_test = z["y_test"] if "y_test" in z.files else y[:0]
    return x, y, client, x_test, y_test


def _checked_dataset(config: RunConfig, x, y, client, x_test, y_test) -> Dataset:
    for name, values in (("x", x), ("y", y), ("client", client), ("x_test", x_test), ("y_test", y_test)):
        if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
                or values.dtype == np.bool_):  # fmt: skip
            raise ConfigError("data", f"{name} must hold real numbers, got dtype {values.dtype}")
    for name, values in (("y", y), ("client", client), ("y_test", y_test)):
        if values.ndim != 1:
            raise ConfigError("data", f"{name} must be one-dimensional, got shape {values.shape}")
    if x.ndim not in (2, 4) or len(y) != len(x) or len(client) != len(x):
        raise ConfigError("data", f"x must be (N, d) or (N, C, H, W) with y and client of length N; got {x.shape}, "
                                  f"{y.shape}, {client.shape}")  # fmt: skip
    if len(x) == 0 or 0 in x.shape[1:]:
        raise ConfigError("data", f"x has no {'rows' if len(x) == 0 else 'columns'} (shape {x.shape})")
    if x_test.shape[1:] != x.shape[1:] or len(y_test) != len(x_test):
        row = ", ".join(str(n) for n in x.shape[1:])
        raise ConfigError(
            "data", f"x_test must be (M, {row}) with y_test of length M; got {x_test.shape}, {y_test.shape}"
        )
    for name, values in (("x", x), ("x_test", x_test), ("y", y), ("y_test", y_test)):
        if np.issubdtype(values.dtype, np.number) and not np.isfinite(values).all():
            raise ConfigError("data", f"{name} has non-finite values")
    classes = 0
    if config.model != "linear":  # a classifier
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ConfigError("data", f"y must hold non-negative integer classes for --model {config.model}")
        classes = int(y.max()) + 1
        if classes > max(2 * len(y), 1000):  # a model of that many outputs would not fit in memory
            raise ConfigError("data", f"y's largest class is {classes - 1}, far beyond its {len(y)} rows: "
                                      "classes must be numbered 0..C-1")  # fmt: skip
        if len(y_test) and (not np.issubdtype(y_test.dtype, np.integer) or y_test.min() < 0 or y_test.max() >= classes):
            raise ConfigError("data", f"y_test must hold integer classes in 0..{classes - 1} (the classes of y)")
        y, y_test = y.astype(np.int64), y_test.astype(np.int64)
    # float64 data stays float64 (the model is then built in float64, and the exact solvers stay exact to
    # float64 precision); anything else becomes float32
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    if config.model == "linear":
        y, y_test = y.astype(dtype), y_test.astype(dtype)
    ids = np.unique(client)
    remap = {c: k for k, c in enumerate(ids)}
    natural = np.asarray([remap[c] for c in client])
    if len(ids) != config.num_clients:
        raise ConfigError("num_clients", f"{config.data} has {len(ids)} clients in 'client', got {config.num_clients}")
    return Dataset("npz", x.astype(dtype), y, x_test.astype(dtype), y_test, classes, natural_clients=natural)


def resolve_device(config: RunConfig) -> torch.device:
    """The one place the device is chosen: ``auto`` takes the GPU Ray (or the user) made visible."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def write_partition(config: RunConfig, path: str | Path, *, overwrite: bool = False) -> list[int]:
    """Write the split of ``config`` to ``path`` (.npz, no training): ``client_0`` ... ``client_{K-1}``, each
    the int64 rows of the dataset's training set (as read) that the scheme gave that client, in the
    scheme's order and before the local test split, and ``config``, the configuration as TOML text.
    Written atomically; returns the client sizes."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError("out", f"the split is written as an .npz file; got {str(path)!r}")
    if path.is_dir():
        raise ConfigError("out", f"{path} is a directory; give a file name ending in .npz")
    if not path.parent.is_dir():
        raise ConfigError("out", f"{path.parent} is not a directory")
    if path.exists() and not overwrite:
        raise ConfigError("out", f"{path} exists; pass --overwrite to replace it")
    assigned = prepare(config).assigned
    arrays = {f"client_{k}": rows.astype(np.int64) for k, rows in enumerate(assigned)}
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, config=np.array(config.to_toml()), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConfigError("out", f"cannot write {path}: {error.strerror or error}") from None
    temporary.replace(path)
    return [len(rows) for rows in assigned]


def check_runnable(config: RunConfig) -> None:
    """Everything short of training, before anything is written: the data loads and splits, the device
    exists, the algorithm builds, and the model takes the data (a forward pass on one example)."""
    prepared = prepare(config)
    if config.device.startswith("cuda") and config.backend == "inprocess" and config.client_gpus == 0:
        index = int(config.device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError("device", f"{config.device} asked for, but this machine has {count} CUDA devices; "
                                        "allowed here: cpu, auto")  # fmt: skip
    make_algorithm(config)
    model = build_run_model(config, prepared)
    example = torch.as_tensor(prepared.dataset.x_train[:1])
    try:
        with torch.no_grad():
            out = model(example)
    except (RuntimeError, ValueError, IndexError) as error:
        raise ConfigError("model", f"{prepared.model_name} cannot take this data's inputs of shape "
                                   f"{tuple(example.shape[1:])} ({str(error).splitlines()[0]})") from None  # fmt: skip
    expected = prepared.dataset.num_classes or 1
    if out.reshape(1, -1).shape[1] != expected:
        raise ConfigError("model", f"{prepared.model_name} gives {out.reshape(1, -1).shape[1]} outputs; the data "
                                   f"needs {expected}")  # fmt: skip
    _check_dense_fits(config, sum(p.numel() for p in model.parameters()))


def _check_dense_fits(config: RunConfig, size: int) -> None:
    """A dense family keeps a P x P precision for the server and for each client's site, and every client step
    solves with one (Newton: one per iteration, the Hessian built from every example): past DENSE_LIMIT
    parameters that is gigabytes and minutes a client, so such a run is refused before anything is written."""
    entry = ALGORITHMS[config.strategy]
    if isinstance(entry, BayesADMMSpec) and entry.family_for(config).name == "dense" and size > DENSE_LIMIT:
        raise ConfigError("model", f"the dense family keeps and solves with a P x P precision per client: at most "
                                   f"{DENSE_LIMIT} parameters, this model has {size}; allowed: a model with fewer "
                                   "parameters (smaller inputs) or a diagonal family")  # fmt: skip


def build_run_model(config: RunConfig, prepared: Prepared) -> torch.nn.Module:
    """The run's model, in the training data's dtype (float64 only for a user's float64 data)."""
    dataset = prepared.dataset
    options = {"hidden": config.hidden_sizes, "activation": config.activation} if prepared.model_name == "mlp" else {}
    model = build_model(prepared.model_name, dataset.input_shape, dataset.num_classes, **options)
    return model.to(torch.from_numpy(np.zeros(0, dataset.x_train.dtype)).dtype)


def initial_mean(config: RunConfig) -> Tensor:
    """The model's initialisation under the run seed, flattened (float64 for the server's algebra)."""
    prepared = prepare(config)
    torch.manual_seed(config.seed)
    model = build_run_model(config, prepared)
    if prepared.model_name in ("linear", "softmax"):
        return torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)  # the papers' zero init
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().double()


def partition_sizes(config: RunConfig) -> dict[int, int]:
    """How many training examples each client holds (what its replies must say)."""
    return {k: len(rows) for k, rows in enumerate(prepare(config).parts)}


def local_settings(config: RunConfig) -> LocalSettings:
    """How each client trains locally under ``config``."""
    return LocalSettings(
        lr=config.lr, local_epochs=config.local_epochs, batch_size=config.batch_size, optimizer=config.optimizer,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip, optimizer_state=config.optimizer_state,
        ivon_hess_init=config.ivon_hess_init,
        ivon_beta2=config.ivon_beta2, ivon_mc_samples=config.ivon_mc_samples, ivon_clip_radius=config.ivon_clip_radius,
        ivon_kernel=config.ivon_kernel,
        curvature=config.curvature,
    )  # fmt: skip


def round_lr(config: RunConfig, server_round: int) -> float:
    """The clients' learning rate in ``server_round`` under the run's ``lr_schedule``."""
    return lr_in_round(config.lr, config.lr_schedule, server_round, config.rounds)


def make_trainer(config: RunConfig, partition_id: int) -> TorchTrainer:
    prepared = prepare(config)
    rows = prepared.parts[partition_id]
    dataset = prepared.dataset
    settings = local_settings(config)
    model = build_run_model(config, prepared)
    return TorchTrainer(
        model,
        torch.as_tensor(dataset.x_train[rows]),
        torch.as_tensor(dataset.y_train[rows]),
        dataset.task,
        settings,
        device=resolve_device(config),
    )


def make_algorithm(config: RunConfig, *, with_data: bool = True, model: torch.nn.Module | None = None) -> Algorithm:
    """The configuration's algorithm, its replies bounded by ``robust_clip`` and combined by ``combine``
    (:mod:`fedvb.core.robust`). ``with_data=False``: build it from the hyperparameters alone, for a user's
    own model and data (fedvb's dataset is not loaded; FedLap-Func, which needs it, is refused). ``model``:
    the architecture a family with a per-layer layout is bound to (default: the run's model when
    ``with_data``; a client's algorithm binds itself to its trainer's model otherwise)."""
    algorithm = _algorithm(config, with_data)
    if isinstance(algorithm, BayesADMM) and algorithm.preset.family.needs_model:
        if model is None and with_data:
            with torch.random.fork_rng():  # building a model draws its initialisation: leave the caller's stream
                model = build_run_model(config, prepare(config))
        if model is not None:
            algorithm.bind(model)
    return with_defences(algorithm, config)


def with_defences(algorithm: Algorithm, config: RunConfig) -> Algorithm:
    """``algorithm`` with the configuration's bounds and robust combination (:mod:`fedvb.core.robust`)."""
    algorithm.robust_clip = config.robust_clip
    algorithm.combination = Combination(config.combine, config.combine_trim)
    return algorithm


def _algorithm(config: RunConfig, with_data: bool) -> Algorithm:
    entry = ALGORITHMS[config.strategy]
    if not isinstance(entry, BayesADMMSpec):
        return entry.build(config)
    preset = entry.preset_for(config)
    if not with_data and entry.function_space:
        raise ConfigError("strategy", f"{config.strategy} needs fedvb's data (held-out inputs for the server)")
    if with_data and preset.solver is EXACT and prepare(config).model_name not in ("linear", "softmax"):
        raise ConfigError("solver", f"the exact solver needs model linear or softmax, got {prepare(config).model_name}")
    common = dict(
        prior_precision=config.prior_precision,
        temperature=config.temperature,
        precision_floor=config.precision_floor or None,
        round_one_anchor=config.round_one_anchor,
    )
    if entry.function_space:
        prepared = prepare(config)
        if prepared.dataset.task != "classification":
            raise ConfigError("strategy", f"{config.strategy} needs a classification dataset (soft labels)")
        return FedLapFunc(
            preset, inputs=torch.as_tensor(prepared.unlabelled), weight=config.func_weight,
            steps=config.func_steps, lr=config.func_lr, model=_eval_trainer(_key(config), "cpu"), **common,
        )  # fmt: skip
    return BayesADMM(preset, **common)


def client_generator(config: RunConfig, server_round: int, partition_id: int) -> torch.Generator:
    """One random stream per (run, round, client): results do not depend on execution order or backend. With
    ``client_streams = "shared"`` every client starts every round from the run seed's one stream, as the papers'
    code (it reseeds torch with the run seed when a client's training starts)."""
    if config.client_streams == "shared":
        return torch.Generator().manual_seed(config.seed)
    seed = np.random.SeedSequence([config.seed, server_round, partition_id]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def test_predictions(config: RunConfig, mean: Tensor, posterior: Gaussian | None) -> dict[str, Tensor]:
    """The server model's test-set outputs: ``y``, ``mean`` (the posterior mean's probabilities, or predicted
    values for regression) and, for a posterior, ``predictive``: the Monte Carlo average over
    ``eval_samples`` draws from ``N(m_bar, S_bar^-1)`` (a fixed stream per run). Empty without a test set."""
    dataset = prepare(config).dataset
    if len(dataset.y_test) == 0:
        return {}
    trainer = _eval_trainer(_key(config), config.device)
    x = torch.as_tensor(dataset.x_test)
    outputs = {"y": torch.as_tensor(dataset.y_test), "mean": trainer.predict(mean, x).cpu()}
    if posterior is not None and config.eval_samples > 0 and posterior.family.can_sample(posterior.dim):
        generator = torch.Generator().manual_seed(config.seed + 12345)
        draws = posterior.sample(config.eval_samples, generator)
        outputs["predictive"] = sum(trainer.predict(theta, x).cpu() for theta in draws) / config.eval_samples
    return outputs


def evaluate(
    config: RunConfig, mean: Tensor, posterior: Gaussian | None, outputs: dict[str, Tensor] | None = None
) -> dict[str, float]:
    """Server-model metrics on the test set (:func:`fedvb.metrics.score` of the posterior mean, and with the
    prefix ``predictive_`` of the Monte Carlo predictive) and the mean model's accuracy on each client's
    local test split (mean, worst, spread; over :func:`scored_clients`). ``outputs``:
    :func:`test_predictions` if already computed."""
    prepared = prepare(config)
    dataset = prepared.dataset
    outputs = test_predictions(config, mean, posterior) if outputs is None else outputs
    if not outputs:
        return {}
    metrics = score(outputs["mean"], outputs["y"], dataset.task)
    if "predictive" in outputs:
        metrics.update(
            {f"predictive_{k}": v for k, v in score(outputs["predictive"], outputs["y"], dataset.task).items()}
        )
    if dataset.task == "classification" and prepared.local_tests and all(len(t) for t in prepared.local_tests):
        # the server model on each client's local test split: how evenly it serves the clients
        trainer = _eval_trainer(_key(config), config.device)
        tests = [prepared.local_tests[k] for k in scored_clients(config)]
        rows = np.concatenate(tests)
        correct = (trainer.predict(mean, torch.as_tensor(dataset.x_train[rows])).cpu().argmax(1)
                   == torch.as_tensor(dataset.y_train[rows])).float().numpy()  # fmt: skip
        bounds = np.cumsum([0] + [len(t) for t in tests])
        per_client = np.array([correct[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
        metrics.update(
            client_accuracy_mean=float(per_client.mean()),
            client_accuracy_worst=float(per_client.min()),
            client_accuracy_std=float(per_client.std()),
        )
    return metrics


def scored_clients(config: RunConfig) -> np.ndarray:
    """The clients whose local test splits :func:`evaluate` scores: all of them, or ``eval_client_count``
    drawn once per run (the same clients every round, so the curve follows the model, not the draw)."""
    count = config.eval_client_count
    if count >= config.num_clients:
        return np.arange(config.num_clients)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xE7A1]))
    return np.sort(rng.choice(config.num_clients, size=count, replace=False))


def write_label_distribution(config: RunConfig, path) -> None:
    """The picture of each client's training labels, for the run folder."""
    prepared = prepare(config)
    if prepared.dataset.task == "classification":
        title = f"{config.dataset if not config.data else 'npz'}: {config.partition}, {config.num_clients} clients"
        plot_label_distribution(
            prepared.dataset.y_train, prepared.parts, path, class_names=prepared.dataset.class_names, title=title
        )


@functools.lru_cache(maxsize=2)
def _eval_trainer(key: str, device: str) -> TorchTrainer:
    config = _from_key(key)[0].replace(device=device)
    prepared = _prepared(key)  # the key's data and model (the config made from it has no strategy)
    empty = torch.zeros(0)
    return TorchTrainer(build_run_model(config, prepared), empty, empty, prepared.dataset.task, LocalSettings(),
                        device=resolve_device(config))  # fmt: skip
