"""The client store (fedvb.core.client_store): both stores answer alike, a disk store's checkpoint survives
any later write a crash cuts short, a round writes only its cohort's rows, and the server's running site sum
stays the exact sum over every client."""

import json
from pathlib import Path

import pytest
import torch

from fedvb.cli import main
from fedvb.core.algorithms import BayesADMM
from fedvb.core.client_store import DiskStore, MemoryStore, SitesView, restore_store
from fedvb.core.driver import sample_participants
from fedvb.core.gaussian import DIAGONAL, Gaussian, NaturalParams, sum_natural
from fedvb.core.registry import preset


def random_state(generator: torch.Generator, *, with_momentum: bool = True) -> dict[str, torch.Tensor]:
    state = {"site_linear": torch.randn(7, generator=generator, dtype=torch.float64),
             "site_quadratic": torch.rand(7, generator=generator, dtype=torch.float64)}  # fmt: skip
    if with_momentum:
        state["momentum"] = torch.randn(3, 2, generator=generator)
    return state


def make_store(kind: str, folder: Path, num_clients: int = 6):
    return MemoryStore() if kind == "memory" else DiskStore(folder / "clients", num_clients)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_both_stores_give_back_what_was_put_and_restore_from_their_manifest(kind, tmp_path):
    g = torch.Generator().manual_seed(0)
    store = make_store(kind, tmp_path)
    states = {1: random_state(g), 4: random_state(g, with_momentum=False), 2: random_state(g)}
    for client, state in states.items():
        store.put(client, state)
    assert store.clients() == [1, 2, 4] and store.clients_with("momentum") == [1, 2] and len(store) == 3
    assert store.has(4, "site_linear") and not store.has(4, "momentum") and 3 not in store and store.get(3) == {}
    manifest = store.checkpoint()
    store.close()
    again = restore_store(manifest, tmp_path)
    for client, state in states.items():
        got = again.get(client)
        assert got.keys() == state.keys()
        for name, tensor in state.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)  # bit for bit
    again.put(4, random_state(g))  # a key it did not have, later
    assert again.has(4, "momentum")
    sites = SitesView(again, DIAGONAL)
    assert sorted(sites) == [1, 2, 4] and 4 in sites and 0 not in sites
    assert torch.equal(sites[1].linear, states[1]["site_linear"])
    with pytest.raises(KeyError):
        sites[0]
    again.close()


def test_a_disk_checkpoint_is_untouched_by_the_rows_of_a_round_that_never_checkpointed(tmp_path):
    """Shadow rows: a kill after a round wrote some rows but before its checkpoint leaves the last checkpoint's
    states readable exactly, however often the round rewrote them."""
    g = torch.Generator().manual_seed(1)
    store = DiskStore(tmp_path / "clients", 5)

    def assert_restores(manifest, expected):
        restored = restore_store(manifest, tmp_path)
        for k, state in expected.items():
            assert all(torch.equal(restored.get(k)[n], t) for n, t in state.items()), k
        restored.close()

    first = {k: random_state(g) for k in range(5)}
    for k, state in first.items():
        store.put(k, state)
    manifest = store.checkpoint()
    second = {k: random_state(g) for k in (0, 3)}
    for k, state in second.items():  # a round that "dies" before its checkpoint: written twice
        store.put(k, random_state(g))
        store.put(k, state)
    assert_restores(manifest, first)
    middle = store.checkpoint()
    for k in (0, 3, 4):  # and the next one
        store.put(k, random_state(g))
    store.close()
    assert_restores(middle, {**first, **second})


