"""The ray backend, attached by address to a real local Ray cluster, gives the in-process numbers."""

import json
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fedvb.backends import run
from fedvb.config import RunConfig
from tests.processes import ray_head, session_pids


@pytest.fixture(scope="module")
def ray_head_info():
    """A Ray head on loopback in its own temp dir; only its own processes are stopped afterwards."""
    with ray_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def ray_cluster(ray_head_info):
    return ray_head_info["address"]


def completed(folder: Path) -> Path:
    """A run folder whose run finished: a stopped run (a lost cluster, say) is never compared."""
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] in ("completed", "completed_with_losses"), summary
    return folder


# Ray carries messages; what differs between strategies on the wire is the algorithm's tensors, so one strategy
# per kind of message: FedAvg (a mean; FedProx sends the same), FedDyn and FedADMM (client states, a delta),
# SCAFFOLD (a control variate down and up), FedLap-Cov (a posterior, the Laplace client; FedLap, FedLap-KFAC and
# the other BayesADMM presets send the same names), IVON-ADMM (IVON's state carried), FedLap-Func (soft labels)
# and the dense Newton variant (a matrix precision). Every strategy's two-worker run equals its one-worker run bit
# for bit (tests/test_workers.py), and its Flower run the plain loop (tests/test_flower.py).
ON_THE_WIRE = ("fedavg", "feddyn", "fedadmm", "scaffold", "fedlap-cov", "ivon-admm", "fedlap-func", "bayes-admm-newton")


@pytest.mark.parametrize("strategy", ON_THE_WIRE)
def test_ray_backend_attached_to_a_cluster_matches_inprocess(strategy, ray_cluster, tmp_path):
    values = dict(
        strategy=strategy, dataset="synthetic-logistic", model="softmax", num_clients=5, rounds=2,
        lr=0.002 if strategy == "ivon-admm" else 0.02, ivon_beta2=0.999, local_epochs=2, batch_size=16,
        eval_samples=0, func_inputs=20,
    )  # fmt: skip
    on_ray = RunConfig.from_mapping(
        {**values, "backend": "ray", "ray_address": ray_cluster, "out": str(tmp_path / "r")}
    )
    run(on_ray)
    run(on_ray.replace(backend="inprocess", ray_address="", out=str(tmp_path / "i")))
    on_ray_file, in_process_file = (completed(tmp_path / name) / "posterior.npz" for name in ("r", "i"))
    with np.load(on_ray_file) as a, np.load(in_process_file) as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-8)
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2


def metric_rows(folder: Path) -> list[dict]:
    """Every metric of every round, without timings, and rejections as counts (node ids differ by backend)."""
    rows = [json.loads(line) for line in (completed(folder) / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            **{k: v for k, v in r.items() if k not in ("train_time_s", "wall_time_s", "elapsed_s", "rejected")},
            "rejected": len(r["rejected"]),
        }
        for r in rows
    ]


def test_same_seed_same_metrics_for_any_worker_count_and_backend_with_faults(ray_cluster, tmp_path):
    """Two Ray workers, one Ray worker and the in-process backend give identical metrics, faults included
    (a raising client does not hang the Ray run: its error reply is rejected like any other)."""
    config = RunConfig.from_mapping(
        dict(strategy="ivon-admm", dataset="synthetic-logistic", model="softmax", num_clients=5, rounds=3,
             lr=0.002, ivon_beta2=0.999, local_epochs=2, batch_size=16, eval_samples=8,
             faults="raise=0.2,nan=0.2", backend="ray", ray_address=ray_cluster, out=str(tmp_path / "two"))
    )  # fmt: skip
    run(config)
    run(config.replace(client_cpus=2.0, out=str(tmp_path / "one")))
    run(config.replace(backend="inprocess", ray_address="", out=str(tmp_path / "inprocess")))
    two = metric_rows(tmp_path / "two")
    assert sum(r["rejected"] for r in two) > 0 and [r["round"] for r in two] == [1, 2, 3]
    assert two == metric_rows(tmp_path / "one") == metric_rows(tmp_path / "inprocess")


