"""Follow one parameter of a BayesADMM run round by round: the server's mean and precision there, and each
client's reply (its posterior's mean and precision) and site at that coordinate.

    .venv/bin/python simulations/trace_coordinate.py [CONFIG] --index 17137 [--set seed=62] [--rounds N]
        [--out trace.csv]

CONFIG defaults to simulations/fmnist_heterogeneous.toml. The run is the core's plain loop
(``study.core_loop``, the numbers of every backend for the same seed); nothing is written but
the CSV (one row per round and client: round, client, reply mean and precision, site linear and quadratic,
then the server's mean and precision after the round). For a first-layer weight of an MLP it also prints
which input and unit the coordinate joins and, per client, how many of its rows have that input nonzero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from study import add_loop_arguments, core_loop, loop_config, write_csv

from fedvb.experiment import make_trainer

TOML = Path(__file__).with_name("fmnist_heterogeneous.toml")
FIELDS = ["round", "client", "reply_mean", "reply_precision", "site_linear", "site_quadratic", "server_mean",
          "server_precision"]  # fmt: skip


def _describe(trainers, index: int) -> None:
    """Which input and unit a first-layer weight joins, and how often each client sees that input."""
    first = next(trainers[0].model.parameters())
    if first.dim() != 2 or index >= first.numel():
        return
    unit, feature = divmod(index, first.shape[1])
    print(f"coordinate {index}: first-layer weight of unit {unit} from input {feature}")
    for k, trainer in enumerate(trainers):
        column = trainer.x.reshape(trainer.num_examples, -1)[:, feature]
        print(f"  client {k}: {trainer.num_examples} rows, input {feature} nonzero in {int((column != 0).sum())}"
              f" (mean {float(column.float().mean()):.2f})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loop_arguments(parser, TOML, "trace.csv")
    parser.add_argument("--index", type=int, required=True, help="the coordinate of the flat parameter vector")
    args = parser.parse_args(argv)
    config, rounds = loop_config(parser, args)
    trainers = [make_trainer(config, k) for k in range(config.num_clients)]
    _describe(trainers, args.index)
    i, rows, replies = args.index, [], {}

    def on_reply(client: int, reply: dict) -> None:
        replies[client] = reply

    def on_round(server_round, server):
        mean, precision = float(server.arrays["mean"][i]), float(server.arrays["precision"].reshape(-1)[i])
        for k in sorted(replies):
            reply, site = replies[k], server.sites.get(k)
            rows.append([server_round, k, float(reply["mean"][i]), float(reply["precision"].reshape(-1)[i]),
                         float(site.linear[i]) if site else 0.0, float(site.quadratic.reshape(-1)[i]) if site else 0.0,
                         mean, precision])  # fmt: skip
        replies.clear()
        print(f"round {server_round:3d}: server mean {mean: .4g}, precision {precision:.4g}", flush=True)

    server = core_loop(config, trainers, rounds, on_reply=on_reply, on_round=on_round)
    final = server.arrays["mean"].abs()
    print(f"largest |server mean| at the end: {float(final.max()):.4g} at index {int(final.argmax())}")
    write_csv(args.out, FIELDS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
