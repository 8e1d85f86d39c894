"""Splitting a training set over clients: flwr-datasets' partitioners plus the papers' two schemes.

``partition_indices(labels, scheme, num_clients, seed=..., **options)`` returns
one array of training-row indices per client.  Schemes:

================  ============================================================  ==========================
scheme            what                                                          options
================  ============================================================  ==========================
iid               uniform                                                       -
dirichlet         per class, Dir(alpha) over clients (flwr)                     alpha, min_partition_size
inner-dirichlet   given client sizes, each with a Dir(alpha) class mix (flwr)   alpha, sizes
pathological      each client exactly k classes (flwr)                          classes_per_client
shard             sorted shards, k per client (flwr)                            shards_per_client
natural           the data's own clients (e.g. UCI heart centres)               -
size              given client sizes (flwr)                                     sizes
papers-dirichlet  sizes ~ Dir(size_alpha) x class mix ~ Dir(class_alpha)        size_alpha, class_alpha, m.p.s.
two-class         each client 2 classes x 300 points (papers' MNIST)            classes_per_client, points_per_class
================  ============================================================  ==========================

The last two are the papers' own (docs/data.md) and are
not in flwr-datasets, so they are written here.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SCHEMES", "local_test_split", "partition_indices"]


def _flwr_partition(partitioner, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Run a flwr-datasets partitioner over a table of (label, row index) only.

    The table is shuffled first: flwr's IidPartitioner takes contiguous shards
    and assumes shuffled input, which a class-sorted training set is not.
    """
    from datasets import Dataset as ArrowDataset

    order = np.random.default_rng(np.random.SeedSequence([seed, 11])).permutation(len(labels))
    columns = {"label": labels[order].tolist(), "row": order.tolist()}
    partitioner.dataset = ArrowDataset.from_dict(columns)
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
        for i in range(partitioner.num_partitions)
    ]


def _papers_dirichlet(labels, num_clients, rng, size_alpha=1.0, class_alpha=0.5, min_partition_size=2):
    """p ~ Dir(size_alpha) over clients, c_k ~ Dir(class_alpha) over classes; class j goes to
    client k in proportion to p_k c_kj (docs/data.md).

    Draws are repeated (up to 1000 times) until every client has at least
    ``min_partition_size`` rows; the reference code instead bumps counts of 1 to 2.
    """
    classes = np.unique(labels)
    for _ in range(1000):
        sizes = rng.dirichlet(np.full(num_clients, size_alpha))
        mixes = rng.dirichlet(np.full(len(classes), class_alpha), size=num_clients)
        parts = [[] for _ in range(num_clients)]
        for j, cls in enumerate(classes):
            rows = rng.permutation(np.flatnonzero(labels == cls))
            weights = sizes * mixes[:, j]
            cuts = np.floor(np.cumsum(weights / weights.sum()) * len(rows)).astype(int)
            for k, chunk in enumerate(np.split(rows, cuts[:-1])):
                parts[k].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(map(len, result)) >= min_partition_size:
            return result
    raise ValueError(f"papers-dirichlet: could not give every client >= {min_partition_size} rows; use fewer clients")


def _two_class(labels, num_clients, rng, classes_per_client=2, points_per_class=300):
    """Each client: first the least-used class so far, then random other classes used fewer than
    the cap (= ceil(K * classes_per_client / C)); ``points_per_class`` rows of each (docs/data.md).

    Rows of a class are dealt from a shuffled pool without replacement; only when a
    class has fewer rows than its uses need (e.g. MNIST's 5 for 100 clients) does the
    pool start again, so some rows then reach two clients.
    """
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise ValueError(f"classes_per_client: {classes_per_client} > number of classes {len(classes)}")
    cap = math.ceil(num_clients * classes_per_client / len(classes))
    uses = dict.fromkeys(classes.tolist(), 0)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes.tolist()}
    cursor = dict.fromkeys(classes.tolist(), 0)
    parts = []
    for _ in range(num_clients):
        first = min(uses, key=lambda c: (uses[c], c))
        chosen = [first]
        while len(chosen) < classes_per_client:
            options = [c for c in uses if c not in chosen and uses[c] < cap] or [c for c in uses if c not in chosen]
            chosen.append(int(rng.choice(options)))
        rows = []
        for c in chosen:
            uses[c] += 1
            pool = pools[c]
            take = [pool[(cursor[c] + i) % len(pool)] for i in range(points_per_class)]
            cursor[c] += points_per_class
            rows.append(np.asarray(take))
        parts.append(np.sort(np.concatenate(rows)))
    return parts


