"""A Flower Message-API strategy that runs any :class:`~fedvb.core.algorithms.Algorithm`.

It only moves tensors: ``configure_train`` packs the algorithm's payload into
a fresh RecordDict per client (Flower's FedAvg shares one RecordDict between
messages), ``aggregate_train`` unpacks the replies and calls the algorithm's
``server_round``.  Clients are addressed by partition id, learnt once with a
query message (Flower gives the server only node ids), and sampled with
:func:`fedvb.core.driver.sample_participants`, so the Flower path draws the
same clients and random streams as the plain-loop driver.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedvb.config import RunConfig
from fedvb.core.algorithms import Algorithm, ServerState
from fedvb.core.driver import sample_participants
from fedvb.core.gaussian import Gaussian
from fedvb.experiment import initial_mean, make_algorithm
from fedvb.records import CONFIG_KEY, config_to_json, join_reply, to_array_record

__all__ = ["AlgorithmStrategy", "PartitionAddressing"]

log = logging.getLogger(__name__)


class PartitionAddressing:
    """Learns which node holds which partition and samples participants by partition id."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._config_json = config_to_json(config)
        self.node_of: dict[int, int] = {}

    def discover(self, grid: Grid) -> None:
        if self.node_of:
            return
        node_ids = sorted(grid.get_node_ids())
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in grid.send_and_receive(queries):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not report its partition: {reply.error}")
            self.node_of[int(reply.content["info"]["partition-id"])] = reply.metadata.src_node_id
        if sorted(self.node_of) != list(range(self.config.num_clients)):
            raise RuntimeError(
                f"expected partitions 0..{self.config.num_clients - 1}, nodes report {sorted(self.node_of)}"
            )

    def messages(self, grid: Grid, server_round: int, config: ConfigRecord) -> list[Message]:
        """One TRAIN message per sampled client, each with its own RecordDict (the caller adds the payload)."""
        self.discover(grid)
        chosen = sample_participants(
            self.config.num_clients, self.config.fraction_train, seed=self.config.seed, server_round=server_round
        )
        round_config = {**dict(config), CONFIG_KEY: self._config_json, "server-round": server_round}
        return [
            Message(
                RecordDict({"config": ConfigRecord(round_config)}),
                dst_node_id=self.node_of[k],
                message_type=MessageType.TRAIN,
            )
            for k in chosen
        ]


class AlgorithmStrategy(Strategy):
    """Any fedvb algorithm as a Flower strategy; the server state lives on the instance."""

    def __init__(self, config: RunConfig, algorithm: Algorithm | None = None) -> None:
        self.config = config
        self.algorithm = algorithm or make_algorithm(config)
        self.server: ServerState = self.algorithm.init_server(initial_mean(config), config.num_clients)
        self.addressing = PartitionAddressing(config)

    # -- what the ServerApp reads --------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        return to_array_record({"mean": self.algorithm.server_mean(self.server)})

    def posterior(self) -> Gaussian | None:
        return self.algorithm.server_posterior(self.server)

    def mean(self):
        return self.algorithm.server_mean(self.server)

    # -- Strategy ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.addressing.messages(grid, server_round, config)
        for message in messages:  # a fresh payload record per client
            message.content["payload"] = to_array_record(self.algorithm.payload(self.server))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        received = {}
        for message in replies:
            if message.has_error():
                log.warning(
                    "round %d: node %s failed: %s", server_round, message.metadata.src_node_id, message.error.reason
                )
                continue
            partition = int(message.content["metrics"]["partition-id"])
            received[partition] = join_reply(message.content["reply"], message.content["metrics"])
        ordered = dict(sorted(received.items()))  # the plain loop's order, whatever order replies arrive in
        self.server = self.algorithm.server_round(self.server, ordered, self.config.num_clients)
        metrics = MetricRecord(
            {"replies": len(ordered), "num-examples": sum(float(r["num_examples"]) for r in ordered.values())}
        )
        return self.initial_arrays(), metrics

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the server evaluates its own model (ServerApp)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "fedvb %s over %d clients (fraction %.2f)",
            self.algorithm.name,
            self.config.num_clients,
            self.config.fraction_train,
        )
