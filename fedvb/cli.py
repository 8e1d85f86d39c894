"""``fedvb`` command line: ``fedvb run [CONFIG.toml] [flags] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from fedvb.config import ConfigError, RunConfig, describe_fields

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
    for name, kind in FLAGS.items():
        run.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=f"sets {name}")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="any key")
    run.add_argument("--quiet", action="store_true", help="print only the final summary line")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    values = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    for item in args.sets:
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = RunConfig.from_sources(args.config, _overrides(args))
        from fedvb.experiment import make_algorithm, prepare

        prepare(config)  # load and split the data, check model/data fit: all before any training
        make_algorithm(config)
    except (ValueError, FileNotFoundError) as error:  # ConfigError, data and partition errors name their field
        print("fedvb: error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    from fedvb.backends import run

    logging.getLogger("flwr").setLevel(logging.WARNING)  # after flwr's import, which sets its own level

    started = time.perf_counter()
    run(config)
    summary = json.loads((Path(config.out) / "summary.json").read_text())
    if not args.quiet:
        for row in (Path(config.out) / "metrics.jsonl").read_text().splitlines():
            print(row)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
    print(f"fedvb: {config.strategy} finished in {time.perf_counter() - started:.1f} s -> {config.out}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