def test_a_sweep_on_ray_gives_the_numbers_of_a_sweep_in_process(ray_cluster, tmp_path):
    from fedvb.cli import main

    sets = ["--set=dataset=synthetic-logistic", "--set=model=softmax", "--set=num_clients=5", "--set=rounds=2"]
    grid = ["--strategies", "fedavg,ivon-admm", "--seeds", "0,1", *sets]
    assert main(["sweep", *grid, "--parallel", "ray", "--ray-address", ray_cluster, "--out", str(tmp_path / "r")]) == 0
    assert main(["sweep", *grid, "--out", str(tmp_path / "i")]) == 0
    for folder in sorted((tmp_path / "i").glob("*/seed*")):
        twin = tmp_path / "r" / folder.relative_to(tmp_path / "i")
        assert metric_rows(twin) == metric_rows(folder)


def small_ray_run(ray_cluster: str, out: Path, **values) -> RunConfig:
    base = dict(strategy="ivon-admm", dataset="synthetic-logistic", model="softmax", num_clients=5, rounds=4,
                lr=0.002, ivon_beta2=0.999, local_epochs=2, batch_size=16, eval_samples=0, backend="ray",
                ray_address=ray_cluster, out=str(out))  # fmt: skip
    return RunConfig.from_mapping({**base, **values})