def test_a_disk_store_writes_only_the_rows_it_is_given_and_refuses_what_does_not_fit(tmp_path):
    store = DiskStore(tmp_path / "clients", 1000)
    g = torch.Generator().manual_seed(2)
    big = {"site_linear": torch.randn(4096, generator=g, dtype=torch.float64),
           "momentum": torch.randn(4096, generator=g)}  # fmt: skip
    row = sum(t.numel() * t.element_size() for t in big.values())
    for k in (5, 500, 999):
        store.put(k, big)
    assert store.take_bytes_written() == 3 * row and store.take_bytes_written() == 0
    # sparse files: the disk holds what was written, not 1000 clients x 2 slots
    used = sum(p.stat().st_blocks * 512 for p in (tmp_path / "clients").iterdir())
    assert used < 100 * row, used
    with pytest.raises(ValueError, match="site_linear"):
        store.put(5, {"site_linear": torch.zeros(8, dtype=torch.float64)})  # another shape than its rows
    with pytest.raises(KeyError):
        store.put(1000, big)
    with pytest.raises(ValueError, match="identifier"):
        store.put(6, {"../escape": torch.zeros(1)})
    manifest = store.checkpoint()
    store.close()
    with pytest.raises(ValueError, match="plain name"):
        restore_store({**manifest, "folder": "../elsewhere"}, tmp_path)


def test_the_running_site_sum_stays_the_exact_sum_over_every_client(tmp_path):
    """200 rounds of random replies from a 30% cohort of 40 clients (sites over the disk store): the server's
    running total equals the sum of every client's site to 1e-12 of its size, and a full cohort's round
    recomputes it exactly."""
    num_clients, dim = 40, 50
    algorithm = BayesADMM(preset("ivon-admm", rho=0.3, damping=0.5), prior_precision=1.0)
    store = DiskStore(tmp_path / "clients", num_clients)
    server = algorithm.attach(algorithm.init_server(torch.zeros(dim, dtype=torch.float64), num_clients), store)
    g = torch.Generator().manual_seed(3)

    def exact_sum():
        return sum_natural([server.sites[k] for k in sorted(server.sites)])

    for server_round in range(1, 201):
        fraction = 1.0 if server_round % 50 == 0 else 0.3
        cohort = sample_participants(num_clients, fraction, seed=0, server_round=server_round)
        replies, states = {}, {}
        for k in cohort:
            posterior = Gaussian(server.arrays["mean"] + 0.1 * torch.randn(dim, generator=g, dtype=torch.float64),
                                 server.arrays["precision"] * (1 + torch.rand(dim, generator=g, dtype=torch.float64)),
                                 algorithm.preset.family)  # fmt: skip
            replies[k] = {"mean": posterior.mean, "precision": posterior.precision, "num_examples": torch.tensor(10.0)}
            states[k] = {}  # the server sets each client's site
        server = algorithm.commit(algorithm.server_round(server, replies, num_clients), states, store)
        running = NaturalParams(server.arrays["_site_sum_linear"], server.arrays["_site_sum_quadratic"], DIAGONAL)
        exact = exact_sum()
        if fraction == 1.0:  # recomputed: the same sum, bit for bit
            assert torch.equal(running.linear, exact.linear) and torch.equal(running.quadratic, exact.quadratic)
        for part in ("linear", "quadratic"):
            got, want = getattr(running, part), getattr(exact, part)
            assert (got - want).abs().max() <= 1e-12 * want.abs().max(), (server_round, part)
    store.close()


def test_a_run_folder_keeps_the_clients_in_rows_and_a_round_writes_only_its_cohort(tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        "--strategy",
        "ivon-admm",
        "--dataset",
        "digits",
        "--model",
        "softmax",
        "--num-clients",
        "8",
        "--rounds",
        "3",
        "--set",
        "fraction_train=0.5",
        "--set",
        "eval_samples=0",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dim = 64 * 10 + 10
    # a cohort of 4: its sites (2 x dim float64) and IVON's state per client, nothing of the other four
    per_client = {row["state_bytes_written"] / 4 for row in rows}
    assert len(per_client) == 1 and per_client.pop() >= 16 * dim
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["strategy"]["client_store"]["kind"] == "disk"
    assert (out / "checkpoint.pt").stat().st_size < 6 * 8 * dim + 100_000  # the server's tensors, not 8 clients'
