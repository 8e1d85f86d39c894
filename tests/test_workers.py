"""The in-process backend's worker processes (fedvb.workers): the same numbers as one worker, bit for bit, for
every algorithm and under faults; the data shared, not reloaded; a dead worker answered for and replaced; a
late client dropped without holding up the round's other clients."""

import json
import os
import signal
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvb.backends import InProcessGrid, act_as_server, run, worker_count
from fedvb.config import STRATEGIES, RunConfig
from fedvb.experiment import adopt_prepared, prepare, share_prepared
from fedvb.workers import WorkerPool

TIMING = ("train_time_s", "wall_time_s", "elapsed_s")


def rows(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def posterior(folder) -> dict[str, np.ndarray]:
    with np.load(folder / "posterior.npz") as z:
        return {k: z[k] for k in z.files}


def assert_same_run(one, two) -> None:
    assert rows(one) == rows(two)
    a, b = posterior(one), posterior(two)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def config_for(strategy: str, tmp_path, **changes) -> RunConfig:
    values = dict(strategy=strategy, dataset="digits", num_clients=5, rounds=2, seed=3, local_epochs=1,
                  eval_samples=4, func_inputs=40)  # fmt: skip
    return RunConfig.from_mapping({**values, **changes, "out": str(tmp_path / strategy)})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_workers_give_one_workers_numbers_bit_for_bit(strategy, tmp_path):
    config = config_for(strategy, tmp_path)
    if strategy == "bayes-admm-newton":  # the exact solver: softmax regression
        config = config.replace(model="softmax")
    run(config.replace(workers=1, out=str(tmp_path / "one")))
    run(config.replace(workers=2, out=str(tmp_path / "two")))
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("strategy", ["fedavg", "ivon-admm"])
def test_a_model_with_dropout_gives_the_same_numbers_on_one_worker_and_two(strategy, tmp_path):
    """Dropout draws from torch's global stream, shared by the clients a worker runs: each client's training
    seeds it from the client's own stream (it once followed the order clients met a worker in)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    x = (rng.standard_normal((200, 1, 10, 10)) + y.reshape(-1, 1, 1, 1)).astype(np.float32)
    np.savez(tmp_path / "images.npz", x=x[:150], y=y[:150], client=np.arange(150) % 4, x_test=x[150:], y_test=y[150:])
    config = config_for(strategy, tmp_path, data=str(tmp_path / "images.npz"), model="zenke-cnn", num_clients=4)
    run(config.replace(workers=1, out=str(tmp_path / "one")))
    run(config.replace(workers=2, out=str(tmp_path / "two")))
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("strategy", ["feddyn", "fedlap"])
def test_a_kept_adam_state_travels_with_the_client_and_gives_the_same_numbers_on_two_workers(strategy, tmp_path):
    """optimizer_state = "kept": each client's Adam state goes out with its message and back in its state, is
    kept in the run folder's client rows beside the algorithm's own state (FedDyn's g, FedLap's site), and
    changes the numbers from a fresh Adam's; one worker and two agree bit for bit."""
    config = config_for(strategy, tmp_path, rounds=3, optimizer_state="kept")
    run(config.replace(workers=1, out=str(tmp_path / "one")))
    run(config.replace(workers=2, out=str(tmp_path / "two")))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert {"adam_step.bin", "adam_exp_avg.bin", "adam_exp_avg_sq.bin"} <= {
        p.name for p in (tmp_path / "two" / "clients").iterdir()
    }
    run(config.replace(optimizer_state="fresh", workers=1, out=str(tmp_path / "fresh")))
    fresh, kept = rows(tmp_path / "fresh"), rows(tmp_path / "one")
    assert fresh[0]["nll"] == kept[0]["nll"]  # round 1: nothing carried yet
    assert fresh[-1]["nll"] != kept[-1]["nll"]
    assert kept[0]["state_bytes_written"] > fresh[0]["state_bytes_written"]  # the Adam rows


def test_faults_and_a_sampled_cohort_give_the_same_numbers_on_two_workers(tmp_path):
    config = config_for("ivon-admm", tmp_path, num_clients=8, rounds=4, fraction_train=0.5,
                        faults="raise=0.3,nan=0.1,timeout=0.15", client_timeout_s=3.0)  # fmt: skip
    run(config.replace(workers=1, out=str(tmp_path / "one")))
    run(config.replace(workers=2, out=str(tmp_path / "two")))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    lost = [entry for row in rows(tmp_path / "two") for entry in row["rejected"]]
    assert any("no reply" in e["reason"] for e in lost) and any("client error" in e["reason"] for e in lost), lost


def test_how_many_workers_a_run_gets():
    config = RunConfig(num_clients=10)
    cores = len(os.sched_getaffinity(0))
    assert worker_count(config) == min(cores, 10)
    assert worker_count(config.replace(workers=3, fraction_train=0.2)) == 2  # never more than a round's clients
    assert worker_count(config.replace(device="cuda")) == 1
    assert worker_count(config.replace(workers=1)) == 1


def test_a_worker_adopts_the_servers_data_from_shared_memory():
    config = RunConfig(strategy="fedlap-func", dataset="digits", num_clients=4, func_inputs=30)
    prepared = prepare(config)
    shared, payload = share_prepared(config)
    try:
        adopt_prepared(payload)  # as a worker does, here in this process
        adopted = prepare(config)
        assert adopted is not prepared
        for name in ("x_train", "y_train", "x_test", "y_test"):
            view = getattr(adopted.dataset, name)
            assert np.array_equal(view, getattr(prepared.dataset, name)) and not view.flags.writeable
        assert np.array_equal(adopted.unlabelled, prepared.unlabelled)
        assert all(np.array_equal(a, b) for a, b in zip(adopted.parts, prepared.parts, strict=True))
    finally:
        from fedvb import experiment, workers

        experiment._ADOPTED.clear()
        adopted = view = None  # its views go before the blocks close
        for block in workers._ATTACHED:  # this process is no worker: close what it attached, then unlink
            block.close()
        workers._ATTACHED.clear()
        shared.close()


# -- the pool itself, on a ClientApp that obeys its message ---------------------------------------------------


def obedient_app() -> ClientApp:
    """Replies with its process id; ``"sleep"`` seconds first; ``"die"`` kills its own process."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        order = msg.content["config"]
        if order["die"]:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(order["sleep"]))
        context.state["seen"] = MetricRecord({"count": int(context.state.get("seen", {}).get("count", 0)) + 1})
        return Message(RecordDict({"info": MetricRecord({"pid": os.getpid()})}), reply_to=msg)

    return app


def job(node: int, *, sleep: float = 0.0, die: bool = False, context: Context | None = None):
    act_as_server(InProcessGrid(obedient_app(), 1))  # Flower stamps a new message with its runtime's identity
    content = RecordDict({"config": ConfigRecord({"sleep": sleep, "die": die})})
    message = Message(content, dst_node_id=node, message_type="train")
    message.metadata.__dict__["_message_id"] = f"m{node}-{time.monotonic_ns()}"
    context = context or Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
    return message, context


@pytest.mark.timeout(120)
def test_a_dead_worker_is_answered_for_and_replaced():
    with WorkerPool(2, obedient_app) as pool:
        results = pool.run([job(1), job(2, die=True), job(3), job(4)])
        assert [r[0].has_error() for r in results] == [False, True, False, False]
        assert "died" in results[1][0].error.reason
        again = pool.run([job(5), job(6)])
        assert not any(r[0].has_error() for r in again) and pool.size == 2


@pytest.mark.timeout(120)
def test_a_late_client_is_dropped_and_the_others_run_on():
    with WorkerPool(2, obedient_app) as pool:
        pool.wait_ready()  # the deadline counts from a client's start on a worker, not from the workers' start-up
        started = time.monotonic()
        results = pool.run([job(1, sleep=6.0), job(2), job(3), job(4)], timeout=2.0)
        took = time.monotonic() - started
        assert results[0] is None and all(r is not None and not r[0].has_error() for r in results[1:])
        assert took < 5.0, took  # the round did not wait for the late client
        later = pool.run([job(5), job(6)])  # the late client's worker finishes it, then serves again
        assert all(not r[0].has_error() for r in later)


@pytest.mark.timeout(120)
def test_the_deadline_does_not_count_the_workers_start_up():
    with WorkerPool(2, obedient_app) as pool:  # fresh: its workers take seconds to import torch and Flower
        started = time.monotonic()
        results = pool.run([job(1), job(2), job(3)], timeout=0.5)
        assert time.monotonic() - started > 0.5  # the start-up was longer than the deadline
        assert all(r is not None and not r[0].has_error() for r in results)


@pytest.mark.timeout(120)
def test_a_nodes_context_travels_with_its_message_and_comes_back_updated():
    with WorkerPool(2, obedient_app) as pool:
        (_, context), _ = pool.run([job(1), job(2)])
        (_, context), = pool.run([job(1, context=context)])  # fmt: skip
        assert context.state["seen"]["count"] == 2


@pytest.mark.timeout(120)
def test_the_stream_takes_a_job_only_when_a_worker_is_free_and_answers_in_order():
    taken: list[int] = []

    def jobs():
        for node in range(1, 7):
            taken.append(node)
            yield job(node, sleep=0.3 if node != 2 else 0.0)  # the second is fast: its reply waits for the first

    with WorkerPool(2, obedient_app) as pool:
        pool.wait_ready()
        stream = pool.stream(jobs(), 6)
        first = next(stream)
        assert first[1].node_id == 1 and len(taken) <= 4  # in order; a job is built when a worker is free for it
        rest = list(stream)
        assert [context.node_id for _, context in rest] == [2, 3, 4, 5, 6] and taken == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(120)
def test_a_stream_stopped_early_leaves_the_pool_serving():
    with WorkerPool(2, obedient_app) as pool:
        stream = pool.stream(iter([job(1), job(2, sleep=1.0), job(3, sleep=1.0)]), 3)
        next(stream)
        stream.close()  # a consumer that gave up: its busy workers finish and their replies are discarded
        again = pool.run([job(4), job(5)])
        assert [context.node_id for _, context in again] == [4, 5] and not any(r.has_error() for r, _ in again)


@pytest.mark.timeout(60)
def test_client_threads_parse_one_at_a_time(monkeypatch):
    """CPython 3.11 builds Python AST objects with thread-unsafe state (gh-106905; fedvb.parsing): client threads
    decoding records (numpy parses each .npy header) and formatting error replies (traceback parses source lines)
    at once, as the vectorised engine's do, must parse one after another."""
    import ast
    import threading

    import torch

    from fedvb.records import from_array_record, to_array_record
    from fedvb.workers import error_reply

    inside, most, parses = [0], [0], [0]
    counting = threading.Lock()
    parse = ast.parse

    def watched(*args, **kwargs):
        with counting:
            inside[0] += 1
            parses[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.005)  # long enough for the other threads to arrive
        with counting:
            inside[0] -= 1
        return parse(*args, **kwargs)

    arrays = {f"w{i}": torch.arange(5.0) * i for i in range(3)}
    messages = {node: job(node)[0] for node in range(1, 4)}
    records = [to_array_record(arrays) for _ in range(3)]
    monkeypatch.setattr(ast, "parse", watched)
    start = threading.Barrier(6)
    decoded, replies = [], []

    def decode(record) -> None:
        start.wait(timeout=10)
        decoded.append(from_array_record(record))

    def fail(node: int) -> None:
        try:
            raise RuntimeError(f"client {node} fails")
        except RuntimeError as error:
            start.wait(timeout=10)
            replies.append(error_reply(messages[node], error))

    threads = [threading.Thread(target=decode, args=(r,)) for r in records]
    threads += [threading.Thread(target=fail, args=(node,)) for node in messages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert parses[0] >= 9 + 3 and most[0] == 1  # a parse per array header, at least one per traceback
    assert all(torch.equal(d[name], arrays[name]) for d in decoded for name in arrays) and len(decoded) == 3
    assert sorted(r.error.reason.split("\n")[0] for r in replies) == [f"RuntimeError: client {n} fails" for n in
                                                                      range(1, 4)]  # fmt: skip
