"""The cohort engine against the per-client loop: client-steps per second, measured side by side in one run.

Workload: Fashion-MNIST, ``--clients`` clients of ``--rows`` training rows each (iid), an MLP 784-HIDDEN-10
(sigmoid), one local epoch, batch 32 (so ``rows / 32`` steps a client). One "cohort" is every client's
``client_round`` from the same server state (round 1: no client state yet), run either one client after
another on its own trainer (the loop, what ``engine = "loop"`` does on one worker) or all together
(``fedvb.core.cohort.CohortEngine``, what ``engine = "vectorised"`` does). The two alternate
(loop, vectorised, loop, ...), ``--repeats`` times each after one warm-up of each; each repeat uses the random
streams of another round. Reported: the medians, client-steps per second, and their ratio; and the largest
relative difference of the clients' replies between the two (float tolerance, not a bug).

One torch thread (fedvb's entry points pin one; ``--threads`` to change it).

    python benchmarks/cohort.py [--strategies fedavg,scaffold,ivon-admm] [--clients 64] [--rows 160]
        [--hidden 32] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from fedvb.config import RunConfig
from fedvb.core.cohort import CohortEngine
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer, partition_sizes


def _config(strategy: str, clients: int, rows: int, hidden: str) -> RunConfig:
    return RunConfig.from_mapping(dict(
        strategy=strategy, dataset="fashion-mnist", num_clients=clients, partition="iid",
        data_fraction=clients * rows / 60000, local_test_fraction=0.0, model="mlp", hidden=hidden, local_epochs=1,
        batch_size=32, lr=1e-3, workers=1, seed=0,
    ))  # fmt: skip


def _cohort(config: RunConfig, engine: str, repeat: int, trainers, algorithm, payload) -> tuple[float, list]:
    steps = [functools.partial(_step, algorithm, payload, client_generator(config, repeat, k))
             for k in range(config.num_clients)]  # fmt: skip
    started = time.perf_counter()
    if engine == "loop":
        replies = [step(trainer) for step, trainer in zip(steps, trainers)]
    else:
        replies = CohortEngine().run(steps, trainers)
    return time.perf_counter() - started, [reply for reply, _ in replies]


def _step(algorithm, payload, generator, trainer):
    return algorithm.client_round(payload, {}, trainer, generator=generator)


def _largest_difference(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        for name, value in x.items():
            if value.numel() > 1:
                worst = max(worst, float((value - y[name]).norm() / value.norm()))
    return worst


def measure(strategy: str, args: argparse.Namespace) -> str:
    config = _config(strategy, args.clients, args.rows, args.hidden)
    sizes = partition_sizes(config)
    client_steps = sum(-(-n // config.batch_size) for n in sizes.values())
    algorithm = make_algorithm(config)
    trainers = [make_trainer(config, k) for k in range(config.num_clients)]
    payload = algorithm.payload(algorithm.init_server(initial_mean(config), config.num_clients))
    times = {"loop": [], "vectorised": []}
    difference = 0.0
    for repeat in range(args.repeats + 1):
        outcome = {}
        for engine in ("loop", "vectorised"):
            seconds, outcome[engine] = _cohort(config, engine, repeat + 1, trainers, algorithm, payload)
            if repeat:  # the first of each is a warm-up
                times[engine].append(seconds)
        difference = max(difference, _largest_difference(outcome["loop"], outcome["vectorised"]))
    loop, vectorised = statistics.median(times["loop"]), statistics.median(times["vectorised"])
    width = len(initial_mean(config))
    return (f"| {strategy} | 784-{args.hidden.replace(',', '-')}-10 ({width:,} parameters) | {args.clients} x "
            f"{args.rows} rows, {client_steps} client-steps | {client_steps / loop:,.0f} | "
            f"{client_steps / vectorised:,.0f} "
            f"| {loop / vectorised:.2f}x | {difference:.1e} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="fedavg,scaffold,ivon-admm")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--hidden", default="32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    print("| strategy | model | cohort | loop, client-steps/s | vectorised, client-steps/s | speed-up | largest "
          "relative difference of a reply |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        print(measure(strategy, args), flush=True)


if __name__ == "__main__":
    main()
