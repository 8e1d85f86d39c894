"""The fedvb ServerApp: build the strategy, run the rounds, evaluate and checkpoint after each, write the run folder.

The round loop is ours rather than Flower's ``Strategy.start`` because a
study needs three things ``start`` cannot do: begin at a later round (resume
from a checkpoint), retry a round that got too few usable replies, and save
the federation's whole state after every round.  Each round still calls the
strategy's ``configure_train`` / ``aggregate_train`` and the Grid's
``send_and_receive``, exactly as ``start`` does, so the strategies remain
ordinary Flower strategies for anyone's ServerApp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedvb.config import RunConfig
from fedvb.core.client_store import DiskStore
from fedvb.experiment import evaluate, test_predictions, write_label_distribution
from fedvb.metrics import calibration_bins
from fedvb.plots import plot_curves, plot_reliability
from fedvb.servers.runfolder import CHECKPOINT, CLIENT_STORE, RunFolder, fingerprint, read_checkpoint, take_up
from fedvb.strategies import make_strategy
from fedvb.strategies.base import RoundFailed

__all__ = ["app", "check_resumable", "make_server_app", "run_server"]

log = logging.getLogger(__name__)
FLOWER_LOG = logging.getLogger("flwr")  # Flower's logger: what `flwr run --stream` shows of a ServerApp

Reporter = Callable[[dict[str, Any]], None]


def check_resumable(config: RunConfig) -> None:
    """ConfigError naming ``resume`` unless this configuration's strategy can take up the checkpoint in
    ``config.out`` (what :func:`run_server` does first), checked before anything is started or written."""
    path = Path(config.out) / CHECKPOINT
    if not path.is_file():
        return  # killed before its first checkpoint: the run starts again
    strategy = make_strategy(config)
    try:
        take_up(path, read_checkpoint(path, fingerprint(config)), _restore(strategy, config))
    finally:
        strategy.client_store.close()


def _restore(strategy, config: RunConfig) -> Callable[[dict[str, Any]], None]:
    return lambda checkpoint: strategy.load_state_dict(checkpoint["strategy"], config.out)


REPLY_POLL_S = 0.01  # how often the server looks for replies on a grid that polls (Flower's in-memory one)


def _look_for_replies_often(grid: Grid) -> None:
    """Flower's in-memory grid (its simulation engine's, under Ray) looks for replies every ``pull_interval``
    (0.1 s by default), so each round ends up to that long after its last reply: a third of a small round on
    Ray. A look is a lookup in the engine's in-memory state, so fedvb looks every 10 ms."""
    interval = getattr(grid, "pull_interval", None)
    if isinstance(interval, (int, float)) and interval > REPLY_POLL_S:
        grid.pull_interval = REPLY_POLL_S


def run_server(
    grid: Grid,
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report: Reporter | None = None,
    round_deadline: bool = True,
) -> RunFolder:
    """Run rounds up to ``config.rounds`` on ``grid`` (from the checkpoint's next round when ``resume``) and
    write the run folder (replacing a run there only when ``overwrite``). ``report`` gets every metrics row
    as it is logged, and ``{"event": "clients", ...}`` progress within a round (progress displays).
    ``round_deadline``: ``client_timeout_s`` is also the grid's deadline for a round's replies; ``False``
    where the backend limits each client itself (:mod:`fedvb.ray_backend`)."""
    _look_for_replies_often(grid)
    strategy = make_strategy(config)
    folder = RunFolder(
        config,
        resume=resume,
        overwrite=overwrite,
        restore=_restore(strategy, config),
    )
    try:
        if folder.resumed is None:  # the clients' states live in the run folder, a row per client
            strategy.use_client_store(DiskStore(folder.path / CLIENT_STORE, config.num_clients))
        _run_rounds(grid, config, strategy, folder, report, round_deadline)
    finally:
        strategy.client_store.close()
        folder.close()
    return folder


def _run_rounds(
    grid: Grid, config: RunConfig, strategy, folder: RunFolder, report: Reporter | None, round_deadline: bool
) -> None:
    first_round, elapsed_before = 1, 0.0
    if folder.resumed is not None:
        first_round = folder.resumed["round"] + 1
        elapsed_before = folder.rows[-1]["elapsed_s"] if folder.rows else 0.0
    else:
        folder.write_checkpoint(0, strategy.state_dict())  # from now on any kill can be resumed
        folder.write_picture("labels.png", lambda path: write_label_distribution(config, path))
    started = time.perf_counter() - elapsed_before
    status = {"status": "completed"}
    outputs, evaluated = None, 0  # the last evaluated round's test predictions, for the pictures
    for server_round in range(first_round, config.rounds + 1):
        round_started = time.perf_counter()
        try:
            retries = _train_round(grid, strategy, config, server_round, round_deadline)
        except RoundFailed as error:
            log.error("%s; stopping (state of round %d kept in the checkpoint)", error, server_round - 1)
            status = {"status": "stopped", "reason": str(error)}
            break
        trained = time.perf_counter()
        metrics = {}
        if config.evaluates(server_round):  # eval_every, predictive_every: the last round always has both
            posterior = _sampled_posterior(strategy) if config.predicts(server_round) else None
            outputs, evaluated = test_predictions(config, strategy.mean(), posterior), server_round
            metrics = evaluate(config, strategy.mean(), posterior, outputs)
        state = strategy.state_dict()  # the cohort's client rows flushed to disk
        now = time.perf_counter()
        row = {"round": server_round, **metrics, **strategy.round_log, "retries": retries,
               "state_bytes_written": strategy.client_store.take_bytes_written(),
               "train_time_s": trained - round_started, "wall_time_s": now - round_started,
               "elapsed_s": now - started}  # fmt: skip
        folder.end_round(server_round, state, row)
        if report is not None:
            report(row)
    totals = {"rounds": config.rounds, "strategy": config.strategy, "total_time_s": time.perf_counter() - started}
    totals.update(status, **_rounds_to_target(folder.rows, config.target_accuracy), **_losses(folder.rows))
    if totals["status"] == "completed" and totals["rejected_replies"]:
        totals["status"] = "completed_with_losses"  # never a silent "completed" when replies were lost
    totals["bytes_total"] = sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in folder.rows)
    folder.finish(strategy.mean(), strategy.posterior(), totals)
    if folder.rows and evaluated != folder.rows[-1]["round"]:  # resumed after the last round, or stopped
        outputs = test_predictions(config, strategy.mean(), _sampled_posterior(strategy))
    _write_pictures(config, folder, outputs, posterior=strategy.algorithm.uncertainty)


