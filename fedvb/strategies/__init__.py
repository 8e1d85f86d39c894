"""Flower strategies for every fedvb algorithm.

``make_strategy(config)`` returns the strategy for a fedvb run configuration (fedvb's own data and models):
Flower's own FedAvg for ``fedavg`` and :class:`AlgorithmStrategy` over the core algorithm for the others.
``for_model(name, model, num_clients=..., **keys)`` builds the same strategies for a model and data of your
own, in your own Flower app (no fedvb dataset is read); its clients call :mod:`fedvb.clients.api`::

    strategy = for_model("ivon-admm", MyNet(), num_clients=3, lr=2e-3, local_epochs=2)
    result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=5,
                            evaluate_fn=my_evaluate)
"""

from typing import Any

from torch import nn
from torch.nn.utils import parameters_to_vector

from fedvb.config import RunConfig
from fedvb.experiment import make_algorithm
from fedvb.strategies.base import AlgorithmStrategy, PartitionAddressing
from fedvb.strategies.fedavg import FedAvg

__all__ = ["AlgorithmStrategy", "FedAvg", "PartitionAddressing", "for_model", "make_strategy"]


def make_strategy(config: RunConfig) -> AlgorithmStrategy | FedAvg:
    if config.strategy == "fedavg":
        return FedAvg(config)
    return AlgorithmStrategy(config)


def for_model(
    strategy: str,
    model: nn.Module,
    *,
    num_clients: int,
    client_sizes: dict[int, int] | None = None,
    **keys: Any,
) -> AlgorithmStrategy | FedAvg:
    """The fedvb strategy ``strategy`` (a name of ``fedvb.core.registry``) for ``model``'s architecture,
    started at its current weights, over ``num_clients`` clients (partitions 0..K-1).

    ``keys``: any fedvb configuration key that applies (``fraction_train``, ``seed``, ``rho``, ``lr``,
    ``local_epochs``, ``combine``, ...), checked as the CLI checks them (one clear error naming the key);
    the training keys travel to the clients. ``client_sizes``: each client's example count where you know
    it; a reply claiming another count is then rejected (without it counts are taken as sent)."""
    config = RunConfig.from_mapping({**keys, "strategy": strategy, "num_clients": num_clients})
    start = parameters_to_vector(p for p in model.parameters() if p.requires_grad).detach()
    known = dict(client_sizes or {})
    if strategy == "fedavg":
        return FedAvg(config, start=start, known_examples=known)
    algorithm = make_algorithm(config, with_data=False, model=model)
    return AlgorithmStrategy(config, algorithm, start=start, known_examples=known)
