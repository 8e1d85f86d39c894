"""FedAvg: Flower's own FedAvg, addressed and sampled like every fedvb strategy.

Aggregation (the example-weighted average) is Flower's ``FedAvg.aggregate_train``
over the replies that pass fedvb's screen; the choice of clients, the
per-client messages and the screen are ours (:class:`ReplyScreen`), so that
the run matches the plain-loop driver's :class:`fedvb.core.algorithms.FedAvg`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import Tensor

from fedvb.config import RunConfig
from fedvb.core.algorithms import FedAvg as FedAvgAlgorithm
from fedvb.core.algorithms import ServerState
from fedvb.experiment import initial_mean, with_defences
from fedvb.records import from_array_record, to_array_record
from fedvb.strategies.base import ReplyScreen

__all__ = ["FedAvg"]


class FedAvg(ReplyScreen, FlowerFedAvg):
    """Flower's FedAvg with fedvb's client addressing and screen; the replies' ``reply`` record is averaged."""

    def __init__(
        self, config: RunConfig, *, start: Tensor | None = None, known_examples: dict[int, int] | None = None
    ) -> None:
        """``start`` and ``known_examples`` as for :class:`~fedvb.strategies.base.AlgorithmStrategy`."""
        FlowerFedAvg.__init__(
            self, fraction_train=config.fraction_train, fraction_evaluate=0.0, arrayrecord_key="payload"
        )
        ReplyScreen.__init__(self, config, known_examples)
        self.algorithm = with_defences(FedAvgAlgorithm(), config)
        self._mean = initial_mean(config) if start is None else start.detach().double()

    def initial_arrays(self) -> ArrayRecord:
        return to_array_record({"mean": self._mean})

    def posterior(self):
        return None

    def mean(self):
        return self._mean

    def state_dict(self) -> dict[str, Any]:
        return {"arrays": {"mean": self._mean}, "client_store": self.store_state()}

    def load_state_dict(self, state: dict[str, Any], folder: str | None = None) -> None:
        self._mean = self.load_store(state, folder, {"mean": self._mean})["mean"]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.outgoing(grid, server_round, config, {"mean": self._mean})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server = ServerState({"mean": self._mean})
        accepted = self.screen(server_round, replies, self.algorithm, server, keep_messages=True)
        bounded = self.algorithm.bound(server, {k: reply for k, (_, reply, _) in accepted.items()})
        for k, (message, reply, _) in accepted.items():
            if bounded[k]["mean"] is not reply["mean"]:  # clipped: Flower averages what the message holds
                message.content["reply"] = to_array_record({"mean": bounded[k]["mean"]})
        arrays, metrics = super().aggregate_train(server_round, [message for message, _, _ in accepted.values()])
        if arrays is not None and self.algorithm.combination.rule != "mean":  # Flower's average is the plain one
            means = [reply["mean"] for reply in bounded.values()]
            sizes = [float(reply["num_examples"]) for reply in bounded.values()]
            arrays = to_array_record({"mean": self.algorithm.combination.mean(means, sizes).to(self._mean)})
        self.commit_states(accepted, self.algorithm, server)
        self.log_bounds(server_round, self.algorithm)
        if arrays is not None:
            self._mean = from_array_record(arrays)["mean"].to(self._mean)
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []
