"""The papers' two splits are the reference code's, draw for draw.

Each recipe below is written out again from its description (docs/data.md) in plain numpy, drawing from
numpy's legacy *global* generator after ``np.random.seed(seed)`` as the reference code does, and compared
with what ``fedvb partition`` writes: the same client index lists, in the same order.
"""

import contextlib
import math

import numpy as np
import pytest

from fedvb.cli import main
from fedvb.data import load_dataset, partition_indices
from tests.marks import needs_data


@contextlib.contextmanager
def seeded_global(seed):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def reference_dirichlet(y, num_clients, fraction, seed):
    with seeded_global(seed):
        num_classes = len(np.unique(y))
        p = np.random.dirichlet([1.0] * num_clients)
        c = np.random.dirichlet([0.5] * num_classes, num_clients)
        w = p[:, None] * c
        norm = w.sum(axis=0)
        lists = [[] for _ in range(num_clients)]
        for j in range(num_classes):
            idx = np.where(y == j)[0]
            np.random.shuffle(idx)
            n_j = len(idx) * fraction
            offset = 0
            for k in range(num_clients):
                n = round(n_j * w[k, j] / norm[j])
                if n == 1:
                    n = 2
                lists[k].extend(idx[offset : offset + n].tolist())
                offset += n
    return lists


def reference_two_class(y, num_clients, seed, per_class=300, cap=20):
    with seeded_global(seed):
        num_classes = len(np.unique(y))
        used = [0] * num_classes
        classes = []
        for _ in range(num_clients):
            first = used.index(min(used))
            second = np.random.choice(num_classes, 1, replace=False)[0]
            while second == first or used[second] >= cap:
                second = np.random.choice(num_classes, 1, replace=False)[0]
            used[first] += 1
            used[second] += 1
            classes.append(sorted([first, int(second)]))
        lists = [[] for _ in range(num_clients)]
        for j in range(num_classes):
            idx = np.where(y == j)[0]
            np.random.shuffle(idx)
            holders = [k for k in range(num_clients) if j in classes[k]]
            for i, k in enumerate(holders):
                piece = idx[i * per_class : (i + 1) * per_class]
                if (i + 1) * per_class > len(idx):
                    piece = idx[-per_class:]
                lists[k].extend(piece.tolist())
    return lists


def written_split(tmp_path, *args):
    out = tmp_path / "split.npz"
    assert main(["partition", *args, "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as z:
        count = len([f for f in z.files if f.startswith("client_")])
        return [z[f"client_{k}"].tolist() for k in range(count)], str(z["config"])


@needs_data("fashion-mnist")
@pytest.mark.parametrize("seed", [62, 63])
def test_fashion_mnist_heterogeneous_split_is_the_reference(tmp_path, seed):
    lists, config = written_split(
        tmp_path, "--dataset", "fashion-mnist", "--num-clients", "10", "--seed", str(seed),
        "--set", "partition=papers-dirichlet", "--set", "data_fraction=0.1",
    )  # fmt: skip
    y = load_dataset("fashion-mnist").y_train
    assert lists == reference_dirichlet(y, 10, 0.1, seed)
    assert 5_900 <= sum(map(len, lists)) <= 6_100  # 10% of 60,000, taken per class
    assert "data_fraction = 0.1" in config and f"seed = {seed}" in config


@needs_data("mnist")
def test_mnist_two_class_split_is_the_reference(tmp_path):
    lists, _ = written_split(
        tmp_path, "--dataset", "mnist", "--num-clients", "100", "--seed", "62", "--set", "partition=two-class"
    )
    y = load_dataset("mnist").y_train
    assert lists == reference_two_class(y, 100, 62)
    assert all(len(rows) == 600 and len(np.unique(y[rows])) == 2 for rows in lists)
    # MNIST's class 5 has 5,421 examples for 20 holders x 300: its last holders overlap, as in the reference
    fives = [[r for r in rows if y[r] == 5] for rows in lists if 5 in y[rows]]
    assert len(fives) == 20 and len(set().union(*map(set, fives))) == 5_421 < 20 * 300


@pytest.mark.parametrize("seed", range(6))
def test_recipes_match_on_generated_labels(seed):
    """The same comparison without dataset files: uneven classes, several seeds and sizes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=20_000)
    for clients, fraction in ((10, 0.1), (10, 1.0), (30, 0.5)):
        ours = partition_indices(y, "papers-dirichlet", clients, seed=seed, fraction=fraction)
        assert [p.tolist() for p in ours] == reference_dirichlet(y, clients, fraction, seed)
    ours = partition_indices(y, "two-class", 50, seed=seed)
    assert [p.tolist() for p in ours] == reference_two_class(y, 50, seed, cap=math.ceil(50 * 2 / 10))


def test_the_split_does_not_touch_numpys_global_generator():
    np.random.seed(5)
    expected = np.random.random_sample(3)
    np.random.seed(5)
    partition_indices(np.arange(1000) % 10, "papers-dirichlet", 10, seed=62)
    partition_indices(np.arange(6000) % 10, "two-class", 10, seed=62)
    assert np.array_equal(np.random.random_sample(3), expected)


def test_a_stuck_two_class_split_is_an_error_not_a_hang():
    # 3 classes, each held by at most 2 clients: the 4th client has nothing left for its second class
    with pytest.raises(ValueError, match="two-class cannot give client 3 a class held by fewer than 2"):
        partition_indices(np.arange(3000) % 3, "two-class", 5, seed=0, max_holders=2)


def test_partition_command_refuses_bad_output(tmp_path, capsys):
    assert main(["partition", "--dataset", "digits", "--out", str(tmp_path)]) == 2
    assert "out:" in capsys.readouterr().err
    (tmp_path / "a.npz").write_bytes(b"x")
    assert main(["partition", "--dataset", "digits", "--out", str(tmp_path / "a.npz")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["partition", "--dataset", "digits", "--out", str(tmp_path / "a.npz"), "--overwrite"]) == 0
    assert main(["partition", "--dataset", "nope", "--out", str(tmp_path / "b.npz")]) == 2
    assert not (tmp_path / "b.npz").exists()