SCHEMES = (
    "iid", "dirichlet", "inner-dirichlet", "pathological", "shard", "natural", "size", "papers-dirichlet", "two-class",
)  # fmt: skip


def partition_indices(
    labels: np.ndarray,
    scheme: str,
    num_clients: int,
    *,
    seed: int,
    natural: np.ndarray | None = None,
    **options,
) -> list[np.ndarray]:
    """Training-row indices of each client under ``scheme`` (see the module docstring)."""
    if num_clients < 1:
        raise ValueError(f"num_clients: must be >= 1, got {num_clients}")
    if scheme not in SCHEMES:
        raise ValueError(f"partition: unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    labels = np.asarray(labels)
    if scheme != "natural" and num_clients > len(labels):
        raise ValueError(f"num_clients: {num_clients} clients for {len(labels)} training rows; at most one per row")
    rng = np.random.default_rng(seed)
    if scheme == "papers-dirichlet":
        return _papers_dirichlet(
            labels, num_clients, rng, options.get("size_alpha", 1.0), options.get("class_alpha", 0.5),
            options.get("min_partition_size", 2),
        )  # fmt: skip
    if scheme == "two-class":
        return _two_class(
            labels, num_clients, rng, options.get("classes_per_client", 2), options.get("points_per_class", 300)
        )
    from flwr_datasets import partitioner as fp  # only the schemes that flwr-datasets provides need it

    if scheme == "iid":
        return _flwr_partition(fp.IidPartitioner(num_clients), labels, seed)
    if scheme == "dirichlet":
        part = fp.DirichletPartitioner(
            num_clients, "label", options.get("alpha", 0.5), min_partition_size=options.get("min_partition_size", 10),
            seed=seed,
        )  # fmt: skip
        return _flwr_partition(part, labels, seed)
    if scheme == "inner-dirichlet":
        sizes = options.get("sizes") or _even_sizes(len(labels), num_clients)
        part = fp.InnerDirichletPartitioner(sizes, "label", options.get("alpha", 0.5), seed=seed)
        return _flwr_partition(part, labels, seed)
    if scheme == "pathological":
        k = options.get("classes_per_client", 2)
        return _flwr_partition(fp.PathologicalPartitioner(num_clients, "label", k, seed=seed), labels, seed)
    if scheme == "shard":
        k = options.get("shards_per_client", 2)
        return _flwr_partition(fp.ShardPartitioner(num_clients, "label", k, seed=seed), labels, seed)
    if scheme == "natural":
        if natural is None:
            raise ValueError("partition: scheme 'natural' needs a dataset with natural clients (e.g. uci-heart)")
        found = len(np.unique(natural))
        if found != num_clients:
            raise ValueError(f"num_clients: the data has {found} natural clients, got {num_clients}")
        # a group-by, written here: flwr's NaturalIdPartitioner gives the same rows after a round trip through
        # Arrow and a progress bar on every call
        return [np.flatnonzero(natural == k) for k in np.unique(natural)]  # client k = the k-th natural id
    sizes = options.get("sizes") or _even_sizes(len(labels), num_clients)  # scheme == "size"
    return _flwr_partition(fp.SizePartitioner(sizes), labels, seed)


def _even_sizes(total: int, num_clients: int) -> list[int]:
    base, extra = divmod(total, num_clients)
    return [base + (k < extra) for k in range(num_clients)]


def local_test_split(rows: np.ndarray, fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's rows split into local train and local test (``fraction`` of them, at least one if possible)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"local_test_fraction: must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, client, 7]))
    order = rng.permutation(rows)
    n_test = int(round(fraction * len(rows)))
    if fraction > 0 and n_test == 0 and len(rows) > 1:
        n_test = 1
    return np.sort(order[n_test:]), np.sort(order[:n_test])
