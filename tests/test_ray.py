"""The ray backend, attached by address to a real local Ray cluster, gives the in-process numbers."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fedvb.backends import run
from fedvb.config import STRATEGIES, RunConfig

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head on loopback, stopped afterwards whatever happens."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [str(RAY if RAY.exists() else shutil.which("ray")), "start", "--head", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
         f"--temp-dir={temp}"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


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
    with np.load(tmp_path / "r" / "posterior.npz") as a, np.load(tmp_path / "i" / "posterior.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-8)
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2


def metric_rows(folder: Path) -> list[dict]:
    """Every metric of every round, without timings, and rejections as counts (node ids differ by backend)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
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
