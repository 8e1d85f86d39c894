"""The Flower path (strategies, ClientApp, ServerApp) reproduces the core's plain-loop driver."""

import json

import numpy as np
import pytest
import torch

from fedvb.backends import run
from fedvb.config import BAYES_ADMM, STRATEGIES, RunConfig
from fedvb.core.driver import run_algorithm
from fedvb.core.gaussian import DIAGONAL
from fedvb.core.registry import ALGORITHMS
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer, partition_sizes, round_lr
from fedvb.records import join_reply, split_reply, widened


def small_config(strategy: str, tmp_path, **changes) -> RunConfig:
    values = dict(
        strategy=strategy,
        dataset="synthetic-logistic",
        model="softmax",
        num_clients=5,
        rounds=3,
        out=str(tmp_path / strategy),
        lr=0.05 if strategy in ("scaffold", "ivon-admm") else 0.02,
        local_epochs=2,
        batch_size=16,
        eval_samples=0,
        func_inputs=20,
    )
    if strategy == "ivon-admm":
        values.update(lr=0.002, ivon_beta2=0.999)
    values.update(changes)
    return RunConfig.from_mapping(values)


def plain_loop_mean(config: RunConfig) -> np.ndarray:
    algorithm = make_algorithm(config)
    trainers = [make_trainer(config, k) for k in range(config.num_clients)]
    server = run_algorithm(
        algorithm,
        trainers,
        config.rounds,
        initial_mean(config),
        generator_for=lambda r, k: client_generator(config, r, k),
        fraction=config.fraction_train,
        seed=config.seed,
        lr_for=lambda r: round_lr(config, r),
    )
    return algorithm.server_mean(server).numpy()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inprocess_flower_run_matches_the_plain_loop(strategy, tmp_path):
    config = small_config(strategy, tmp_path)
    run(config)
    with np.load(tmp_path / strategy / "posterior.npz") as z:
        flower_mean = z["mean"]
        has_precision = "precision" in z.files
    expected = plain_loop_mean(config)
    assert np.linalg.norm(flower_mean - expected) <= 1e-6 * max(1.0, np.linalg.norm(expected))
    assert np.linalg.norm(expected - initial_mean(config).numpy()) > 1e-3  # it trained
    assert has_precision == (strategy not in ("fedavg", "fedprox", "feddyn", "fedadmm", "scaffold"))
    assert (tmp_path / strategy / "summary.json").exists()
    rows = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all({"accuracy", "nll", "wall_time_s"} <= set(r) for r in rows)


@pytest.mark.parametrize("strategy", ["fedavg", "ivon-admm", "scaffold"])
def test_partial_participation_matches_the_plain_loop(strategy, tmp_path):
    config = small_config(strategy, tmp_path, fraction_train=0.6, rounds=4)
    run(config)
    with np.load(tmp_path / strategy / "posterior.npz") as z:
        np.testing.assert_allclose(z["mean"], plain_loop_mean(config), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["fedavg", "ivon-admm", "scaffold", "fedlap-cov"])
def test_a_cosine_learning_rate_schedule_over_flower_matches_the_plain_loop(strategy, tmp_path):
    config = small_config(strategy, tmp_path, lr_schedule="cosine", rounds=3)
    run(config)
    with np.load(tmp_path / strategy / "posterior.npz") as z:
        np.testing.assert_allclose(z["mean"], plain_loop_mean(config), rtol=1e-6, atol=1e-7)
        scheduled = z["mean"]
    # rounds 2 and 3 trained with 3/4 and 1/4 of lr: not the constant-lr run
    assert np.linalg.norm(scheduled - plain_loop_mean(config.replace(lr_schedule="constant"))) > 1e-6


# the coordinate-wise combinations are refused for families that are not coordinate-wise (dense, Kronecker)
COORDINATEWISE = [s for s in STRATEGIES if s in BAYES_ADMM and (ALGORITHMS[s].family or DIAGONAL).coordinatewise]


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in BAYES_ADMM or s in COORDINATEWISE])
@pytest.mark.parametrize("combine", ["trimmed", "median"])
def test_robust_combinations_over_flower_match_the_plain_loop_and_differ_from_the_mean(strategy, combine, tmp_path):
    config = small_config(strategy, tmp_path, combine=combine, rounds=2)
    run(config)
    with np.load(tmp_path / strategy / "posterior.npz") as z:
        np.testing.assert_allclose(z["mean"], plain_loop_mean(config), rtol=1e-6, atol=1e-7)
        robust = z["mean"]
    # the combination is used: on 5 heterogeneous clients it is not the plain average
    assert np.linalg.norm(robust - plain_loop_mean(config.replace(combine="mean"))) > 1e-6


