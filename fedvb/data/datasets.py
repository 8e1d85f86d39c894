"""Named datasets, loaded offline from standard files, generated, or shipped with a package.

``load_dataset(name, ...)`` returns a :class:`Dataset` of float32 inputs and
integer labels (float targets for regression).  Images are ``(N, C, H, W)``.

Preprocessing: ``"standardize"`` (the default) scales images to [0, 1] and then
to zero mean and unit variance with the training set's statistics (per channel
for colour, per feature for tables); ``"raw"`` keeps the papers' inputs
(docs/data.md, input scaling): Fashion-MNIST as 0-255 floats, MNIST, CIFAR-10
and digits in [0, 1], tables with unscaled continuous columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedvb.data.locate import DataNotFoundError, cache_dir, find_first, search_dirs
from fedvb.data.readers import (
    idx_folder_has_files,
    read_cifar10_jpeg_tar,
    read_cifar10_python,
    read_idx_folder,
    read_uci_table,
)

__all__ = ["DATASETS", "PREPROCESSING", "Dataset", "load_dataset", "stratified_split"]

PREPROCESSING = ("standardize", "raw")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test arrays, plus each training row's natural client where the data has one."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int  # 0 for regression
    natural_clients: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def task(self) -> str:
        return "regression" if self.num_classes == 0 else "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices with each class split in the same proportion (rounded per class)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(test_fraction * len(rows)))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _standardize(x_train: np.ndarray, x_test: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    std[std == 0] = 1.0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _images(name, arrays, preprocessing, raw_scale, class_names=None) -> Dataset:
    """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W)."""
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.ndim == 3:
        x_train, x_test = x_train[:, None], x_test[:, None]
    else:
        x_train, x_test = x_train.transpose(0, 3, 1, 2), x_test.transpose(0, 3, 1, 2)
    x_train, x_test = x_train.astype(np.float32) / 255.0, x_test.astype(np.float32) / 255.0
    if preprocessing == "standardize":
        x_train, x_test = _standardize(x_train, x_test, axes=(0, 2, 3))
    else:
        x_train, x_test = x_train * raw_scale, x_test * raw_scale
    return Dataset(
        name,
        np.ascontiguousarray(x_train, dtype=np.float32),
        arrays["y_train"].astype(np.int64),
        np.ascontiguousarray(x_test, dtype=np.float32),
        arrays["y_test"].astype(np.int64),
        10,
        class_names=class_names,
    )


def _find_fashion_mnist(data_dir) -> Path:
    folders = [d / "fashion-mnist" for d in search_dirs(data_dir)] + [Path("/usr/share/datasets/fashion-mnist")]
    if data_dir is not None:
        folders.insert(0, Path(data_dir))
    folder = find_first(
        [f for f in folders if idx_folder_has_files(f)] or folders[-1:],
        "fashion-mnist",
        "Install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        "or put the four IDX files (train-images-idx3-ubyte[.gz], ...) in DATA_DIR/fashion-mnist.",
    )
    if not idx_folder_has_files(folder):
        raise DataNotFoundError(f"fashion-mnist: {folder} lacks the four IDX files")
    return folder


def _fashion_mnist(data_dir, preprocessing, seed, **_) -> Dataset:
    folder = _find_fashion_mnist(data_dir)
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    return _images("fashion-mnist", read_idx_folder(folder), preprocessing, raw_scale=255.0, class_names=names)


def _find_mnist(data_dir) -> Path:
    candidates = []
    for d in search_dirs(data_dir):
        candidates += [d / "mnist.npz", d / "mnist"]
    return find_first(
        [c for c in candidates if c.suffix == ".npz" or idx_folder_has_files(c)] or candidates[:1],
        "mnist",
        "Put mnist.npz (keys x_train, y_train, x_test, y_test) or the four IDX files in DATA_DIR/mnist.",
    )


def _mnist(data_dir, preprocessing, seed, **_) -> Dataset:
    path = _find_mnist(data_dir)
    if path.suffix == ".npz":
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    else:
        arrays = read_idx_folder(path)
    return _images("mnist", arrays, preprocessing, raw_scale=1.0)


def _find_cifar10(data_dir) -> Path:
    candidates = []
    for d in search_dirs(data_dir):
        candidates += [d / "cifar-10-batches-py", d / "cifar10-jpeg.tar.gz"]
    return find_first(
        candidates,
        "cifar10",
        "Put the original python batches (cifar-10-batches-py/) or cifar10-jpeg.tar.gz in the data directory.",
    )


def _cifar10(data_dir, preprocessing, seed, **_) -> Dataset:
    from fedvb.data.readers import CIFAR10_CLASSES

    source = _find_cifar10(data_dir)
    if source.is_dir():
        arrays = read_cifar10_python(source)
    else:
        # Decoding 60,000 JPEGs takes a while: do it once and cache the arrays.
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = cache_dir() / f"cifar10-{key}.npz"
        if cached.exists():
            with np.load(cached) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = read_cifar10_jpeg_tar(source)
            partial = cached.with_suffix(".tmp.npz")
            np.savez(partial, **arrays)
            partial.replace(cached)  # atomic: a crash never leaves a half-written cache
    return _images("cifar10", arrays, preprocessing, raw_scale=1.0, class_names=CIFAR10_CLASSES)


def _digits(data_dir, preprocessing, seed, **_) -> Dataset:
    from sklearn.datasets import load_digits  # ships its data inside the package

    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    train, test = stratified_split(y, 0.2, seed=0)  # a fixed split: the run seed varies the partition only
    x_train, x_test = x[train], x[test]
    if preprocessing == "standardize":
        x_train, x_test = _standardize(x_train, x_test, axes=(0, 2, 3))
    return Dataset("digits", x_train, y[train], x_test, y[test], 10)


def _one_hot_table(rows, categorical, continuous, preprocessing, train_rows):
    columns = []
    for j in categorical:
        values = sorted({r[j] for r in rows})
        columns.append(np.asarray([[r[j] == v for v in values] for r in rows], dtype=np.float32))
    numbers = np.asarray([[float(r[j]) for j in continuous] for r in rows], dtype=np.float32)
    if preprocessing == "standardize":
        mean, std = numbers[train_rows].mean(0), numbers[train_rows].std(0)
        std[std == 0] = 1.0
        numbers = (numbers - mean) / std
    return np.concatenate([numbers, *columns], axis=1).astype(np.float32)


def _find_uci_credit(data_dir) -> Path:
    return find_first(
        [d / "uci-credit" / "crx.data" for d in search_dirs(data_dir)]
        + [d / "crx.data" for d in search_dirs(data_dir)],
        "uci-credit",
        "Put the UCI file crx.data in DATA_DIR/uci-credit/.",
    )


def _uci_credit(data_dir, preprocessing, seed, **_) -> Dataset:
    """UCI Credit Approval as in the papers' code (docs/data.md): rows with '?' dropped,
    categorical columns one-hot, class '-' = 0 and '+' = 1, a stratified 80/20 split with seed 1."""
    path = _find_uci_credit(data_dir)
    rows = [r for r in read_uci_table(path) if "?" not in r]
    y = np.asarray([1 if r[15] == "+" else 0 for r in rows], dtype=np.int64)
    train, test = stratified_split(y, 0.2, seed=1)
    x = _one_hot_table(rows, [0, 3, 4, 5, 6, 8, 9, 11, 12], [1, 2, 7, 10, 13, 14], preprocessing, train)
    return Dataset("uci-credit", x[train], y[train], x[test], y[test], 2, class_names=("-", "+"))


HEART_CENTRES = ("cleveland", "hungarian", "switzerland", "va")
HEART_TRAIN_SIZES = (199, 172, 30, 85)  # FLamby's per-centre training sizes (docs/data.md)


def _find_uci_heart(data_dir) -> Path:
    return find_first(
        [d / "uci-heart" for d in search_dirs(data_dir)],
        "uci-heart",
        "Put processed.{cleveland,hungarian,switzerland,va}.data in DATA_DIR/uci-heart/.",
    )


def _uci_heart(data_dir, preprocessing, seed, **_) -> Dataset:
    """UCI Heart Disease, the four centres of FLamby's Fed-Heart-Disease as natural clients.

    Columns slope, ca and thal (mostly missing outside Cleveland) are dropped,
    then rows with any remaining '?'; the target is ``num > 0``. That leaves
    303/261/46/130 rows; each centre keeps FLamby's training size and the rest
    is pooled into the test set. Which rows are held out is drawn from ``seed``
    (FLamby's exact rows are not reproduced).
    """
    folder = _find_uci_heart(data_dir)
    rng = np.random.default_rng(seed)
    rows, centre, is_train = [], [], []
    for k, (name, n_train) in enumerate(zip(HEART_CENTRES, HEART_TRAIN_SIZES)):
        kept = [r[:10] + [r[13]] for r in read_uci_table(folder / f"processed.{name}.data")]
        kept = [r for r in kept if "?" not in r]
        order = rng.permutation(len(kept))
        rows += kept
        centre += [k] * len(kept)
        is_train += list(np.isin(np.arange(len(kept)), order[:n_train]))
    is_train = np.asarray(is_train)
    y = np.asarray([1 if float(r[10]) > 0 else 0 for r in rows], dtype=np.int64)
    train_rows = np.flatnonzero(is_train)
    x = _one_hot_table([r[:10] for r in rows], [1, 2, 5, 6, 8], [0, 3, 4, 7, 9], preprocessing, train_rows)
    test_rows = np.flatnonzero(~is_train)
    return Dataset(
        "uci-heart", x[train_rows], y[train_rows], x[test_rows], y[test_rows], 2,
        natural_clients=np.asarray(centre)[train_rows],
    )  # fmt: skip


def _fedprox_synthetic(data_dir, preprocessing, seed, alpha=1.0, beta=1.0, num_clients=30, dim=60, classes=10, **_):
    """Synthetic(alpha, beta) of FedProx (Li et al. 2020): client k has its own model and input distribution.

    ``u_k ~ N(0, alpha)``, ``W_k, b_k ~ N(u_k, 1)``, ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)``,
    ``x ~ N(v_k, diag(j^-1.2))``, ``y = argmax(W_k x + b_k)``; sizes lognormal(4, 2) + 50, capped at 1000.
    A fifth of each client's rows go to the pooled test set.
    """
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.lognormal(4, 2, num_clients).astype(int) + 50, 1000)
    covariance = np.arange(1, dim + 1) ** -1.2
    xs, ys, owners = [], [], []
    for k, n in enumerate(sizes):
        u, big_b = rng.normal(0, np.sqrt(alpha)), rng.normal(0, np.sqrt(beta))
        weight, bias = rng.normal(u, 1, (classes, dim)), rng.normal(u, 1, classes)
        v = rng.normal(big_b, 1, dim)
        x = v + rng.standard_normal((n, dim)) * np.sqrt(covariance)
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ weight.T + bias, axis=1))
        owners.append(np.full(n, k))
    x, y, owner = np.concatenate(xs), np.concatenate(ys).astype(np.int64), np.concatenate(owners)
    test = np.zeros(len(y), dtype=bool)
    for k in range(num_clients):
        rows = np.flatnonzero(owner == k)
        test[rng.choice(rows, size=len(rows) // 5, replace=False)] = True
    return Dataset(f"fedprox-synthetic({alpha},{beta})", x[~test], y[~test], x[test], y[test], classes, owner[~test])


def _synthetic_regression(data_dir, preprocessing, seed, num_clients=4, dim=6, **_) -> Dataset:
    """The core's heterogeneous linear-regression clients (fedvb.core.problems), a fifth held out per client."""
    from fedvb.core.problems import make_linear_regression_clients

    return _from_core_clients("synthetic-linear", make_linear_regression_clients(num_clients, dim, seed=seed), 0, seed)


