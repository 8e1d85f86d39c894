"""Scale benchmarks: what more cores buy in one process, measured side by side in one run.

``workers``: the in-process backend with N worker processes against one (clients run in the server's
process), on a compute-bound round: Fashion-MNIST, the papers' MLP 784-200-100-10, 10 clients of 600
rows (10% of the training set, iid), 2 local epochs, no evaluation samples. Runs alternate (1, N, 1, N,
...); the medians of the steady rounds' training time (round 1 dropped: each worker builds its clients
there; evaluation runs in the server's process either way) are compared, and every run's metrics and
final posterior must equal the one-worker run's bit for bit. Beside each pair, the same clients' local
training bare (round 1's client steps, with fedvb's algorithm, trainers and random streams, but no messages,
Flower or server around them): in one process, and spread over N processes started together. Its ratio is
what the machine allows the clients' part of a round (two client steps at once are slower than one where the
cores share caches, memory bandwidth or a host core); what a round takes beyond its clients' bare time is
fedvb's own time, printed for 1 and N workers.

``curvature``: a FedLap-Cov round (MAP training plus the diagonal GGN of its Laplace step) against a FedAvg
round on that same workload, one worker: the GGN per layer (``curvature = "exact"``, the default), by one
sampled label (``"mc"``), and by each example's Jacobian of every output (the generic path, which every
model used before), timed on one client against that client's local training.

``memory``: IVON-ADMM with the papers' MLP on Fashion-MNIST at K = 100 (cohort fraction 1.0, 10% of the
rows: 60 a client), K = 1,000 (fraction 0.1, all rows: 60 a client) and K = 10,000 (fraction 0.01, all
rows: 6 a client), one local epoch, 3 rounds, one worker (every client in the server's process: the
strictest place to count), each in a fresh process: its peak RSS, the bytes its client store wrote per
round, the checkpoint's size, and the seconds outside the rounds (start-up, partition, pictures).

    python benchmarks/scale.py workers [--workers 2] [--strategies ivon-admm,fedavg] [--rounds 4] [--repeats 2]
    python benchmarks/scale.py curvature [--rounds 4] [--repeats 2]
    python benchmarks/scale.py memory [--clients 100,1000,10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedvb.backends import run
from fedvb.config import RunConfig
from fedvb.core.algorithms import client_step
from fedvb.experiment import client_generator, initial_mean, make_algorithm, make_trainer

TIMING = ("train_time_s", "wall_time_s", "elapsed_s")  # what may differ between runs of the same numbers


def _rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _posterior(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "posterior.npz") as z:
        return {k: z[k] for k in z.files}


def _timed_run(config: RunConfig, key: str = "train_time_s") -> tuple[list[float], float]:
    """Each round's ``key`` (``train_time_s``: sending, the clients' training, aggregating; ``wall_time_s``: the
    whole round with its evaluation) and the whole run's seconds."""
    started = time.perf_counter()
    run(config)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows], total


def workers(args: argparse.Namespace) -> None:
    out = Path(tempfile.mkdtemp(prefix="fedvb-scale-"))
    print(
        f"Fashion-MNIST, 10 clients x 600 rows, MLP 784-200-100-10, {args.rounds} rounds of 2 local epochs; "
        f"1 worker against {args.workers}; medians of the steady rounds' training (send, train, aggregate)"
    )
    for strategy in args.strategies.split(","):
        base = _workload(strategy, rounds=args.rounds)
        rounds: dict[int, list[float]] = {1: [], args.workers: []}
        totals: dict[int, list[float]] = {1: [], args.workers: []}
        bare: dict[int, list[float]] = {1: [], args.workers: []}
        reference = None
        for repeat in range(args.repeats):
            for count in (1, args.workers):
                folder = out / f"{strategy}-{count}-{repeat}"
                times, total = _timed_run(base.replace(workers=count, out=str(folder)))
                rounds[count] += times[1:]
                totals[count].append(total)
                numbers = (_rows(folder), _posterior(folder))
                if reference is None:
                    reference = numbers
                same = numbers[0] == reference[0] and all(
                    np.array_equal(numbers[1][k], reference[1][k]) for k in reference[1]
                ) and numbers[1].keys() == reference[1].keys()  # fmt: skip
                if not same:
                    raise SystemExit(f"{strategy}: {count} workers gave other numbers than 1 worker (run {folder})")
            for count in (1, args.workers):
                bare[count] += _bare_client_steps(strategy, count, args.rounds)
        one, many = statistics.median(rounds[1]), statistics.median(rounds[args.workers])
        bare_one, bare_many = statistics.median(bare[1]), statistics.median(bare[args.workers])
        whole = f"{statistics.median(totals[1]):.1f} s vs {statistics.median(totals[args.workers]):.1f} s"
        print(
            f"{strategy:10s} 1 worker {one:6.2f} s/round   {args.workers} workers {many:6.2f} s/round   "
            f"ratio {many / one:.2f} (target <= 0.60)   whole runs {whole}   bit for bit: yes\n"
            f"{'':10s} bare client steps: 1 process {bare_one:6.2f} s   {args.workers} processes {bare_many:6.2f} s   "
            f"ratio {bare_many / bare_one:.2f} (the machine's)   fedvb's own time per round: "
            f"{(one - bare_one) * 1000:.0f} ms at 1 worker, {(many - bare_many) * 1000:.0f} ms at {args.workers}"
        )
    print(_peak_rss())  # fmt: skip