def test_library_code_leaves_torchs_thread_count_alone(tmp_path):
    """Only fedvb's entry points (the CLI, flwr run's apps, its Ray actors) pin one thread per process; a
    user's own program that runs fedvb keeps its own setting."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run(small_config("fedavg", tmp_path, rounds=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bayes_admm_newton_over_flower_is_exact_on_linear_regression(tmp_path):
    """One round of the dense Newton variant with rho = 1/K and gamma = 1 (docs/algorithms.md §3) gives the exact
    posterior, through Flower."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(60)
    client = np.repeat(np.arange(4), 15)
    np.savez(tmp_path / "data.npz", x=x, y=y, client=client, x_test=x[:10], y_test=y[:10])
    config = RunConfig.from_mapping(
        dict(strategy="bayes-admm-newton", data=str(tmp_path / "data.npz"), model="linear", num_clients=4,
             rounds=1, rho=0.25, damping=1.0, prior_precision=2.0, out=str(tmp_path / "run"), eval_samples=0,
             local_test_fraction=0.0)
    )  # fmt: skip
    run(config)
    precision = 2.0 * np.eye(3) + x.T @ x  # float64 data stays float64: the exact float64 posterior
    mean = np.linalg.solve(precision, x.T @ y)
    with np.load(tmp_path / "run" / "posterior.npz") as z:
        np.testing.assert_allclose(z["precision"], precision, rtol=1e-10)
        np.testing.assert_allclose(z["mean"], mean, rtol=1e-10)


def test_a_failing_client_is_skipped_and_the_run_completes(tmp_path, monkeypatch):
    from fedvb.core import algorithms

    original = algorithms.FedProx.client_round
    config = small_config("fedprox", tmp_path).replace(workers=1)  # the patch is in this process's clients
    sizes = partition_sizes(config)
    assert sizes[0] < min(sizes[k] for k in sizes if k)  # client 0 is the one with fewest rows

    def flaky(self, payload, state, trainer, *, generator):
        if trainer.num_examples == sizes[0]:
            raise RuntimeError("boom")
        return original(self, payload, state, trainer, generator=generator)

    monkeypatch.setattr(algorithms.FedProx, "client_round", flaky)
    run(config)
    rows = [json.loads(line) for line in (tmp_path / "fedprox" / "metrics.jsonl").read_text().splitlines()]
    assert all(any(e["client"] == 0 for e in row["rejected"]) for row in rows)  # the patch struck
    assert (tmp_path / "fedprox" / "summary.json").exists()
    with np.load(tmp_path / "fedprox" / "posterior.npz") as z:
        assert np.isfinite(z["mean"]).all()


def test_flowers_own_start_loop_runs_a_fedvb_strategy(tmp_path):
    """The README's own-app recipe: Flower's Strategy.start drives our strategy to the plain loop's numbers."""
    from fedvb.backends import InProcessGrid, act_as_server
    from fedvb.clients.app import make_client_app
    from fedvb.strategies import make_strategy

    config = small_config("ivon-admm", tmp_path)
    grid = InProcessGrid(make_client_app(), config.num_clients, seed=3)
    act_as_server(grid)
    strategy = make_strategy(config)
    strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=config.rounds)
    np.testing.assert_allclose(strategy.mean().numpy(), plain_loop_mean(config), rtol=1e-6, atol=1e-7)
    assert strategy.posterior() is not None and len(strategy.client_store) == config.num_clients


def test_an_inprocess_round_holds_one_message_at_a_time_and_the_screen_keeps_none(tmp_path):
    """Messages are built as the grid sends them and replies taken as they come (memory follows one client,
    not the cohort); the numbers are those of Flower's own loop over a list (the test above)."""
    import gc

    from flwr.app import ArrayRecord, ConfigRecord, Message

    from fedvb.backends import InProcessGrid, act_as_server
    from fedvb.clients.app import make_client_app
    from fedvb.records import to_array_record
    from fedvb.strategies import make_strategy

    config = small_config("ivon-admm", tmp_path)
    grid = InProcessGrid(make_client_app(), config.num_clients, seed=3)
    act_as_server(grid)
    strategy = make_strategy(config)
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord({"attempt": 0}), grid)
    assert len(messages) == config.num_clients

    def with_payload() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, Message) and "payload" in o.content)

    replies, held = grid.send_and_receive(messages), []

    def watched():
        for reply in replies:
            held.append(with_payload())
            yield reply

    strategy.aggregate_train(1, watched())
    assert held == [1] * config.num_clients  # the message just answered, alone: the next is not built yet
    assert len(strategy.client_store) == config.num_clients and strategy.round_log["rejected"] == []
    payload = strategy.algorithm.payload(strategy.server)  # the next round's: the same tensors, new values
    assert strategy.round_log["bytes_down"] == config.num_clients * to_array_record(payload).count_bytes()


