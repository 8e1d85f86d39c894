"""What the study scripts of simulations/ share: the CLI's process settings, a results folder, and the core's
loop with a look at each reply."""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from fedvb.cli import parse_sets
from fedvb.config import ConfigError, RunConfig
from fedvb.core.algorithms import ServerState
from fedvb.core.driver import run_algorithm
from fedvb.experiment import client_generator, initial_mean, make_algorithm, round_lr


def start_study(out: str, prefix: str) -> Path:
    """One torch thread (as fedvb's CLI, so the numbers are the CLI's), Flower and fedvb logging only
    errors (the tables are the output), and the folder ``out`` (a fresh temp folder when empty)."""
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("fedvb").setLevel(logging.ERROR)
    return Path(out or tempfile.mkdtemp(prefix=prefix))


def core_loop(
    config: RunConfig,
    trainers: list,
    rounds: int,
    *,
    on_reply: Callable[[int, dict], None],
    on_round: Callable[[int, ServerState], None],
) -> ServerState:
    """The first ``rounds`` rounds of ``config`` with the core's plain loop (``fedvb.core.driver.run_algorithm``:
    the numbers every backend gives for the same seed; the learning-rate schedule still spans ``config.rounds``,
    so round r is the run's round r). ``on_reply(client, reply)`` sees each reply on its way to the server,
    ``on_round(round, server)`` the server after each round."""
    algorithm = make_algorithm(config)
    client_round = algorithm.client_round
    client_of = {id(trainer): k for k, trainer in enumerate(trainers)}

    def recorded(payload, state, trainer, *, generator):
        reply, new_state = client_round(payload, state, trainer, generator=generator)
        on_reply(client_of[id(trainer)], reply)
        return reply, new_state

    algorithm.client_round = recorded
    return run_algorithm(
        algorithm, trainers, rounds, initial_mean(config), seed=config.seed, fraction=config.fraction_train,
        generator_for=lambda r, k: client_generator(config, r, k), on_round=on_round,
        lr_for=lambda r: round_lr(config, r),
    )  # fmt: skip


def write_csv(path: str | Path, fields: list[str], rows: list[list]) -> None:
    """``rows`` under the header ``fields`` at ``path``, and a line that says so."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows(rows)
    print(f"wrote {path} ({len(rows)} rows)")


def add_loop_arguments(parser: argparse.ArgumentParser, default_config: Path, out: str) -> None:
    """The arguments of a script that follows a configuration's run with :func:`core_loop`."""
    parser.add_argument("config", nargs="?", default=str(default_config))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rounds = "run the configuration's first N rounds (default: all; the schedule spans all)"
    parser.add_argument("--rounds", type=int, default=0, help=rounds)
    parser.add_argument("--out", default=out)


def loop_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[RunConfig, int]:
    """The configuration :func:`add_loop_arguments` names, and how many of its rounds to run; one torch thread,
    as fedvb's CLI (this is an entry point's set-up)."""
    torch.set_num_threads(1)
    try:
        config = RunConfig.from_sources(Path(args.config), parse_sets(args.set))
    except ConfigError as error:  # one clear line, as fedvb's CLI
        parser.error(str(error))
    rounds = args.rounds or config.rounds
    if not 1 <= rounds <= config.rounds:
        parser.error(f"--rounds: {rounds}; allowed: 1 to the configuration's rounds ({config.rounds})")
    return config, rounds
