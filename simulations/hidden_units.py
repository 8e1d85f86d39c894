"""Whether an MLP's hidden units still pass signal, round by round: for the server model on the test inputs and
for each client's reply on its own rows, the share of (input, unit) pairs at which a unit is saturated.

    .venv/bin/python simulations/hidden_units.py [CONFIG] [--set KEY=VALUE] [--rounds N] [--out units.csv]

CONFIG defaults to simulations/mnist_two_class.toml. It runs the configuration's first N rounds (default: all)
with the core's plain loop (``study.core_loop``: the numbers every backend gives for the same seed, round r
the run's round r).
Nothing is written but the CSV: one row per round (0 is the initialisation) and hidden layer, with

- ``server_saturated``: the share of (test input, unit) pairs at which the server mean's unit is saturated,
  that is, its activation's slope is below a tenth of the activation's largest slope (a sigmoid outside about
  [0.026, 0.974], a ReLU at or below zero): little gradient reaches the layers below through it;
- ``server_spread``: the mean over units of the activation's standard deviation over the test inputs (near 0:
  the layer gives every input the same features, and the model predicts one distribution for all);
- ``client_saturated``: the mean over this round's replies of the same share for the reply's mean on the
  client's own rows;
- ``weight_abs_mean``: the mean absolute server weight into the layer; ``accuracy``: the server mean's test
  accuracy.

Why: the BayesADMM paper's MNIST two-class setting (IVON-ADMM, lr 0.02, h0 5e-3) saturates the second sigmoid
layer of every client in its first epoch, and the run learns only once the server model's units come back
(README, "The papers' claims").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from study import add_loop_arguments, core_loop, loop_config, write_csv
from torch import nn

from fedvb.experiment import initial_mean, make_trainer, prepare

TOML = Path(__file__).with_name("mnist_two_class.toml")
FIELDS = ["round", "layer", "server_saturated", "server_spread", "client_saturated", "weight_abs_mean", "accuracy"]
SLOPE_FRACTION = 0.1  # saturated: the activation's slope below this fraction of its largest


def _largest_slope(activation: nn.Module) -> float:
    z = torch.linspace(-10, 10, 4001, requires_grad=True)
    activation(z).sum().backward()
    return float(z.grad.max())


def hidden_units(model: nn.Module, x: torch.Tensor) -> list[tuple[float, float]]:
    """Per hidden activation module of ``model``, in order: (the share of (row of ``x``, unit) pairs at which the
    unit is saturated, the mean over units of the activation's standard deviation over the rows)."""
    activations = [m for m in model.modules() if isinstance(m, (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.GELU))]
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, args, _out: inputs.append(args[0].detach())) for m in activations]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    profile = []
    for activation, z in zip(activations, inputs):
        z = z.clone().requires_grad_(True)
        out = activation(z)
        out.sum().backward()  # elementwise: each entry's gradient is its own slope
        saturated = z.grad < SLOPE_FRACTION * _largest_slope(activation)
        spread = out.detach().std(0).mean() if len(x) > 1 else torch.tensor(0.0)
        profile.append((float(saturated.float().mean()), float(spread)))
    return profile


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loop_arguments(parser, TOML, "units.csv")
    args = parser.parse_args(argv)
    config, rounds = loop_config(parser, args)
    trainers = [make_trainer(config, k) for k in range(config.num_clients)]
    dataset = prepare(config).dataset
    x_test, y_test = torch.as_tensor(dataset.x_test), torch.as_tensor(dataset.y_test)
    probe = make_trainer(config, 0)  # a model to load each mean into; its data is not used
    rows: list[list] = []
    client_profiles: list[list[tuple[float, float]]] = []

    def on_reply(client: int, reply: dict) -> None:
        probe.set_flat(reply["mean"])
        client_profiles.append(hidden_units(probe.model, trainers[client].x))

    def record(server_round: int, mean: torch.Tensor) -> None:
        probe.set_flat(mean)
        server = hidden_units(probe.model, x_test)
        with torch.no_grad():
            accuracy = float((probe.model(x_test).argmax(1) == y_test).float().mean())
        weights = _linear_weights(probe.model)
        for layer, (saturated, spread) in enumerate(server):
            clients = [p[layer][0] for p in client_profiles]
            client_saturated = sum(clients) / len(clients) if clients else float("nan")
            rows.append([server_round, layer + 1, saturated, spread, client_saturated,
                         float(weights[layer].detach().abs().mean()), accuracy])  # fmt: skip
        client_profiles.clear()
        layers = ", ".join(f"layer {i + 1} saturated {s:.2f} spread {d:.3g}" for i, (s, d) in enumerate(server))
        print(f"round {server_round:3d}: accuracy {accuracy:.3f}; {layers}", flush=True)

    record(0, initial_mean(config))
    core_loop(config, trainers, rounds, on_reply=on_reply, on_round=lambda r, server: record(r, server.arrays["mean"]))
    write_csv(args.out, FIELDS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