def _bare_client_steps(strategy: str, processes: int, rounds: int) -> list[float]:
    """Seconds for round 1's client steps of the ``workers`` workload, ``rounds`` times, spread over
    ``processes`` processes started together (client ``k`` in process ``k % processes``; each time, the
    slowest process's)."""
    clients = _workload(strategy).num_clients
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    group = [context.Process(target=_bare_steps_in_process, args=(strategy, list(range(clients))[first::processes],
                                                                    rounds, barrier, results))
             for first in range(processes)]  # fmt: skip
    for process in group:
        process.start()
    try:
        times = [results.get(timeout=600) for _ in range(processes * rounds)]
    finally:
        for process in group:
            process.join(60)
            if process.is_alive():
                process.kill()
    return [max(seconds for r, seconds in times if r == each) for each in range(rounds)]


def _bare_steps_in_process(strategy: str, clients: list[int], rounds: int, barrier, results) -> None:
    torch.set_num_threads(1)  # one of N processes, as a worker
    config = _workload(strategy)
    algorithm = make_algorithm(config)
    payload = algorithm.payload(algorithm.init_server(initial_mean(config), config.num_clients))
    trainers = {k: make_trainer(config, k) for k in clients}

    def step(k: int) -> None:
        client_step(algorithm, payload, {}, trainers[k], generator=client_generator(config, 1, k))

    step(clients[0])  # as a worker's first round, where it builds its clients, is left out of the medians
    for each in range(rounds):
        barrier.wait(timeout=600)
        started = time.perf_counter()
        for k in clients:
            step(k)
        results.put((each, time.perf_counter() - started))


def _peak_rss() -> str:
    """This process's peak RSS and each worker's (VmHWM of the live workers: a spawned child's ru_maxrss would
    count the server's memory it was forked from before its exec)."""
    import resource

    from fedvb.workers import pool_pids

    server = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = []
    for pid in pool_pids():
        status = Path(f"/proc/{pid}/status").read_text()
        workers.append(int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024)
    shown = ", ".join(f"{w:.0f}" for w in workers) or "-"
    return f"peak RSS: server process {server:.0f} MB, workers {shown} MB"


def _workload(strategy: str, **changes) -> RunConfig:
    values = dict(strategy=strategy, dataset="fashion-mnist", num_clients=10, data_fraction=0.1, partition="iid",
                  local_test_fraction=0.0, local_epochs=2, batch_size=32, eval_samples=0, seed=0)  # fmt: skip
    return RunConfig.from_mapping({**values, **changes})


