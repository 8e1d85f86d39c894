"""``fedvb`` command line.

- ``fedvb run [CONFIG.toml] [flags] [--set key=value ...]`` (or ``--resume DIR``): one experiment;
- ``fedvb compare DIR ... [--out DIR]``: a table and overlaid curves of finished runs;
- ``fedvb sweep CONFIG --strategies a,b --seeds 0,1 [--parallel ray]``: a grid of runs, then ``compare``;
- ``fedvb partition [CONFIG] [flags] --out FILE.npz``: the split over clients of a configuration, no training.

Bad input exits with code 2 and one line naming the field, before anything runs or is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fedvb.config import ConfigError, RunConfig, describe_algorithms, describe_defaults, describe_fields
from fedvb.progress import MODES, RunDisplay, SweepDisplay

__all__ = ["main", "parse_sets"]

FLAGS = {
    "strategy": str,
    "dataset": str,
    "data": str,
    "model": str,
    "num_clients": int,
    "rounds": int,
    "seed": int,
    "backend": str,
    "ray_address": str,
    "out": str,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedvb", description="Federated ADMM and variational Bayes on Flower.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run one experiment and write its run folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one experiment. Settings come from the defaults, then CONFIG.toml, then the flags "
        "and --set key=value overrides.",
        epilog="strategies (fedvb.core.registry):\n"
        + describe_algorithms()
        + "\n\nconfiguration keys (TOML or --set), default, meaning:\n"
        + describe_fields()
        + "\n\neach strategy's defaults of the keys marked (per strategy) (fedvb.core.registry.DEFAULTS):\n"
        + describe_defaults(),
    )
    run.add_argument("config", nargs="?", help="a TOML file of configuration keys")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint (its config.toml; only --rounds may change)",
    )
    for name, kind in FLAGS.items():
        run.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=f"sets {name}")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="any key")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out (else an error)")
    run.add_argument(
        "--log", choices=("tensorboard",), default=None, help="also log each round's metrics as TensorBoard events"
    )
    run.add_argument(
        "--output",
        choices=MODES,
        default="bar",
        help="bar: live progress and a summary table; jsonl: one JSON line per round, then the summary; "
        "quiet: only the final line",
    )
    run.add_argument("--quiet", dest="output", action="store_const", const="quiet", help="same as --output quiet")

    compare = commands.add_parser("compare", help="one table (markdown, CSV) and overlaid curves for several runs")
    compare.add_argument("runs", nargs="+", metavar="DIR", help="run folders; runs differing only in seed are pooled")
    compare.add_argument("--out", default="runs/compare", help="where compare.md/.csv/.png go (runs/compare)")
    compare.add_argument(
        "--baseline", default="", help="the setting (or strategy) the others are compared with (default: the first)"
    )

    partition = commands.add_parser(
        "partition",
        help="write the split over clients of a configuration (no training)",
        description="Write FILE.npz with client_0 ... client_{K-1}: each client's rows of the dataset's training "
        "set (indices in the order the dataset is read), as the partition scheme assigns them (its own order; "
        "before the local test split), and config: the configuration as TOML text.",
    )
    partition.add_argument("config", nargs="?", help="a TOML file of configuration keys")
    for name in ("dataset", "data", "num_clients", "seed"):
        partition.add_argument(f"--{name.replace('_', '-')}", dest=name, type=FLAGS[name], default=None,
                               help=f"sets {name}")  # fmt: skip
    partition.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="any key")
    partition.add_argument("--out", dest="file", required=True, metavar="FILE.npz", help="where the split goes")
    partition.add_argument("--overwrite", action="store_true", help="replace FILE.npz if it exists")

    sweep = commands.add_parser(
        "sweep",
        help="run strategies x seeds over one configuration, then compare",
        description="Run every (strategy, seed) of the grid over CONFIG (plus --set overrides) into "
        "OUT/STRATEGY/seedN, then write OUT/compare.md, compare.csv and compare.png.",
    )
    sweep.add_argument("config", nargs="?", help="the base TOML configuration")
    sweep.add_argument("--strategies", required=True, help="comma-separated strategy names")
    sweep.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    sweep.add_argument(
        "--parallel",
        "--backend",
        dest="parallel",
        choices=("inprocess", "ray"),
        default="inprocess",
        help="inprocess: one run after another; ray: every run a Ray task (one CPU each)",
    )
    sweep.add_argument("--ray-address", default="", help="Ray cluster to submit the runs to (default: a local one)")
    sweep.add_argument("--out", default="runs/sweep", help="sweep folder (runs/sweep)")
    sweep.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="any key")
    sweep.add_argument("--overwrite", action="store_true", help="replace runs already in the sweep folder")
    sweep.add_argument("--output", choices=("bar", "quiet"), default="bar", help="bar: runs done and the current "
                       "run's round on stderr; quiet: only the table and the final line")  # fmt: skip
    return parser


def parse_sets(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as overrides; ConfigError naming the first that is not KEY=VALUE."""
    values = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def _overrides(args: argparse.Namespace) -> dict:
    values = {name: getattr(args, name) for name in FLAGS if getattr(args, name, None) is not None}
    if getattr(args, "log", None):
        values["log"] = args.log
    return {**values, **parse_sets(args.sets)}


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = _overrides(args)
    if not args.resume:
        return RunConfig.from_sources(args.config, overrides)
    folder = Path(args.resume)
    if args.config or set(overrides) - {"rounds"}:
        raise ConfigError("resume", "continues DIR/config.toml as it is; only --rounds may change")
    if args.overwrite:
        raise ConfigError("resume", "continues the run in DIR; --overwrite would replace it")
    if not (folder / "config.toml").is_file():
        raise ConfigError("resume", f"{folder} holds no config.toml to resume from")
    config = RunConfig.from_sources(folder / "config.toml", {**overrides, "out": str(folder)})
    planned = RunConfig.from_sources(folder / "config.toml", {"out": str(folder)}).rounds
    if config.lr_schedule != "constant" and config.rounds != planned:
        raise ConfigError("rounds", f"lr_schedule {config.lr_schedule!r} runs over the {planned} rounds {folder} "
                                    "was started with; a resume cannot change them")  # fmt: skip
    done = _checkpoint_round(config)
    if config.rounds < done:
        raise ConfigError("rounds", f"{folder} has done {done} rounds; --rounds must be >= {done}, got {config.rounds}")
    return config


