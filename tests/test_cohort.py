"""The cohort engine (engine = "vectorised", fedvb.core.cohort) gives the per-client loop's numbers to float
tolerance, for every algorithm whose local training it vectorises, through the plain-loop driver and through
the Flower path."""

import json

import numpy as np
import pytest
import torch

import fedvb.core.cohort as cohort
from fedvb.backends import run
from fedvb.config import RunConfig
from fedvb.core.driver import run_algorithm
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer, partition_sizes, round_lr

# Batched products and the fused Adam kernel over one stacked buffer round differently from their per-client
# counterparts (float32 training): 1e-4 relative on the server after three rounds is ~1000 float32 epsilons,
# far below what one step's bug moves (a lost step, a wrong batch, another client's noise: >1e-2 here).
TOLERANCE = 1e-4
VECTORISED = ("fedavg", "fedprox", "feddyn", "fedadmm", "scaffold", "fedlap", "ivon-admm", "pvi")


def config_for(strategy: str, **changes) -> RunConfig:
    """Digits, a small MLP, 8 clients of unequal sizes (the papers' split), 2 local epochs: clients whose last
    batches are short and whose step counts differ, so padding and each client's own end are exercised."""
    values = dict(strategy=strategy, rounds=3, num_clients=8, model="mlp", hidden="32", local_epochs=2, lr=0.005,
                  batch_size=32, workers=1, partition="papers-dirichlet", seed=0)  # fmt: skip
    values.update(changes)
    return RunConfig.from_mapping(values)


def driver_run(config: RunConfig, engine: str) -> tuple[dict, cohort.CohortEngine | None]:
    engines = []
    original = cohort.CohortEngine.__init__

    def keep(self):  # the engines the run made, to ask what they vectorised
        original(self)
        engines.append(self)

    cohort.CohortEngine.__init__ = keep
    try:
        algorithm = make_algorithm(config)
        server = run_algorithm(
            algorithm, [make_trainer(config, k) for k in range(config.num_clients)], config.rounds,
            initial_mean(config), generator_for=lambda r, k: client_generator(config, r, k),
            fraction=config.fraction_train, seed=config.seed, lr_for=lambda r: round_lr(config, r), engine=engine,
        )  # fmt: skip
    finally:
        cohort.CohortEngine.__init__ = original
    return server.arrays, engines


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("strategy", VECTORISED)
def test_every_vectorised_algorithm_gives_the_loops_numbers(strategy):
    config = config_for(strategy, fraction_train=0.75)  # partial participation: the cohort changes by round
    assert len(set(partition_sizes(config).values())) > 4  # unequal clients
    looped, _ = driver_run(config, "loop")
    together, engines = driver_run(config, "vectorised")
    assert engines and all(e.vectorised > 0 and not e.alone for e in engines)  # every local training vectorised
    for name, value in looped.items():
        if value.numel() > 1:
            assert relative(together[name], value) < TOLERANCE, name
    assert relative(looped["mean"], initial_mean(config)) > 1e-2  # it trained


@pytest.mark.parametrize(
    "strategy, changes",
    [
        ("ivon-admm", {"ivon_mc_samples": 2}),  # the averages over Monte Carlo samples
        ("ivon-admm", {"ivon_kernel": "torch"}),  # torch's kernels instead of the native ones
        ("ivon-admm", {"ivon_clip_radius": 1e-3}),  # IVON's steps clipped (the native kernels)
        ("ivon-admm", {"ivon_clip_radius": 1e-3, "ivon_kernel": "torch"}),  # and torch's
        ("fedavg", {"optimizer": "sgd", "batch_size": 7}),  # SGD; most batches short of the batch size at the end
        ("fedprox", {"optimizer_state": "kept"}),  # Adam carried across rounds: each client trains alone
    ],
    ids=["ivon-two-samples", "ivon-torch-kernels", "ivon-clipped", "ivon-clipped-torch", "sgd-odd-batch", "kept-adam"],
)
def test_the_loops_numbers_under_other_settings(strategy, changes):
    config = config_for(strategy, **changes)
    looped, _ = driver_run(config, "loop")
    together, _ = driver_run(config, "vectorised")
    assert relative(together["mean"], looped["mean"]) < TOLERANCE
    if "ivon_clip_radius" in changes:  # the clip engaged: the run differs from the unclipped one
        unclipped, _ = driver_run(config.replace(ivon_clip_radius=0.0), "loop")
        assert relative(looped["mean"], unclipped["mean"]) > 100 * TOLERANCE


def test_a_coupled_penalty_trains_client_by_client_inside_the_engine():
    """FedLap-KFAC's cavity is a Kronecker-factored penalty: its MAP runs on each client's own trainer, the
    engine says so, and the numbers are the loop's exactly (the same computation)."""
    config = config_for("fedlap-kfac", damping=0.1, rounds=2)
    looped, _ = driver_run(config, "loop")
    together, engines = driver_run(config, "vectorised")
    assert all(e.vectorised == 0 and list(e.alone) == ["its penalty is kronecker, not coordinate-wise"]
               for e in engines)  # fmt: skip
    assert torch.equal(together["mean"], looped["mean"])


def test_a_failing_client_is_an_error_reply_and_the_others_train_on():
    engine = cohort.CohortEngine()
    config = config_for("fedavg")
    trainers = [make_trainer(config, k) for k in range(3)]
    start = initial_mean(config).float()

    def train(member):
        return member.map(start, None, generator=torch.Generator().manual_seed(0))

    def fail(member):
        raise RuntimeError("this client fails")

    results = engine.run([train, fail, train], trainers)
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "this client fails"
    alone = trainers[0].map(start, None, generator=torch.Generator().manual_seed(0))
    assert relative(results[0], alone) < 1e-5


def run_folder(tmp_path, name: str, **changes) -> tuple[list[dict], np.ndarray]:
    config = config_for("ivon-admm", out=str(tmp_path / name), **changes)
    run(config)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    with np.load(tmp_path / name / "posterior.npz") as z:
        return rows, z["mean"]


def test_the_flower_path_with_the_vectorised_engine_gives_the_loops_run(tmp_path):
    """`fedvb run --set engine=vectorised` against the loop, in chunks of 3 clients and whole; a client that
    raises (an injected fault) is a rejected reply as under the loop."""
    faults = "raise=0.2"
    loop_rows, loop_mean = run_folder(tmp_path, "loop", faults=faults)
    for name, chunk in (("whole", 0), ("chunks", 3)):
        rows, mean = run_folder(tmp_path, name, engine="vectorised", cohort_chunk=chunk, faults=faults)
        assert np.linalg.norm(mean - loop_mean) <= TOLERANCE * np.linalg.norm(loop_mean)
        assert [len(r["rejected"]) for r in rows] == [len(r["rejected"]) for r in loop_rows]
        assert sum(len(r["rejected"]) for r in rows) > 0  # the fault struck
        for row, expected in zip(rows, loop_rows):
            assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=0.01)