def test_a_reply_goes_in_float32_only_where_float32_holds_it_exactly_and_comes_back_as_sent():
    exact = torch.randn(1000, generator=torch.Generator().manual_seed(0)).double()  # a float32 model's posterior
    inexact = exact / 3  # a float64 solver's
    arrays, metrics = split_reply({"mean": exact, "precision": inexact, "num_examples": torch.tensor(7.0)}, 3)
    assert (arrays["mean"].dtype, arrays["precision"].dtype) == ("float32", "float64")
    back = join_reply(arrays, metrics, dtype=torch.float64)
    assert back["mean"].dtype == back["precision"].dtype == torch.float64
    assert torch.equal(back["mean"], exact) and torch.equal(back["precision"], inexact)
    assert float(back["num_examples"]) == 7.0
    # only float32 is widened, and only to a float64 server: a float16 reply (a fault) reaches the screen as sent
    assert widened({"mean": exact.half()}, torch.float64)["mean"].dtype == torch.float16
    assert widened({"mean": exact.float()}, torch.float32)["mean"].dtype == torch.float32


def test_shared_client_streams_give_clients_of_the_same_rows_the_same_reply_on_every_backend(tmp_path):
    """client_streams = "shared" (the papers' code reseeds each client's training with the run seed): two
    clients holding the same rows reply the same, to the bit, where their own streams make them differ; and
    a Flower run with it is the plain loop's."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 4)).astype(np.float32)
    labels = (rows[:, 0] > 0).astype(np.int64)
    x = np.concatenate([rows, rows, rng.standard_normal((40, 4)).astype(np.float32)])
    y = np.concatenate([labels, labels, (x[80:, 1] > 0).astype(np.int64)])
    np.savez(tmp_path / "data.npz", x=x, y=y, client=np.repeat([0, 1, 2], 40), x_test=x[:20], y_test=y[:20])
    config = RunConfig.from_mapping(
        dict(strategy="ivon-admm", data=str(tmp_path / "data.npz"), model="logreg", num_clients=3, rounds=2,
             lr=0.01, local_epochs=2, batch_size=8, eval_samples=0, client_streams="shared",
             out=str(tmp_path / "run"))
    )  # fmt: skip

    def first_replies(config: RunConfig) -> list[torch.Tensor]:
        algorithm = make_algorithm(config)
        payload = algorithm.payload(algorithm.init_server(initial_mean(config), config.num_clients))
        streams = [client_generator(config, 1, k) for k in (0, 1)]
        replies = [algorithm.client_round(payload, {}, make_trainer(config, k), generator=streams[k]) for k in (0, 1)]
        return [reply["mean"] for reply, _ in replies]

    shared = first_replies(config)
    assert torch.equal(shared[0], shared[1])
    own = first_replies(config.replace(client_streams="independent"))
    assert not torch.allclose(own[0], own[1], atol=1e-4)
    run(config)
    with np.load(tmp_path / "run" / "posterior.npz") as z:
        np.testing.assert_allclose(z["mean"], plain_loop_mean(config), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_a_kept_adam_state_over_flowers_fedavg_matches_the_plain_loop(strategy, tmp_path):
    """optimizer_state = "kept" with the strategies that hand their replies to Flower's own FedAvg (which takes
    exactly one ArrayRecord a message): the client's state travels beside the reply and the run is the loop's."""
    config = small_config(strategy, tmp_path, optimizer_state="kept")
    run(config)
    with np.load(tmp_path / strategy / "posterior.npz") as z:
        np.testing.assert_allclose(z["mean"], plain_loop_mean(config), rtol=1e-6, atol=1e-7)
        kept = z["mean"]
    assert np.linalg.norm(kept - plain_loop_mean(config.replace(optimizer_state="fresh"))) > 1e-6
