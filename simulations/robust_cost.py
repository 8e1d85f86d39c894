"""What the robust combinations cost an honest run: the papers' Fashion-MNIST heterogeneous setting
(simulations/fmnist_heterogeneous.toml), IVON-ADMM and FedAvg, each with ``combine`` = mean, trimmed and
median, no attacker. Prints a Markdown table (benchmarks/results/robust.md holds its last output).

    .venv/bin/python simulations/robust_cost.py [--rounds 20] [--seed 62] [--out DIR]

FedAvg runs with lr 1e-3 (the paper publishes no FedAvg setting for this split; the other keys as the
TOML). About 10 minutes on 2 cores at 20 rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from study import start_study

from fedvb.backends import run
from fedvb.config import RunConfig

TOML = Path(__file__).with_name("fmnist_heterogeneous.toml")
STRATEGIES = {"ivon-admm": {}, "fedavg": {"lr": 1e-3}}
RULES = ("mean", "trimmed", "median")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=62)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    out = start_study(args.out, "fedvb-robust-")
    print(f"Fashion-MNIST heterogeneous, K = 10, 10% of the data, {args.rounds} rounds, seed {args.seed}, no attacker")
    print()
    print("| strategy | combine | accuracy | NLL | ECE | replies rejected | vs mean |")
    print("|---|---|---|---|---|---|---|")
    for strategy, changes in STRATEGIES.items():
        baseline = None
        for rule in RULES:
            folder = out / f"{strategy}-{rule}"
            config = RunConfig.from_sources(
                TOML, {"strategy": strategy, "rounds": args.rounds, "seed": args.seed, "combine": rule,
                       "out": str(folder), **changes},
            )  # fmt: skip
            run(config, overwrite=True)
            summary = json.loads((folder / "summary.json").read_text())
            baseline = summary["accuracy"] if baseline is None else baseline
            print(f"| {strategy} | {rule} | {summary['accuracy']:.4f} | {summary['nll']:.4f} | {summary['ece']:.4f} | "
                  f"{summary['rejected_replies']} | {summary['accuracy'] - baseline:+.4f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
