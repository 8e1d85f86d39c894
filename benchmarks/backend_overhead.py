"""Per-round wall time of the Flower backends against the core's plain loop, on the same work.

20 clients on a Dirichlet split of digits (or --dataset fashion-mnist: 60,000
rows, 3,000 a client), a small MLP (hidden 64, relu; --hidden 200,100 for the
papers'), one local epoch, FedAvg; no evaluation inside the timed part.  The plain loop
(``fedvb.core.driver.run_algorithm``) is the floor; the ``inprocess`` backend
runs the real Strategy and ClientApp through a Flower Grid; ``--ray`` also
times Flower's Ray simulation engine (start-up reported apart).  Plain and
in-process runs are interleaved and repeated; medians of steady rounds
(round 1 dropped) are compared. The in-process backend runs with one worker (clients in the server's
process, as the plain loop): this measures Flower's overhead, not more cores (``scale.py workers``).

    python benchmarks/backend_overhead.py [--rounds 8] [--repeats 3] [--ray]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedvb.backends import run
from fedvb.config import RunConfig
from fedvb.core.driver import run_algorithm
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer


def plain_round_times(config: RunConfig) -> list[float]:
    algorithm = make_algorithm(config)
    trainers = [make_trainer(config, k) for k in range(config.num_clients)]
    times, last = [], [time.perf_counter()]

    def tick(server_round, server):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    run_algorithm(
        algorithm, trainers, config.rounds, initial_mean(config),
        generator_for=lambda r, k: client_generator(config, r, k), on_round=tick,
    )  # fmt: skip
    return times


def backend_round_times(config: RunConfig) -> tuple[list[float], float]:
    started = time.perf_counter()
    run(config)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    return [row["wall_time_s"] for row in rows], total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also time the ray backend")
    parser.add_argument("--dataset", default="digits", help="digits (default) or fashion-mnist")
    parser.add_argument("--hidden", default="64", help="MLP hidden sizes (default 64; the papers' 200,100)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out = tempfile.mkdtemp(prefix="fedvb-bench-")
    config = RunConfig.from_mapping(
        dict(strategy="fedavg", dataset=args.dataset, num_clients=20, rounds=args.rounds, partition="dirichlet",
             partition_alpha=1.0, hidden=args.hidden, activation="relu", local_epochs=1, batch_size=32, lr=3e-3,
             eval_samples=0, workers=1, out=out)
    )  # fmt: skip
    plain, inprocess = [], []
    for _ in range(args.repeats):
        plain += plain_round_times(config)[1:]
        inprocess += backend_round_times(config)[0][1:]
    p, i = statistics.median(plain), statistics.median(inprocess)
    print(f"{args.dataset}, 20 clients, MLP hidden {args.hidden}, 1 local epoch, FedAvg; "
          f"medians of {len(plain)} steady rounds")  # fmt: skip
    print(f"plain loop          {1e3 * p:8.1f} ms/round")
    print(f"inprocess (Flower)  {1e3 * i:8.1f} ms/round   ratio to plain {i / p:.3f} (target <= 1.05)")
    if args.ray:
        rounds, total = backend_round_times(config.replace(backend="ray", out=out + "-ray"))
        r = statistics.median(rounds[1:])
        print(f"ray (Flower, 2 CPUs) {1e3 * r:7.1f} ms/round   ratio to plain {r / p:.2f}; "
              f"whole run {total:.1f} s of which start-up and round 1 {total - sum(rounds[1:]):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
