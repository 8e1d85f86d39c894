"""Flower strategies for every fedvb algorithm.

``make_strategy(config)`` returns the strategy for ``config.strategy``:
Flower's own FedAvg for ``fedavg`` and :class:`AlgorithmStrategy` over the
core algorithm for the others (fedprox, feddyn, fedadmm, scaffold, fedlap,
fedlap-cov, ivon-admm, bayes-admm-newton, pvi). Any Flower ServerApp can use
them::

    strategy = make_strategy(RunConfig.from_mapping({"strategy": "ivon-admm", "num_clients": 10}))
    strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=5)
"""

from fedvb.config import RunConfig
from fedvb.strategies.base import AlgorithmStrategy, PartitionAddressing
from fedvb.strategies.fedavg import FedAvg

__all__ = ["AlgorithmStrategy", "FedAvg", "PartitionAddressing", "make_strategy"]


def make_strategy(config: RunConfig) -> AlgorithmStrategy | FedAvg:
    if config.strategy == "fedavg":
        return FedAvg(config)
    return AlgorithmStrategy(config)
