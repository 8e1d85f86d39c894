"""Offline datasets: shapes, class counts and value ranges; readers of the standard formats; partitions."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedvb.data import (
    DataNotFoundError,
    load_dataset,
    local_test_split,
    parse_class_counts,
    partition_indices,
    plot_label_distribution,
)
from fedvb.data import datasets as datasets_module
from fedvb.data import partition as partition_module
from fedvb.data.pickle_data import UnsafePickleError, load_pickled_data
from fedvb.data.readers import read_cifar10_python, read_idx
from tests.marks import needs_data


@needs_data("fashion-mnist")
def test_fashion_mnist():
    raw = load_dataset("fashion-mnist", preprocessing="raw")
    assert raw.x_train.shape == (60000, 1, 28, 28) and raw.x_test.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(raw.y_train), np.full(10, 6000))
    assert np.array_equal(np.bincount(raw.y_test), np.full(10, 1000))
    assert raw.x_train.min() == 0.0 and raw.x_train.max() == 255.0  # the papers' raw 0-255 floats
    std = load_dataset("fashion-mnist")
    assert abs(float(std.x_train.mean())) < 1e-4 and abs(float(std.x_train.std()) - 1) < 1e-4
    assert std.class_names[0] == "T-shirt/top"


@needs_data("mnist")
def test_mnist_from_npz_and_from_idx_files_agree(tmp_path):
    d = load_dataset("mnist", preprocessing="raw")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert d.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert 0.0 == d.x_train.min() and d.x_train.max() == 1.0
    assert abs(float(d.x_train.mean()) - 0.1307) < 1e-4 and abs(float(d.x_train.std()) - 0.3081) < 1e-4
    # The same arrays from the four standard IDX files (gzip and plain mixed).
    folder = tmp_path / "mnist"
    folder.mkdir()
    with np.load(datasets_module.FILE_FINDERS["mnist"](None)) as z:
        write_idx(folder / "train-images-idx3-ubyte.gz", z["x_train"])
        write_idx(folder / "train-labels-idx1-ubyte", z["y_train"])
        write_idx(folder / "t10k-images-idx3-ubyte.gz", z["x_test"])
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", z["y_test"])
    from_idx = load_dataset("mnist", data_dir=tmp_path, preprocessing="raw")
    assert np.array_equal(from_idx.x_test, d.x_test) and np.array_equal(from_idx.y_train, d.y_train)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=1) as handle:  # level 9 took 15 s on MNIST's 47 MB
            handle.write(data)
    else:
        path.write_bytes(data)


def test_idx_reader_known_answer(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(bytes([0, 0, 9, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_batches_reader(tmp_path, protocol):
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
        batches[name] = images
        raw = {b"batch_label": b"batch", b"data": images.reshape(4, -1), b"labels": [0, 1, 2, 9],
               b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}  # fmt: skip
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(raw, handle, protocol=protocol)
    arrays = read_cifar10_python(tmp_path)
    assert arrays["x_train"].shape == (20, 32, 32, 3)
    assert np.array_equal(arrays["x_test"][1], batches["test_batch"][1].transpose(1, 2, 0))
    assert arrays["y_train"].tolist() == [0, 1, 2, 9] * 5


class RunsACommand:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_crafted_cifar10_batch_is_refused_without_running_anything(tmp_path, protocol):
    marker = tmp_path / "ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({b"data": RunsACommand(marker), b"labels": [0]}, handle, protocol=protocol)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|only data is read"):
        read_cifar10_python(tmp_path)
    assert not marker.exists()
    with open(tmp_path / "test_batch", "wb") as handle:  # an object array smuggles pickled objects too
        pickle.dump({b"data": np.array([RunsACommand(marker)], dtype=object), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(UnsafePickleError):
        load_pickled_data(open(tmp_path / "test_batch", "rb"))
    assert not marker.exists()


@needs_data("cifar10")
def test_cifar10_jpeg_copy():
    d = load_dataset("cifar10", preprocessing="raw")
    assert d.x_train.shape == (50000, 3, 32, 32) and d.x_test.shape == (10000, 3, 32, 32)
    assert np.array_equal(np.bincount(d.y_train), np.full(10, 5000))
    assert np.array_equal(np.bincount(d.y_test), np.full(10, 1000))
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    np.testing.assert_allclose(d.x_train.mean(axis=(0, 2, 3)), [0.4913, 0.4821, 0.4465], atol=2e-4)
    assert d.class_names[3] == "cat"


@needs_data("uci-credit")
def test_uci_credit_as_in_the_papers_code():
    d = load_dataset("uci-credit")
    assert d.x_train.shape[0] + d.x_test.shape[0] == 653  # 690 rows less the 37 with '?'
    assert np.bincount(d.y_train).tolist() == [286, 237] and np.bincount(d.y_test).tolist() == [71, 59]
    assert d.x_train.shape[1] == d.x_test.shape[1] == 46 and np.isfinite(d.x_train).all()


@needs_data("uci-heart")
def test_uci_heart_has_flambys_four_centres():
    d = load_dataset("uci-heart")
    assert np.bincount(d.natural_clients).tolist() == [199, 172, 30, 85]
    assert d.x_test.shape[0] == (303 + 261 + 46 + 130) - 486
    assert set(np.unique(d.y_train)) == {0, 1} and np.isfinite(d.x_train).all()
    parts = partition_indices(d.y_train, "natural", 4, seed=0, natural=d.natural_clients)
    assert [len(p) for p in parts] == [199, 172, 30, 85]


def test_digits_and_generated_sets():
    d = load_dataset("digits")
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    per_class = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # sklearn's digits
    assert np.bincount(d.y_train).tolist() == (per_class - np.round(0.2 * per_class)).astype(int).tolist()
    fedprox = load_dataset("fedprox-synthetic", alpha=0.5, beta=0.5, num_clients=12, seed=3)
    assert fedprox.x_train.shape[1] == 60 and len(np.unique(fedprox.natural_clients)) == 12
    again = load_dataset("fedprox-synthetic", alpha=0.5, beta=0.5, num_clients=12, seed=3)
    assert np.array_equal(again.x_train, fedprox.x_train)
    linear = load_dataset("synthetic-linear")
    assert linear.task == "regression" and linear.y_train.dtype == np.float32


def test_missing_data_names_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets_module, "search_dirs", lambda data_dir=None: [tmp_path / "nowhere"])
    with pytest.raises(DataNotFoundError, match=r"(?s)mnist: no data found.*nowhere.*mnist.npz"):
        load_dataset("mnist")
    with pytest.raises(DataNotFoundError, match="uci-credit.*crx.data"):
        load_dataset("uci-credit")


def test_bad_names_list_the_allowed_values():
    with pytest.raises(ValueError, match="dataset: unknown 'emnist'; allowed: fashion-mnist, mnist"):
        load_dataset("emnist")
    with pytest.raises(ValueError, match="preprocessing: unknown 'minmax'; allowed: standardize, raw"):
        load_dataset("digits", preprocessing="minmax")


LABELS = np.repeat(np.arange(10), 600)  # 6,000 rows, 600 per class


@pytest.mark.parametrize(
    "scheme, options",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3}),
        ("inner-dirichlet", {"alpha": 0.5}),
        ("pathological", {"classes_per_client": 2}),
        ("shard", {"shards_per_client": 2}),
        ("size", {"sizes": [1000, 2000, 500, 1500, 100, 100, 100, 100, 50, 50]}),
        ("papers-dirichlet", {}),
    ],
)
def test_partitions_cover_the_data_once_and_are_seeded(scheme, options):
    parts = partition_indices(LABELS, scheme, 10, seed=1, **options)
    assert len(parts) == 10
    rows = np.concatenate(parts)
    assert len(rows) == len(np.unique(rows))  # disjoint
    if scheme == "papers-dirichlet":  # per (class, client) counts are rounded, as in the reference code
        assert abs(len(rows) - len(LABELS)) <= 10 * 10
    elif scheme != "size":
        assert len(rows) == len(LABELS)  # every row placed
    if scheme in ("pathological", "shard"):
        assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    if scheme == "pathological":
        assert all(len(np.unique(LABELS[p])) == 2 for p in parts)
    same = partition_indices(LABELS, scheme, 10, seed=1, **options)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    if scheme != "size":
        other = partition_indices(LABELS, scheme, 10, seed=2, **options)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize(
    "scheme, options",
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("inner-dirichlet", {"alpha": 0.5}),
     ("pathological", {"classes_per_client": 2}), ("shard", {"shards_per_client": 2}),
     ("size", {"sizes": [1000, 2000, 501, 1500, 100, 100, 99]})],
)  # fmt: skip
def test_partitions_read_off_the_partitioner_equal_flwr_datasets_own_load_partition(scheme, options, monkeypatch):
    """The start-up shortcut (no Arrow table per client) must give flwr-datasets' partitions exactly; 6,001
    rows over 7 clients so that the IID shards are uneven."""
    labels = np.append(LABELS, 3)
    fast = partition_indices(labels, scheme, 7, seed=4, **options)
    monkeypatch.setattr(partition_module, "_chosen_positions", lambda partitioner, size: None)
    loaded = partition_indices(labels, scheme, 7, seed=4, **options)
    assert [p.tolist() for p in fast] == [p.tolist() for p in loaded]


def test_class_counts_gives_each_client_its_counts_of_each_class_in_class_order():
    """The FedLap paper's UCI Credit heterogeneous split on its 286 / 237 training rows: class 0 [34]*5 + [22]*5,
    class 1 [2]*5 + [45]*5; the rows left over stay unused; seeded."""
    labels = np.array([0] * 286 + [1] * 237)
    np.random.default_rng(0).shuffle(labels)
    counts = parse_class_counts("34*5,22*5; 2*5,45*5")
    assert counts == [[34] * 5 + [22] * 5, [2] * 5 + [45] * 5]
    parts = partition_indices(labels, "class-counts", 10, seed=62, counts=counts)
    for k, rows in enumerate(parts):
        assert np.bincount(labels[rows], minlength=2).tolist() == [counts[0][k], counts[1][k]]
        assert np.all(np.diff(labels[rows]) >= 0)  # class 0's slice, then class 1's
    every = np.concatenate(parts)
    assert len(every) == len(np.unique(every)) == 280 + 235
    again = partition_indices(labels, "class-counts", 10, seed=62, counts=counts)
    other = partition_indices(labels, "class-counts", 10, seed=63, counts=counts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again)) and not np.array_equal(parts[0], other[0])
    with pytest.raises(ValueError, match="class_counts: class 1 asks for 240 rows, the data has 237"):
        partition_indices(labels, "class-counts", 10, seed=0, counts=parse_class_counts("1*10; 24*10"))
    with pytest.raises(ValueError, match="class_counts: 1 classes given, the data has 2"):
        partition_indices(labels, "class-counts", 10, seed=0, counts=parse_class_counts("1*10"))
    with pytest.raises(ValueError, match="class_counts: expected counts like"):
        parse_class_counts("28*x; 3")


def test_two_class_split_gives_exactly_two_classes_of_300():
    labels = np.repeat(np.arange(10), 6000)
    parts = partition_indices(labels, "two-class", 100, seed=0)
    for rows in parts:
        classes, counts = np.unique(labels[rows], return_counts=True)
        assert len(classes) == 2 and counts.tolist() == [300, 300]
    uses = np.bincount([c for rows in parts for c in np.unique(labels[rows])], minlength=10)
    assert uses.tolist() == [20] * 10  # every class used by 20 clients
    all_rows = np.concatenate(parts)
    assert len(np.unique(all_rows)) == len(all_rows)  # 6,000 rows a class suffice for 20 x 300: no repeats


def test_papers_dirichlet_has_skewed_sizes_and_classes():
    parts = partition_indices(LABELS, "papers-dirichlet", 10, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 2 and sizes.max() > 2 * sizes.mean() / 2
    assert np.std(sizes) > 0.3 * np.mean(sizes)  # Dir(1) sizes are far from equal


def test_local_test_split_and_label_picture(tmp_path):
    parts = partition_indices(LABELS, "dirichlet", 5, seed=0, alpha=0.5)
    for k, rows in enumerate(parts):
        train, test = local_test_split(rows, 0.2, seed=0, client=k)
        assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(rows)
        assert abs(len(test) - 0.2 * len(rows)) <= 1
    picture = plot_label_distribution(LABELS, parts, tmp_path / "labels.png")
    assert picture.stat().st_size > 5_000


def test_partition_errors_name_the_field():
    with pytest.raises(ValueError, match="partition: unknown scheme 'random'; allowed: iid"):
        partition_indices(LABELS, "random", 4, seed=0)
    with pytest.raises(ValueError, match="needs a dataset with natural clients"):
        partition_indices(LABELS, "natural", 4, seed=0)
