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
papers-dirichlet  sizes ~ Dir(size_alpha) x class mix ~ Dir(class_alpha)        size_alpha, class_alpha, fraction
two-class         each client 2 classes x 300 points (papers' MNIST)            classes_per_client, p.p.c., m.h.
class-counts      given counts per class and client (papers' UCI Credit)        counts
================  ============================================================  ==========================

The last two are the papers' own (docs/data.md), not in flwr-datasets, and
written here to give the reference code's client lists draw for draw for the
same seed: they draw from a ``numpy.random.RandomState(seed)`` (the
reference seeds numpy's legacy global generator; this is that stream without
touching global state) and return each client's rows in the scheme's own
order. The flwr schemes return sorted rows.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SCHEMES", "local_test_split", "parse_class_counts", "partition_indices"]


def _flwr_partition(partitioner, labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Run a flwr-datasets partitioner over a table of (label, row index) only.

    The table is shuffled first: flwr's IidPartitioner takes contiguous shards
    and assumes shuffled input, which a class-sorted training set is not.
    """
    from datasets import Dataset as ArrowDataset

    order = np.random.default_rng(np.random.SeedSequence([seed, 11])).permutation(len(labels))
    columns = {"label": labels[order].tolist(), "row": order.tolist()}
    partitioner.dataset = ArrowDataset.from_dict(columns)
    chosen = _chosen_positions(partitioner, len(labels))
    if chosen is None:  # a partitioner whose choice cannot be read: one Arrow table per client
        return [
            np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
            for i in range(partitioner.num_partitions)
        ]
    # the table as it is after the call (the shard partitioner sorts it), as one array, not row by row
    table_rows = np.asarray(partitioner.dataset.with_format("numpy")[:]["row"], dtype=np.int64)
    return [np.sort(table_rows[np.asarray(positions, dtype=np.int64)]) for positions in chosen]


def _chosen_positions(partitioner, size: int) -> list | None:
    """Each partition's positions in the partitioner's table, read off the partitioner instead of built as
    one Arrow table per client (``load_partition``: 4 ms a client, 40 s of start-up at 10,000 clients).
    flwr-datasets' partitioners ``select`` the positions they keep in ``_partition_id_to_indices`` (filled
    by the first ``load_partition``, into the table as it then is: the shard one sorts it), and the IID
    one takes ``datasets``' contiguous shards, whose bounds are computed here as ``Dataset.shard`` does;
    tests/test_data.py checks both against ``load_partition``. ``None`` for anything else."""
    from flwr_datasets.partitioner import IidPartitioner

    count = partitioner.num_partitions
    if type(partitioner) is IidPartitioner:
        div, mod = divmod(size, count)
        starts = [div * i + min(i, mod) for i in range(count)]
        return [range(start, start + div + (1 if i < mod else 0)) for i, start in enumerate(starts)]
    partitioner.load_partition(0)  # determines every partition's positions (and checks the options)
    chosen = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(chosen, dict) or sorted(chosen) != list(range(count)):
        return None
    return [chosen[i] for i in range(count)]


def _papers_dirichlet(labels, num_clients, seed, size_alpha=1.0, class_alpha=0.5, fraction=1.0):
    """The reference code's Dirichlet split, draw for draw (docs/data.md).

    p ~ Dir(size_alpha) over clients, then one class mix c_k ~ Dir(class_alpha) per client; class j
    goes to client k in proportion to w_kj = p_k c_kj. For each class in order its rows are
    shuffled and client k, in order, takes round(n_j w_kj / sum_k w_kj) of them from a running
    offset, where n_j = (rows of class j) * fraction, a float: the papers' "10% of the data" is
    taken per class here. A count of exactly 1 becomes 2 (as the reference does). A client's list
    is its per-class slices in class order.
    """
    draws = np.random.RandomState(seed)  # the reference seeds numpy's legacy global generator: same stream
    classes = np.unique(labels)
    sizes = draws.dirichlet([size_alpha] * num_clients)
    mixes = draws.dirichlet([class_alpha] * len(classes), num_clients)
    weights = sizes[:, None] * mixes
    norm = weights.sum(axis=0)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for j, cls in enumerate(classes):
        rows = np.flatnonzero(labels == cls)
        draws.shuffle(rows)
        share = len(rows) * fraction
        offset = 0
        for k in range(num_clients):
            count = int(round(share * weights[k, j] / norm[j]))
            count = 2 if count == 1 else count
            parts[k].append(rows[offset : offset + count])
            offset += count
    return [np.concatenate(p).astype(np.int64) for p in parts]


def _two_class(labels, num_clients, seed, classes_per_client=2, points_per_class=300, max_holders=0):
    """The reference code's MNIST split, draw for draw (docs/data.md).

    For each client in order: its first class is the least-used class so far (lowest on ties);
    each further class is drawn with ``choice(C, 1, replace=False)`` and redrawn while already
    chosen or held by ``max_holders`` clients (0: ceil(K * classes_per_client / C), the
    reference's 20 at K = 100, C = 10). Then for each class in order its rows are shuffled and
    its holders, in client order, take consecutive slices of ``points_per_class``; a slice that
    would run past the end is the last ``points_per_class`` rows instead, so a class with fewer
    rows than its holders need gives its last holders overlapping rows (MNIST's 5 at K = 100).
    A client's list is its slices in class order.
    """
    draws = np.random.RandomState(seed)  # as the reference: numpy's legacy generator, nothing else drawing
    classes = np.unique(labels)
    if classes_per_client > len(classes):
        raise ValueError(f"classes_per_client: {classes_per_client} > number of classes {len(classes)}")
    cap = max_holders or math.ceil(num_clients * classes_per_client / len(classes))
    uses = np.zeros(len(classes), dtype=np.int64)
    holders: list[list[int]] = [[] for _ in classes]
    for client in range(num_clients):
        chosen = [int(np.argmin(uses))]
        while len(chosen) < classes_per_client:
            if all(c in chosen or uses[c] >= cap for c in range(len(classes))):  # the reference would loop forever
                raise ValueError(
                    f"partition: two-class cannot give client {client} a class held by fewer than {cap} clients; "
                    "use fewer clients or a larger max_holders"
                )
            pick = int(draws.choice(len(classes), 1, replace=False)[0])
            while pick in chosen or uses[pick] >= cap:
                pick = int(draws.choice(len(classes), 1, replace=False)[0])
            chosen.append(pick)
        for c in chosen:
            uses[c] += 1
            holders[c].append(client)
    slices: list[dict[int, np.ndarray]] = [{} for _ in range(num_clients)]
    for j, cls in enumerate(classes):
        rows = np.flatnonzero(labels == cls)
        draws.shuffle(rows)
        for i, client in enumerate(holders[j]):
            start = i * points_per_class
            end = start + points_per_class
            slices[client][j] = rows[start:end] if end <= len(rows) else rows[-points_per_class:]
    return [np.concatenate([s[j] for j in sorted(s)]).astype(np.int64) for s in slices]


def _class_counts(labels: np.ndarray, num_clients: int, seed: int, counts: list[list[int]]) -> list[np.ndarray]:
    """``counts[j][k]`` rows of class j for client k: each class's rows in a seeded random order, dealt out in
    consecutive slices, client 0 first (rows beyond a class's total stay unused). A client's rows: its per-class
    slices in class order. ``ValueError`` naming ``class_counts`` where the counts do not fit the data."""
    classes = int(labels.max()) + 1 if len(labels) else 0
    if len(counts) != classes:
        raise ValueError(f"class_counts: {len(counts)} classes given, the data has {classes}")
    for j, row in enumerate(counts):
        available = int((labels == j).sum())
        if len(row) != num_clients:
            raise ValueError(f"class_counts: class {j} gives {len(row)} clients' counts, num_clients is {num_clients}")
        if sum(row) > available:
            raise ValueError(f"class_counts: class {j} asks for {sum(row)} rows, the data has {available}")
    rng = np.random.RandomState(seed)
    slices: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for j, row in enumerate(counts):
        rows = rng.permutation(np.flatnonzero(labels == j))
        ends = np.cumsum(row)
        for k, (end, count) in enumerate(zip(ends, row)):
            slices[k].append(rows[end - count : end])
    return [np.concatenate(parts).astype(np.int64) for parts in slices]


def parse_class_counts(text: str) -> list[list[int]]:
    """``"28*10; 23*3,24*7"`` -> one list of client counts per class (classes separated by ``;``, clients by
    ``,``; ``N*R``: N repeated R times). ``ValueError`` naming ``class_counts`` on anything else."""
    counts = []
    for part in text.split(";"):
        row = []
        for item in part.split(","):
            item = item.strip()
            value, _, repeat = item.partition("*")
            try:
                number, times = int(value), int(repeat) if repeat else 1
            except ValueError:
                raise ValueError(f"class_counts: expected counts like '28*10; 23*3,24*7', got {item!r}") from None
            if number < 0 or times < 1:
                raise ValueError(f"class_counts: counts must be >= 0 and repeats >= 1, got {item!r}")
            row += [number] * times
        counts.append(row)
    return counts


SCHEMES = (
    "iid", "dirichlet", "inner-dirichlet", "pathological", "shard", "natural", "size", "papers-dirichlet", "two-class",
    "class-counts",
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
    if scheme == "papers-dirichlet":
        return _papers_dirichlet(labels, num_clients, seed, **options)
    if scheme == "two-class":
        return _two_class(labels, num_clients, seed, **options)
    if scheme == "class-counts":
        return _class_counts(labels, num_clients, seed, **options)
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
