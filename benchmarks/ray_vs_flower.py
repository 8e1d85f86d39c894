"""fedvb's FedAvg on Ray against a plain Flower app on Ray, on the same work, side by side in one run.

The plain app is what a Flower user writes, with no fedvb code in its ServerApp or ClientApp: Flower's own
FedAvg (``flwr.serverapp.strategy.FedAvg``) and a ClientApp that loads its partition once per actor process
(as Flower's examples cache ``flwr-datasets`` partitions), trains the MLP with torch's fused Adam and replies
with its ``state_dict``. Both run on Flower's simulation engine on a private Ray with one CPU per client and
one torch thread per actor. Workload: Fashion-MNIST, 10 clients of ``--rows`` training rows (600: 10% of the
training set) split iid, the papers' MLP 784-200-100-10 (sigmoid), 2 local epochs of batch 32, Adam lr 1e-3;
no evaluation inside the rounds on either side (fedvb evaluates only after the last round: ``eval_every`` =
rounds).

Measured per run, from the driver: start-up (the call to the first round's ``configure_train``), round 1
(where the plain app's actors start and load their data, and fedvb's start and take up the driver's), the
two together (what to compare: each app starts its actors at a different point), and the median of rounds 2
to R-1 (the steady rounds: fedvb's last round is evaluated); runs alternate. Flower's in-memory grid pulls
replies every 0.1 s, so round times move in steps of about 0.1 s.

    python benchmarks/ray_vs_flower.py [--rounds 6] [--repeats 2] [--rows 600]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

FOLDER = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist
CLIENTS, ROWS, EPOCHS, BATCH, LR = 10, 600, 2, 32, 1e-3


# -- the plain Flower app ------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 200), nn.Sigmoid(), nn.Linear(200, 100), nn.Sigmoid(), nn.Linear(100, 10))


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


@functools.lru_cache(maxsize=1)
def _training_rows(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``CLIENTS * rows`` of the training rows, standardised (once per actor process)."""
    x = _idx(FOLDER / "train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32)
    y = _idx(FOLDER / "train-labels-idx1-ubyte.gz").astype(np.int64)
    rows = np.random.default_rng(0).permutation(len(x))[: CLIENTS * rows]
    x = x[rows]
    return (x - x.mean()) / x.std(), y[rows]


def _partition(partition: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _training_rows(rows)
    part = slice(partition * rows, (partition + 1) * rows)
    return torch.from_numpy(x[part].copy()), torch.from_numpy(y[part].copy())


def plain_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        x, y = _partition(int(context.node_config["partition-id"]), int(msg.content["config"]["rows"]))
        model = mlp()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
        generator = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        for _ in range(EPOCHS):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), BATCH):
                rows = order[start : start + BATCH]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
                optimizer.step()
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(x)})}
        )
        return Message(content, reply_to=msg)

    return app


def plain_server_app(rounds: int, rows: int, starts: list[float]):
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            starts.append(time.perf_counter())
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            failed = [r.error.reason for r in replies if r.has_error()]
            if failed or len(replies) != CLIENTS:  # a failing client is fast: its round would not be comparable
                raise SystemExit(
                    f"plain app, round {server_round}: {len(failed)} of {len(replies)} failed: {failed[:1]}"
                )
            return super().aggregate_train(server_round, replies)

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=CLIENTS,
                               min_available_nodes=CLIENTS)  # fmt: skip
        strategy.start(grid=grid, initial_arrays=ArrayRecord(mlp().state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord({"rows": rows}))  # fmt: skip

    return app


def plain_run(rounds: int, rows: int) -> tuple[float, list[float]]:
    from flwr.simulation import run_simulation

    starts: list[float] = []
    called = time.perf_counter()
    run_simulation(
        server_app=plain_server_app(rounds, rows, starts), client_app=plain_client_app(), num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"address": "local", "include_dashboard": False}},
    )  # fmt: skip
    return called, starts + [time.perf_counter()]


# -- fedvb on the same work ----------------------------------------------------------------------------------


def fedvb_run(rounds: int, rows: int) -> tuple[float, list[float]]:
    from fedvb.backends import run
    from fedvb.config import RunConfig
    from fedvb.strategies.fedavg import FedAvg

    config = RunConfig.from_mapping(dict(
        strategy="fedavg", dataset="fashion-mnist", num_clients=CLIENTS, data_fraction=CLIENTS * rows / 60_000,
        partition="iid", local_test_fraction=0.0, local_epochs=EPOCHS, batch_size=BATCH, lr=LR, eval_samples=0,
        rounds=rounds, eval_every=rounds, backend="ray", out=tempfile.mkdtemp(prefix="fedvb-ray-vs-flower-"),
    ))  # fmt: skip
    starts: list[float] = []
    original = FedAvg.configure_train

    def timed(self, *args, **kwargs):
        starts.append(time.perf_counter())
        return original(self, *args, **kwargs)

    FedAvg.configure_train = timed
    try:
        called = time.perf_counter()
        run(config)
    finally:
        FedAvg.configure_train = original
    return called, starts + [time.perf_counter()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=ROWS, help="training rows a client (10 clients; 6,000 at most)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("fedvb").setLevel(logging.ERROR)
    # The apps' functions from this file imported as a module, not from __main__: Flower sends the ClientApp
    # with every message, and a script's functions travel by value (each message would load the data
    # again, where a Flower app's module, imported once by each actor, keeps it).
    from ray_vs_flower import fedvb_run, plain_run

    runs = {"plain Flower app": plain_run, "fedvb": fedvb_run}
    measured: dict[str, dict[str, list[float]]] = {name: {"start": [], "first": [], "steady": []} for name in runs}
    for _ in range(args.repeats):
        for name, one_run in runs.items():
            called, marks = one_run(args.rounds, args.rows)
            rounds = np.diff(marks).tolist()  # round r: from its configure_train to the next one (or the end)
            measured[name]["start"].append(marks[0] - called)
            measured[name]["first"].append(rounds[0])
            measured[name]["steady"] += rounds[1 : args.rounds - 1]
            print(
                f"{name}: start-up {marks[0] - called:.2f} s, rounds " + " ".join(f"{r:.2f}" for r in rounds),
                flush=True,
            )
    print(f"Fashion-MNIST, {CLIENTS} clients x {args.rows} rows, MLP 784-200-100-10, {args.rounds} rounds of {EPOCHS} "
          f"local epochs, FedAvg, Ray (1 CPU a client); medians over {args.repeats} runs each, alternated")  # fmt: skip
    plain = {key: statistics.median(values) for key, values in measured["plain Flower app"].items()}
    for name, values in measured.items():
        got = {key: statistics.median(v) for key, v in values.items()}
        ready, plain_ready = got["start"] + got["first"], plain["start"] + plain["first"]
        print(f"{name:17s} start-up {got['start']:4.1f} s + round 1 {got['first']:5.2f} s = {ready:5.2f} s "
              f"({ready - plain_ready:+.1f} s, target <= +5)   steady rounds {got['steady']:5.2f} s/round "
              f"(ratio {got['steady'] / plain['steady']:.2f}, target <= 1.05)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
