"""The fedvb ClientApp: unpack the server's payload, run the algorithm's client step, reply.

The whole run configuration arrives in each message's ConfigRecord, so the
same ClientApp serves the in-process backend, Ray actors and ``flwr run``.
Per-client state (sites, duals, control variates, IVON momentum) lives in
``context.state`` under ``fedvb``: for BayesADMM presets two model-sized
vectors (the site), plus two more (momentum and a step counter) with IVON;
FedDyn and SCAFFOLD keep one, FedADMM two.
"""

from __future__ import annotations

import functools

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedvb.experiment import client_generator, make_algorithm, make_trainer
from fedvb.records import CONFIG_KEY, config_from_json, from_array_record, split_reply, to_array_record

__all__ = ["app", "make_client_app"]

STATE_KEY = "fedvb"


@functools.lru_cache(maxsize=8)
def _algorithm(key: str):
    return make_algorithm(config_from_json(key))


@functools.lru_cache(maxsize=1024)
def _trainer(key: str, partition_id: int):
    return make_trainer(config_from_json(key), partition_id)


def make_client_app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Tell the server which partition this node holds (Flower does not)."""
        from flwr.app import MetricRecord

        return Message(RecordDict({"info": MetricRecord({"partition-id": _partition(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        torch.set_num_threads(1)  # one thread per client process: two are several times slower here
        key = str(msg.content["config"][CONFIG_KEY])
        config = config_from_json(key)
        partition_id = _partition(context)
        algorithm, trainer = _algorithm(key), _trainer(key, partition_id)
        state = from_array_record(context.state[STATE_KEY]) if STATE_KEY in context.state else {}
        payload = from_array_record(msg.content["payload"])
        server_round = int(msg.content["config"]["server-round"])
        reply, new_state = algorithm.client_round(
            payload, state, trainer, generator=client_generator(config, server_round, partition_id)
        )
        context.state[STATE_KEY] = to_array_record(new_state) if new_state else ArrayRecord()
        arrays, metrics = split_reply(reply, partition_id)
        return Message(RecordDict({"reply": arrays, "metrics": metrics}), reply_to=msg)

    return app


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


app = make_client_app()
