"""What a ClientApp of your own calls to take part in a fedvb federation with your model and data.

The server (a fedvb strategy, e.g. :func:`fedvb.strategies.for_model`) sends each client the algorithm's
payload, the client's own state (sites, duals, IVON momentum: the strategy holds them) and the run's
configuration; :func:`train_reply` runs the algorithm's client step on your ``model`` and your ``x``,
``y`` and returns the reply message, the state handled inside. :func:`partition_reply`
answers the server's one query (which partition this node holds)::

    app = ClientApp()

    @app.query()
    def query(msg, context):
        return partition_reply(msg, context)

    @app.train()
    def train(msg, context):
        x, y = my_data(context.node_config["partition-id"])
        return train_reply(msg, context, MyNet(), x, y)

The model's trainable parameters, flattened in ``model.parameters()`` order, are what the server's mean
stands for (build the strategy from the same architecture). fedvb's own ClientApp (:mod:`fedvb.clients.app`)
answers through the same :func:`reply_to`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from fedvb.config import RunConfig
from fedvb.core.algorithms import Algorithm, client_step
from fedvb.core.trainers import TorchTrainer
from fedvb.experiment import client_generator, local_settings, make_algorithm, round_lr
from fedvb.records import CONFIG_KEY, config_from_json, from_array_record, split_reply, to_array_record

__all__ = ["partition_reply", "reply_to", "train_reply"]

Arrays = dict[str, Tensor]


def partition_of(context: Context) -> int:
    """The partition (client number) this node holds, as Flower's simulation and `flwr run` set it."""
    return int(context.node_config["partition-id"])


def partition_reply(message: Message, context: Context) -> Message:
    """The answer to the strategy's query: which partition this node holds (Flower tells the server only
    node ids)."""
    return Message(RecordDict({"info": MetricRecord({"partition-id": partition_of(context)})}), reply_to=message)


@functools.lru_cache(maxsize=8)
def _algorithm_from_hyperparameters(key: str) -> Algorithm:
    return make_algorithm(config_from_json(key), with_data=False)


def train_reply(
    message: Message,
    context: Context,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    task: str = "classification",
    device: str | torch.device | None = None,
) -> Message:
    """The reply of this client to a fedvb TRAIN message, trained on ``model`` (its architecture, not its
    weights: the server's mean is loaded into it) with ``x``, ``y`` (``task``: ``classification`` with
    integer labels, or ``regression``) on ``device``."""
    key = str(message.content["config"][CONFIG_KEY])
    config = config_from_json(key)
    trainer = TorchTrainer(model, torch.as_tensor(x), torch.as_tensor(y), task, local_settings(config), device=device)
    return reply_to(message, config, _algorithm_from_hyperparameters(key), trainer, partition_of(context))


def reply_to(
    message: Message,
    config: RunConfig,
    algorithm: Algorithm,
    trainer: TorchTrainer,
    partition: int,
    *,
    tamper: Callable[[Arrays, Arrays, Arrays], Arrays] | None = None,
) -> Message:
    """Run ``algorithm``'s client step for ``partition`` on ``trainer`` and pack the reply and the new state.
    ``tamper(reply, payload, state)``: fedvb's fault injection and attacks (fedvb.faults), else none."""
    server_round = int(message.content["config"]["server-round"])
    state = from_array_record(message.content["state"]) if "state" in message.content else {}
    payload = from_array_record(message.content["payload"])
    trainer.begin_round(round_lr(config, server_round))
    reply, new_state = client_step(
        algorithm, payload, state, trainer, generator=client_generator(config, server_round, partition)
    )
    if tamper is not None:
        reply = tamper(reply, payload, state)
    arrays, metrics = split_reply(reply, partition)
    content = RecordDict({"reply": arrays, "metrics": metrics})
    if new_state:
        content["state"] = to_array_record(new_state)
    return Message(content, reply_to=message)
