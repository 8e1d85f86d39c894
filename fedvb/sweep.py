"""``fedvb sweep``: run a grid of strategies x seeds over one base configuration, then compare them.

With ``parallel="ray"`` every run of the grid is one Ray task (one CPU, one
torch thread) on a local Ray instance or the cluster at ``ray_address``; the
clients of each run execute in-process inside its task, which is the cheapest
way to use many cores for many small runs (a run's own clients on Ray pay
Flower's per-message overhead, see benchmarks/README.md).  Every run writes its
own folder ``OUT/STRATEGY/seedN``, so a finished task is never lost if
another fails.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedvb.config import RunConfig

__all__ = ["grid_configs", "run_grid"]

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, Any]], None]


def _with_rounds(report: Reporter, rounds: int, event: dict[str, Any]) -> None:
    report({**event, "rounds": rounds} if "round" in event else event)


def grid_configs(base: RunConfig, strategies: Sequence[str], seeds: Sequence[int], out: str | Path) -> list[RunConfig]:
    """One validated configuration per (strategy, seed), writing to ``out/strategy/seedN``, clients in-process."""
    return [
        RunConfig.from_mapping(
            {
                **base.explicit(),  # each strategy takes its own defaults
                "strategy": s,
                "seed": seed,
                "backend": "inprocess",
                "ray_address": "",
                "out": str(Path(out) / s / f"seed{seed}"),
            }
        )  # fmt: skip
        for s in strategies
        for seed in seeds
    ]


def _run_one(values: dict[str, Any], overwrite: bool = False, report: Reporter | None = None) -> str:
    import torch

    torch.set_num_threads(1)  # one thread per run: runs, not threads, fill the cores
    from fedvb.backends import run

    logging.getLogger("flwr").setLevel(logging.WARNING)  # after flwr's import, which sets its own level

    config = RunConfig.from_mapping(values)
    run(config, overwrite=overwrite, report=report)
    return config.out


def run_grid(
    configs: Sequence[RunConfig],
    *,
    parallel: str = "inprocess",
    ray_address: str = "",
    overwrite: bool = False,
    report: Reporter | None = None,
) -> list[str]:
    """Run every configuration (one after another, or as Ray tasks); return the folders of the runs that
    finished. A run that raises is logged and left out. ``report`` gets ``run-started`` and ``run-done``
    events and, in process, the current run's rows (with ``rounds``) and progress within its rounds."""
    report = report or (lambda event: None)
    if parallel == "inprocess":
        done = []
        for config in configs:
            report({"event": "run-started", "name": f"{config.strategy} seed {config.seed}"})
            try:
                rows = functools.partial(_with_rounds, report, config.rounds)
                done.append(_run_one(config.as_dict(), overwrite, rows))
            except Exception as error:  # one broken run must not lose the others
                log.error("run %s failed: %s", config.out, error)
            report({"event": "run-done", "name": config.out})
        return done
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # "local": a Ray of our own when no address is given, never someone else's cluster on this machine
        ray.init(address=ray_address or "local", include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(_run_one)
        # a task holds one CPU: its clients run in its own process (workers = 1), not on a pool of their own
        pending = {remote.remote({**c.as_dict(), "workers": 1}, overwrite): c.out for c in configs}
        done = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            out = pending.pop(ready[0])
            try:
                done.append(ray.get(ready[0]))
            except Exception as error:
                log.error("run %s failed: %s", out, error)
            report({"event": "run-done", "name": out})
        return sorted(done, key=[c.out for c in configs].index)
    finally:
        if started_here:
            ray.shutdown()