def test_a_killed_actor_is_replaced_and_its_client_runs_again(ray_head_info, tmp_path, caplog):
    """SIGKILL one ClientAppActor after round 1: the next message on it fails, the actor is replaced, the
    client runs again on the new one, and the run gives the uninterrupted numbers, status completed."""
    config = small_ray_run(ray_head_info["address"], tmp_path / "killed")
    killed = []

    def kill_an_actor(row):
        if row.get("round") == 1 and not killed:
            actors = session_pids(ray_head_info["session"], "ray::ClientAppActor")
            assert actors, "no ClientAppActor process found in the test's own Ray session"
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])
            deadline = time.monotonic() + 30
            while Path(f"/proc/{actors[0]}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    with caplog.at_level(logging.WARNING, logger="fedvb.ray_backend"):
        run(config, report=kill_an_actor)
    assert killed and any("replaced it" in r.getMessage() for r in caplog.records)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rejected_replies"] == 0, summary
    run(config.replace(backend="inprocess", ray_address="", out=str(tmp_path / "inprocess")))
    assert metric_rows(tmp_path / "killed") == metric_rows(tmp_path / "inprocess")


def test_a_timeout_under_ray_counts_from_the_clients_start_and_is_recorded(ray_cluster, tmp_path):
    """client_timeout_s = 5 under Ray: start-up does not count (round 1 is not lost), the stalled clients
    (a 'timeout' fault sleeps twice the limit) are recorded in rejected with the reason, and the same clients
    are lost as in process; the run ends completed_with_losses. (5 s, not less: a client that follows a
    stalled one runs on the fresh actor that replaced it, whose first message also loads the ClientApp; at
    2 s that took over the limit on a loaded 2-core machine.)"""
    config = small_ray_run(ray_cluster, tmp_path / "ray", client_timeout_s=5.0, faults="timeout=0.25")
    run(config)
    run(config.replace(backend="inprocess", ray_address="", out=str(tmp_path / "inprocess")))
    rows = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    local = [json.loads(line) for line in (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    lost = [sorted(e["client"] for e in r["rejected"]) for r in rows]
    assert any(lost) and len(lost[0]) < 5, lost  # some clients stalled; round 1 was not lost to start-up
    assert lost == [sorted(e["client"] for e in r["rejected"]) for r in local]
    assert all("timed out" in e["reason"] for r in rows for e in r["rejected"]), rows
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["status"] == "completed_with_losses"


def test_a_private_ray_never_attaches_to_another_cluster_on_the_machine(ray_head_info, tmp_path, monkeypatch):
    """backend = ray without ray_address starts a Ray of its own even while another cluster runs here and
    RAY_ADDRESS names it (a bare ray.init() attaches to it): no actor of the run is in that cluster."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head_info["address"])
    config = small_ray_run("", tmp_path / "private", rounds=2)
    seen = []
    run(config, report=lambda row: seen.append(session_pids(ray_head_info["session"], "ray::ClientAppActor")))
    assert seen and all(found == [] for found in seen), seen
    assert json.loads((tmp_path / "private" / "summary.json").read_text())["status"] == "completed"


def test_an_actor_takes_the_runs_data_from_the_object_store_without_preparing_it(ray_cluster):
    """The driver puts the prepared data into Ray's object store once; an actor's warm-up reads it there (a
    read-only view) and loads or partitions nothing itself."""
    import ray

    from fedvb.experiment import prepare, prepared_parts
    from fedvb.records import config_to_json

    def warmed_up(config_json: str, data: list) -> tuple[int, float, bool]:  # in a Ray worker: what warm-up leaves
        from fedvb import experiment
        from fedvb.ray_backend import warm_up
        from fedvb.records import config_from_json

        experiment._prepare_cached.cache_clear()
        warm_up(config_json, data[0])  # the reference itself, as an actor's warm-up gets it (not its value)
        x = experiment.prepare(config_from_json(config_json)).dataset.x_train
        return experiment._prepare_cached.cache_info().misses, float(x.astype("float64").sum()), x.flags.writeable

    config = RunConfig.from_mapping(dict(strategy="fedlap-func", dataset="digits", num_clients=4, func_inputs=30))
    ray.init(address=ray_cluster, include_dashboard=False, log_to_driver=False)
    try:
        data = ray.put(prepared_parts(config))
        misses, total, writeable = ray.get(ray.remote(num_cpus=1)(warmed_up).remote(config_to_json(config), [data]),
                                           timeout=120)  # fmt: skip
    finally:
        ray.shutdown()
    assert misses == 0 and not writeable  # served from the store, as a read-only view
    assert total == float(prepare(config).dataset.x_train.astype("float64").sum())


def test_the_vectorised_engine_on_ray_trains_chunks_on_actors_and_gives_the_in_process_numbers(
    ray_cluster, tmp_path, monkeypatch
):
    """engine = vectorised with backend = ray (fedvb.ray_cohort): the cohort split over the cluster's actors (two
    on this two-CPU head), each chunk trained together; the numbers of the vectorised engine in process, whose
    chunk is the whole cohort."""
    from fedvb import ray_cohort

    sent = []
    original = ray_cohort.RayCohorts.replies

    def counted(self, messages, contexts):  # what went to the actors: how many actors, how many messages
        messages = list(messages)
        sent.append((len(self.actors), len(messages)))
        return original(self, messages, contexts)

    monkeypatch.setattr(ray_cohort.RayCohorts, "replies", counted)
    values = dict(strategy="ivon-admm", dataset="digits", model="mlp", hidden="32", num_clients=6, rounds=2,
                  engine="vectorised", eval_samples=0, lr=0.002, local_epochs=2)  # fmt: skip
    on_ray = RunConfig.from_mapping(
        {**values, "backend": "ray", "ray_address": ray_cluster, "out": str(tmp_path / "r")}
    )
    run(on_ray)
    assert sent and all(actors == 2 for actors, _ in sent) and (2, 6) in sent  # rounds of 6 messages, 2 actors
    run(on_ray.replace(backend="inprocess", ray_address="", out=str(tmp_path / "i")))
    with np.load(completed(tmp_path / "r") / "posterior.npz") as a, np.load(tmp_path / "i" / "posterior.npz") as b:
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert metric_rows(tmp_path / "r")[-1]["accuracy"] == pytest.approx(metric_rows(tmp_path / "i")[-1]["accuracy"])
