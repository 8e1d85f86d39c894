"""The ray backend, attached by address to a real local Ray cluster, gives the in-process numbers."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedvb.backends import run
from fedvb.config import STRATEGIES, RunConfig
from tests.processes import ray_head


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head on loopback in its own temp dir; only its own processes are stopped afterwards."""
    with ray_head(num_cpus=2) as head:
        yield head["address"]


def completed(folder: Path) -> Path:
    """A run folder whose run finished: a stopped run (a lost cluster, say) is never compared."""
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] in ("completed", "completed_with_losses"), summary
    return folder


@pytest.mark.parametrize("strategy", STRATEGIES)
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
            **{k: v for k, v in r.items() if k not in ("wall_time_s", "elapsed_s", "rejected")},
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