def _synthetic_classification(data_dir, preprocessing, seed, num_clients=5, dim=4, classes=3, **_) -> Dataset:
    """The core's label-skewed softmax-regression clients (fedvb.core.problems), a fifth held out per client."""
    from fedvb.core.problems import make_softmax_regression_clients

    clients = make_softmax_regression_clients(num_clients, dim, classes, seed=seed)
    return _from_core_clients("synthetic-logistic", clients, classes, seed)


def _from_core_clients(name, clients, num_classes, seed) -> Dataset:
    rng = np.random.default_rng(seed)
    parts = {"x_train": [], "y_train": [], "x_test": [], "y_test": [], "owner": []}
    for k, client in enumerate(clients):
        x, y = client.x.numpy().astype(np.float32), client.y.numpy()
        order = rng.permutation(len(y))
        cut = len(y) // 5
        parts["x_test"].append(x[order[:cut]])
        parts["y_test"].append(y[order[:cut]])
        parts["x_train"].append(x[order[cut:]])
        parts["y_train"].append(y[order[cut:]])
        parts["owner"].append(np.full(len(y) - cut, k))
    y_dtype = np.int64 if num_classes else np.float32
    return Dataset(
        name,
        np.concatenate(parts["x_train"]),
        np.concatenate(parts["y_train"]).astype(y_dtype),
        np.concatenate(parts["x_test"]),
        np.concatenate(parts["y_test"]).astype(y_dtype),
        num_classes,
        natural_clients=np.concatenate(parts["owner"]),
    )


