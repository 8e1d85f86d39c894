"""FedAvg: Flower's own FedAvg, addressed and sampled like every fedvb strategy.

Aggregation (the example-weighted average) is Flower's ``FedAvg.aggregate_train``;
only the choice of clients and the per-client messages are ours, so that the
run matches the plain-loop driver's :class:`fedvb.core.algorithms.FedAvg`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedvb.config import RunConfig
from fedvb.core.algorithms import FedAvg as FedAvgAlgorithm
from fedvb.experiment import initial_mean
from fedvb.records import from_array_record, to_array_record
from fedvb.strategies.base import PartitionAddressing

__all__ = ["FedAvg"]


class FedAvg(FlowerFedAvg):
    """Flower's FedAvg with fedvb's client addressing; the replies' ``reply`` record is averaged."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=0.0, arrayrecord_key="payload")
        self.config = config
        self.algorithm = FedAvgAlgorithm()
        self._mean = initial_mean(config)
        self.addressing = PartitionAddressing(config)

    def initial_arrays(self) -> ArrayRecord:
        return to_array_record({"mean": self._mean})

    def posterior(self):
        return None

    def mean(self):
        return self._mean

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.addressing.messages(grid, server_round, config)
        for message in messages:
            message.content["payload"] = to_array_record({"mean": self._mean})
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, list(replies))
        if arrays is not None:
            self._mean = from_array_record(arrays)["mean"].to(self._mean)
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []
