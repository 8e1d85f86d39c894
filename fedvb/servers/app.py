"""The fedvb ServerApp: build the strategy from the configuration, evaluate every round, write the run folder."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedvb.config import RunConfig
from fedvb.experiment import evaluate, write_label_distribution
from fedvb.servers.runfolder import RunFolder
from fedvb.strategies import make_strategy

__all__ = ["app", "make_server_app", "run_server"]


def run_server(grid: Grid, config: RunConfig) -> RunFolder:
    """Run ``config.rounds`` rounds on ``grid`` and write the run folder."""
    import torch

    torch.set_num_threads(1)
    folder = RunFolder(config)
    write_label_distribution(config, folder.path / "labels.png")
    strategy = make_strategy(config)
    started = last = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal last
        if server_round == 0:
            return None
        now = time.perf_counter()
        posterior = strategy.posterior() if strategy.algorithm.uncertainty else None
        metrics = evaluate(config, strategy.mean(), posterior)
        row = {"round": server_round, **metrics, "wall_time_s": now - last, "elapsed_s": now - started}
        folder.log_round(row)
        last = time.perf_counter()
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    strategy.start(
        grid=grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=config.rounds,
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    folder.finish(
        strategy.mean(),
        strategy.posterior(),
        {"rounds": config.rounds, "strategy": config.strategy, "total_time_s": time.perf_counter() - started},
    )
    return folder


def make_server_app(config: RunConfig | None = None) -> ServerApp:
    """A ServerApp for ``config``; without one it reads the run configuration (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config or RunConfig.from_mapping(dict(context.run_config)))

    return app


app = make_server_app()
