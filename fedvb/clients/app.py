"""The fedvb ClientApp: unpack the server's payload, run the algorithm's client step, reply.

The whole run configuration arrives in each message's ConfigRecord, so the
same ClientApp serves the in-process backend, Ray actors and ``flwr run``.
The client's private state (for BayesADMM presets the site, two model-sized
vectors, plus momentum and a step counter with IVON; FedDyn and SCAFFOLD one
vector, FedADMM two; Adam's moments under ``optimizer_state = "kept"``)
arrives in the message's ``state`` record and the new state goes back beside
the reply, less a BayesADMM site, which the server computes from the reply:
the server commits it only when it accepts the reply, and checkpoints it
(see :mod:`fedvb.strategies.base`).  Injected
faults (:mod:`fedvb.faults`) strike here.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedvb.clients.api import partition_of, partition_reply, reply_to
from fedvb.core.trainers import TorchTrainer
from fedvb.experiment import make_algorithm, make_trainer
from fedvb.faults import attack_reply, before_attacking, before_training, choose_fault, corrupt_reply
from fedvb.records import CONFIG_KEY, config_from_json

__all__ = ["answer_train", "app", "make_client_app", "trainer_for"]


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


def trainer_for(message: Message, context: Context) -> TorchTrainer:
    """The trainer of the client a TRAIN message is for (its data under the run's configuration)."""
    return _trainer(str(message.content["config"][CONFIG_KEY]), partition_of(context))


def answer_train(message: Message, context: Context, *, trainer: TorchTrainer | None = None) -> Message:
    """This client's reply to a TRAIN message: faults and attacks where the run asks for them, the algorithm's
    client step on ``trainer`` (default: :func:`trainer_for`; the cohort engine passes a member of its cohort,
    :mod:`fedvb.clients.cohort`)."""
    key = str(message.content["config"][CONFIG_KEY])
    config = config_from_json(key)
    partition_id = partition_of(context)
    server_round, attempt = int(message.content["config"]["server-round"]), int(message.content["config"]["attempt"])
    fault = choose_fault(
        config.faults, seed=config.seed, server_round=server_round, attempt=attempt, partition_id=partition_id
    )
    before_training(fault, config.client_timeout_s)
    before_attacking(config.attack, server_round=server_round, partition_id=partition_id)
    algorithm = _algorithm(key)

    def tamper(reply, payload, state):
        return attack_reply(config.attack, corrupt_reply(fault, reply), payload, server_round=server_round,
                            partition_id=partition_id)  # fmt: skip

    trainer = trainer if trainer is not None else _trainer(key, partition_id)
    return reply_to(message, config, algorithm, trainer, partition_id, tamper=tamper)


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
        return answer_train(msg, context)

    return app


app = make_client_app(torch_threads=1)  # the ClientApp `flwr run` loads (pyproject.toml)