DATASETS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": _fashion_mnist,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "digits": _digits,
    "uci-credit": _uci_credit,
    "uci-heart": _uci_heart,
    "fedprox-synthetic": _fedprox_synthetic,
    "synthetic-linear": _synthetic_regression,
    "synthetic-logistic": _synthetic_classification,
}


# The datasets generated for the run's number of clients (their natural clients are the generated ones).
GENERATED = ("fedprox-synthetic", "synthetic-linear", "synthetic-logistic")

# The datasets read from files, and how each finds its files (the others ship with a package or are generated).
FILE_FINDERS = {
    "fashion-mnist": _find_fashion_mnist,
    "mnist": _find_mnist,
    "cifar10": _find_cifar10,
    "uci-credit": _find_uci_credit,
    "uci-heart": _find_uci_heart,
}


def dataset_available(name: str, data_dir: str | Path | None = None) -> bool:
    """Whether ``name``'s files can be found (``data_dir``, ``$FEDVB_DATA``, ...) without loading them."""
    if name not in FILE_FINDERS:
        return name in DATASETS
    try:
        FILE_FINDERS[name](data_dir)
    except DataNotFoundError:
        return False
    return True


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    preprocessing: str = "standardize",
    seed: int = 0,
    **options,
) -> Dataset:
    """Load a named dataset offline. ``options`` go to generated datasets (e.g. ``alpha``, ``beta``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown {name!r}; allowed: {', '.join(DATASETS)}")
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing: unknown {preprocessing!r}; allowed: {', '.join(PREPROCESSING)}")
    return DATASETS[name](data_dir, preprocessing, seed, **options)