def curvature(args: argparse.Namespace) -> None:
    from fedvb.experiment import client_generator, make_trainer

    out = Path(tempfile.mkdtemp(prefix="fedvb-scale-"))
    print(f"Fashion-MNIST, 10 clients x 600 rows, MLP 784-200-100-10, {args.rounds} rounds of 2 local epochs, "
          "1 worker; medians of the steady rounds")  # fmt: skip
    runs = {"fedavg": _workload("fedavg"), "fedlap-cov exact": _workload("fedlap-cov"),
            "fedlap-cov mc": _workload("fedlap-cov", curvature="mc")}  # fmt: skip
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, config in runs.items():
            folder = out / f"{name.replace(' ', '-')}-{repeat}"
            rounds[name] += _timed_run(config.replace(workers=1, rounds=args.rounds, out=str(folder)))[0][1:]
    base = statistics.median(rounds["fedavg"])
    for name, times in rounds.items():
        ratio = statistics.median(times) / base
        target = "" if name == "fedavg" else "   (target <= 2.0)"
        print(f"{name:18s} {statistics.median(times):6.2f} s/round   ratio to fedavg {ratio:5.2f}{target}")
    trainer = make_trainer(runs["fedlap-cov exact"], 0)
    theta = trainer.get_flat()
    timings = {}
    for name, step in (
        ("local training", lambda: trainer.map(theta, None, generator=client_generator(runs["fedavg"], 1, 0))),
        ("per-layer GGN", lambda: trainer.curvature(theta)),
        ("Jacobian GGN", lambda: trainer._jacobian_curvature(trainer.model, None)),
    ):
        started = time.perf_counter()
        step()
        timings[name] = time.perf_counter() - started
    print(
        "one client (600 rows): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
        + f"; Jacobian / per-layer {timings['Jacobian GGN'] / timings['per-layer GGN']:.1f}x"
    )


MEMORY_RUNS = {100: (1.0, 0.1), 1000: (0.1, 1.0), 10000: (0.01, 1.0)}  # K -> (fraction_train, data_fraction)
MEMORY_TARGET_MB = {100: 1536, 1000: 1536, 10000: 2048}


def memory(args: argparse.Namespace) -> None:
    import subprocess
    import sys

    out = Path(tempfile.mkdtemp(prefix="fedvb-scale-"))
    print(f"IVON-ADMM, Fashion-MNIST, MLP 784-200-100-10, 1 local epoch, {args.rounds} rounds, 1 worker, each K "
          "in its own process")  # fmt: skip
    for num_clients in (int(k) for k in args.clients.split(",")):
        fraction, data_fraction = MEMORY_RUNS[num_clients]
        folder = out / f"k{num_clients}"
        config = dict(strategy="ivon-admm", dataset="fashion-mnist", num_clients=num_clients, partition="iid",
                      fraction_train=fraction, data_fraction=data_fraction, local_test_fraction=0.0,
                      local_epochs=1, rounds=args.rounds, workers=1, seed=0, out=str(folder))  # fmt: skip
        started = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "_one", json.dumps(config)], capture_output=True, text=True)
        wall = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(f"K={num_clients}: the run failed:\n{child.stderr[-2000:]}")
        peak = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        written = [row["state_bytes_written"] / 2**20 for row in rows]
        outside = wall - sum(row["wall_time_s"] for row in rows)
        print(
            f"K={num_clients:6d} fraction {fraction:<5} cohort {round(fraction * num_clients):4d}: peak RSS "
            f"{peak:5.0f} MB (target <= {MEMORY_TARGET_MB[num_clients]})   client rows written per round "
            + "/".join(f"{w:.0f}" for w in written)
            + f" MB   checkpoint.pt {(folder / 'checkpoint.pt').stat().st_size / 2**20:.1f} MB   "
            f"{statistics.median(row['wall_time_s'] for row in rows):.1f} s/round   outside the rounds {outside:.0f} s"
        )


def _one(config_json: str) -> None:
    """One run of ``memory`` in this (fresh) process; prints its peak RSS as the last line."""
    import resource

    run(RunConfig.from_mapping(json.loads(config_json)))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    on_workers = commands.add_parser("workers", help="in-process worker processes against one")
    on_workers.add_argument("--workers", type=int, default=2)
    on_workers.add_argument("--strategies", default="ivon-admm,fedavg")
    on_workers.add_argument("--rounds", type=int, default=4)
    on_workers.add_argument("--repeats", type=int, default=2)
    on_curvature = commands.add_parser("curvature", help="a FedLap-Cov round against a FedAvg round")
    on_curvature.add_argument("--rounds", type=int, default=4)
    on_curvature.add_argument("--repeats", type=int, default=2)
    on_memory = commands.add_parser("memory", help="peak RSS and bytes written at K = 100, 1,000, 10,000")
    on_memory.add_argument("--clients", default="100,1000,10000")
    on_memory.add_argument("--rounds", type=int, default=3)
    on_one = commands.add_parser("_one", help="(internal) one run of `memory`")
    on_one.add_argument("config")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # this script is an entry point: one thread, as the CLI
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if args.command == "_one":
        return _one(args.config)
    {"workers": workers, "curvature": curvature, "memory": memory}[args.command](args)


if __name__ == "__main__":
    main()
