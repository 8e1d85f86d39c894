"""``fedvb`` command line: ``fedvb run [CONFIG.toml] [flags] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fedvb.config import ConfigError, RunConfig, describe_fields
from fedvb.progress import MODES, RunDisplay

__all__ = ["main"]

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
        epilog="configuration keys (TOML or --set), default, meaning:\n" + describe_fields(),
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
    run.add_argument(
        "--output",
        choices=MODES,
        default="bar",
        help="bar: live progress and a summary table; jsonl: one JSON line per round, then the summary; "
        "quiet: only the final line",
    )
    run.add_argument("--quiet", dest="output", action="store_const", const="quiet", help="same as --output quiet")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    values = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    for item in args.sets:
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def _config(args: argparse.Namespace) -> RunConfig:
    overrides = _overrides(args)
    if not args.resume:
        return RunConfig.from_sources(args.config, overrides)
    folder = Path(args.resume)
    if args.config or set(overrides) - {"rounds"}:
        raise ConfigError("resume", "continues DIR/config.toml as it is; only --rounds may change")
    if not (folder / "config.toml").is_file() or not (folder / "checkpoint.pt").is_file():
        raise ConfigError("resume", f"{folder} holds no config.toml and checkpoint.pt to resume from")
    return RunConfig.from_sources(folder / "config.toml", {**overrides, "out": str(folder)})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
        from fedvb.experiment import make_algorithm, prepare

        prepare(config)  # load and split the data, check model/data fit: all before any training
        make_algorithm(config)
    except (ValueError, FileNotFoundError) as error:  # ConfigError, data and partition errors name their field
        print("fedvb: error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    from fedvb.backends import run

    logging.getLogger("flwr").setLevel(logging.WARNING)  # after flwr's import, which sets its own level

    started = time.perf_counter()
    first_round = _checkpoint_round(config) + 1 if args.resume else 1
    display = RunDisplay(args.output, config.rounds, first_round)
    run(config, resume=bool(args.resume), report=display)
    summary = json.loads((Path(config.out) / "summary.json").read_text())
    seconds = time.perf_counter() - started
    if summary.get("status") == "stopped":
        display.finish(summary, f"fedvb: {config.strategy} stopped after {seconds:.1f} s -> {config.out}")
        print(f"fedvb: error: {summary['reason']}; continue with: fedvb run --resume {config.out}", file=sys.stderr)
        return 1
    display.finish(summary, f"fedvb: {config.strategy} finished in {seconds:.1f} s -> {config.out}")
    return 0


def _checkpoint_round(config: RunConfig) -> int:
    import torch

    return int(torch.load(Path(config.out) / "checkpoint.pt", weights_only=True)["round"])


if __name__ == "__main__":
    sys.exit(main())