def _write_pictures(config: RunConfig, folder: RunFolder, outputs: dict | None, *, posterior: bool) -> None:
    """curves.png (metrics against rounds) and, for classifiers, reliability.png of the last round's model
    (``outputs``: its :func:`~fedvb.experiment.test_predictions`)."""
    title = f"{config.strategy}: {config.dataset if not config.data else Path(config.data).name}"
    model = "posterior mean" if posterior else "server model"  # a point estimate has no posterior
    folder.write_picture("curves.png", lambda path: plot_curves(folder.rows, path, title=title, model=model))
    if outputs and outputs["mean"].ndim == 2:
        names = {"mean": model, "predictive": "predictive"}
        tables = {names[k]: calibration_bins(outputs[k], outputs["y"]) for k in names if k in outputs}
        folder.write_picture("reliability.png", lambda path: plot_reliability(tables, path, title=title))


def _sampled_posterior(strategy):
    """The server's Gaussian when it is a posterior worth sampling for predictions, else None."""
    return strategy.posterior() if strategy.algorithm.uncertainty else None


def _train_round(grid: Grid, strategy, config: RunConfig, server_round: int, round_deadline: bool) -> int:
    """One training round, retried up to ``round_retries`` times; returns the retries used."""
    timeout = (config.client_timeout_s or None) if round_deadline else None
    for attempt in range(config.round_retries + 1):
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({"attempt": attempt}), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        try:
            strategy.aggregate_train(server_round, replies)
            return attempt
        except RoundFailed as error:
            if attempt == config.round_retries:
                raise
            log.warning("%s; retrying (%d of %d)", error, attempt + 1, config.round_retries)
    raise AssertionError("unreachable")


def _losses(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many replies were rejected or never came, and from which clients (by client number)."""
    lost = [entry for row in rows for entry in row.get("rejected", [])]
    clients = sorted({e["client"] for e in lost if e.get("client") is not None})
    return {"rejected_replies": len(lost), "rejected_clients": clients}


def _rounds_to_target(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The first round whose accuracy reaches ``target`` (None if none does); nothing when no target is set."""
    if target <= 0:
        return {}
    reached = next((r["round"] for r in rows if r.get("accuracy", -1.0) >= target), None)
    return {"target_accuracy": target, "rounds_to_target": reached}


class RunStopped(RuntimeError):
    """A run that stopped before its last round (too few usable replies): Flower then reports it as failed."""


def log_round(row: dict[str, Any]) -> None:
    """One log line per round (what ``flwr run --stream`` shows)."""
    if "round" not in row:
        return  # progress within a round
    shown = [f"{k}={row[k]:.4f}" for k in ("accuracy", "nll", "ece", "mse") if k in row]
    rejected = f"  rejected={len(row['rejected'])}" if row.get("rejected") else ""
    FLOWER_LOG.info("fedvb round %d: %s%s  (%.1f s)", row["round"], "  ".join(shown), rejected, row["wall_time_s"])


def make_server_app(
    config: RunConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    report: Reporter | None = None,
    round_deadline: bool = True,
) -> ServerApp:
    """A ServerApp for ``config``; without one it reads the run configuration (``flwr run``), where ``{run_id}``
    in ``out`` becomes Flower's run id (the app's default ``runs/flwr/{run_id}``: one folder per run), every
    round is logged, and a stopped run raises :class:`RunStopped` so that Flower reports it failed.
    ``round_deadline``: as in :func:`run_server`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is not None:
            run_server(grid, config, resume=resume, overwrite=overwrite, report=report, round_deadline=round_deadline)
            return
        import torch

        torch.set_num_threads(1)  # flwr run's server process is fedvb's entry point: one thread, as the CLI
        values = dict(context.run_config)
        values["out"] = str(values.get("out", "runs/flwr/{run_id}")).replace("{run_id}", str(context.run_id))
        folder = run_server(grid, RunConfig.from_mapping(values), report=log_round)
        summary = folder.summary
        if summary.get("status") != "completed":
            reason = summary.get("reason")
            raise RunStopped(f"fedvb run stopped: {reason} (resume with: fedvb run --resume {folder.path})")
        FLOWER_LOG.info("fedvb: run finished -> %s", folder.path)

    return app


app = make_server_app()