def _check_runnable(config: RunConfig) -> None:
    from fedvb.experiment import check_runnable

    check_runnable(config)


def _fail(error: Exception) -> int:
    print("fedvb: error: " + " ".join(str(error).split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"run": _run, "compare": _compare, "sweep": _sweep, "partition": _partition}[args.command]
    return command(args)


def _run(args: argparse.Namespace) -> int:
    from fedvb.servers.runfolder import check_not_locked, check_out_folder

    try:
        config = _config(args)
        if args.resume:
            check_not_locked(config.out)
        else:
            check_out_folder(config.out, overwrite=args.overwrite)
        _check_runnable(config)
        if args.resume:
            from fedvb.servers.app import check_resumable

            check_resumable(config)  # a received folder's checkpoint and client rows, before anything starts
    except (ValueError, FileNotFoundError) as error:  # ConfigError, data and partition errors name their field
        return _fail(error)
    import torch

    from fedvb.backends import run

    torch.set_num_threads(1)  # one thread per process on CPU: in-process clients run one after another
    logging.getLogger("flwr").setLevel(logging.WARNING)  # after flwr's import, which sets its own level

    started = time.perf_counter()
    first_round = _checkpoint_round(config) + 1 if args.resume else 1
    display = RunDisplay(args.output, config.rounds, first_round)
    try:
        run(config, resume=bool(args.resume), overwrite=args.overwrite, report=display)
    except KeyboardInterrupt:  # Ctrl-C: the checkpoint holds the last finished round
        display.stop()
        print(f"fedvb: interrupted; continue with: fedvb run --resume {config.out}", file=sys.stderr)
        return 130
    except ConfigError as error:  # the folder was taken between validation and the start
        display.stop()
        return _fail(error)
    summary = json.loads((Path(config.out) / "summary.json").read_text())
    seconds = time.perf_counter() - started
    if summary.get("status") == "stopped":
        display.finish(summary, f"fedvb: {config.strategy} stopped after {seconds:.1f} s -> {config.out}")
        print(f"fedvb: error: {summary['reason']}; continue with: fedvb run --resume {config.out}", file=sys.stderr)
        return 1
    if summary.get("status") == "completed_with_losses":
        lost = f"{summary['rejected_replies']} replies rejected or lost (clients {summary['rejected_clients']})"
        display.finish(summary, f"fedvb: {config.strategy} finished in {seconds:.1f} s with {lost} -> {config.out}")
        return 3
    display.finish(summary, f"fedvb: {config.strategy} finished in {seconds:.1f} s -> {config.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedvb.compare import compare_runs

    try:
        table = compare_runs(args.runs, args.out, baseline=args.baseline)
    except ValueError as error:
        return _fail(error)
    print(table, end="")
    print(f"fedvb: compared {len(args.runs)} runs -> {args.out}/compare.md, compare.csv, compare.png")
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedvb.experiment import write_partition

    try:
        config = RunConfig.from_sources(args.config, _overrides(args))
        sizes = write_partition(config, args.file, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error)
    print(f"fedvb: {config.partition} split of {config.dataset if not config.data else config.data} over "
          f"{len(sizes)} clients ({sum(sizes)} rows, {min(sizes)}-{max(sizes)} a client) -> {args.file}")  # fmt: skip
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedvb.compare import compare_runs
    from fedvb.config import STRATEGIES
    from fedvb.servers.runfolder import check_out_folder
    from fedvb.sweep import grid_configs, run_grid

    try:
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            raise ConfigError("strategies", f"got {unknown or args.strategies!r}; allowed: {', '.join(STRATEGIES)}")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError("seeds", f"comma-separated integers, got {args.seeds!r}") from None
        if not seeds:
            raise ConfigError("seeds", "give at least one seed")
        base = RunConfig.from_sources(args.config, _overrides(args))
        configs = grid_configs(base, strategies, seeds, args.out)
        for config in configs:
            check_out_folder(config.out, overwrite=args.overwrite)
            _check_runnable(config)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error)
    started = time.perf_counter()
    display = SweepDisplay(args.output, len(configs))
    done = run_grid(
        configs, parallel=args.parallel, ray_address=args.ray_address, overwrite=args.overwrite, report=display
    )
    display.finish()
    if done:
        print(compare_runs(done, args.out), end="")
    seconds = time.perf_counter() - started
    print(f"fedvb: sweep of {len(configs)} runs, {len(done)} finished, in {seconds:.1f} s -> {args.out}")
    return 0 if len(done) == len(configs) else 1


def _checkpoint_round(config: RunConfig) -> int:
    """The round a resumed run starts after: 0 for a run killed before its first checkpoint (it starts
    again); the checkpoint is checked to be fedvb's and this configuration's (memory-mapped, not read whole)."""
    from fedvb.servers.runfolder import CHECKPOINT, fingerprint, read_checkpoint

    path = Path(config.out) / CHECKPOINT
    return int(read_checkpoint(path, fingerprint(config))["round"]) if path.exists() else 0


if __name__ == "__main__":
    sys.exit(main())
