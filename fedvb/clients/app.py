"""The fedvb ClientApp: unpack the server's payload, run the algorithm's client step, reply.

The whole run configuration arrives in each message's ConfigRecord, so the
same ClientApp serves the in-process backend, Ray actors and ``flwr run``.
The client's private state (for BayesADMM presets the site, two model-sized
vectors, plus momentum and a step counter with IVON; FedDyn and SCAFFOLD one
vector, FedADMM two) arrives in the message's ``state`` record and the new
state goes back beside the reply: the server commits it only when it accepts
the reply, and checkpoints it (see :mod:`fedvb.strategies.base`).  Injected
faults (:mod:`fedvb.faults`) strike here.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedvb.clients.api import partition_of, partition_reply, reply_to
from fedvb.experiment import make_algorithm, make_trainer
from fedvb.faults import attack_reply, before_training, choose_fault, corrupt_reply
from fedvb.records import CONFIG_KEY, config_from_json

__all__ = ["app", "make_client_app"]


@functools.lru_cache(maxsize=8)
def _algorithm(key: str):
    return make_algorithm(config_from_json(key))


# A trainer holds a model (its parameters and their gradients) and the client's rows: about 2 MB for the papers'
# MLP, so a cache over every client of a large federation grows with K (2 GB at K = 1,000). Building one takes
# about 1 ms (`make_trainer`, Fashion-MNIST's MLP), against tens of ms for its local training: the cache spares
# a small cohort's rebuilds and stays small.
@functools.lru_cache(maxsize=16)
def _trainer(key: str, partition_id: int):
    return make_trainer(config_from_json(key), partition_id)


def make_client_app(*, torch_threads: int | None = None) -> ClientApp:
    """fedvb's ClientApp. ``torch_threads``: set torch's thread count before each client trains (the
    ``app`` that ``flwr run`` loads uses 1: one client per worker process); ``None`` leaves the process's
    setting alone, as library code must (the CLI and fedvb's Ray actors set it in their entry points)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Tell the server which partition this node holds (Flower does not)."""
        return partition_reply(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)  # one thread per client process: two are several times slower
        key = str(msg.content["config"][CONFIG_KEY])
        config = config_from_json(key)
        partition_id = partition_of(context)
        server_round, attempt = int(msg.content["config"]["server-round"]), int(msg.content["config"]["attempt"])
        fault = choose_fault(
            config.faults, seed=config.seed, server_round=server_round, attempt=attempt, partition_id=partition_id
        )
        before_training(fault, config.client_timeout_s)
        algorithm, trainer = _algorithm(key), _trainer(key, partition_id)

        def tamper(reply, payload, state):
            def consistent(crafted):
                return algorithm.consistent_reply(payload, state, crafted)

            return attack_reply(config.attack, corrupt_reply(fault, reply), payload, server_round=server_round,
                                partition_id=partition_id, consistent=consistent)  # fmt: skip

        return reply_to(msg, config, algorithm, trainer, partition_id, tamper=tamper)

    return app


app = make_client_app(torch_threads=1)  # the ClientApp `flwr run` loads (pyproject.toml)
