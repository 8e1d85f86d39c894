"""The ClientApp's answers for a whole cohort at once: ``engine = "vectorised"`` (fedvb.core.cohort).

Each TRAIN message is answered by the ClientApp's own :func:`~fedvb.clients.app.answer_train` (faults,
attacks, the algorithm's client step, the reply), every client in a thread of its own with a member of the
cohort engine for a trainer, so the replies are the ClientApp's replies; only the local training runs
vectorised. Other messages (the partition query) go to the ClientApp as they are.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedvb.clients.app import answer_train, trainer_for
from fedvb.core.cohort import CohortEngine
from fedvb.workers import error_reply, execute

__all__ = ["cohort_replies"]

log = logging.getLogger(__name__)


def cohort_replies(
    client_app: ClientApp, messages: Iterable[Message], contexts: dict[int, Context], *, chunk: int
) -> Iterator[Message]:
    """The replies to ``messages`` in their order: TRAIN messages ``chunk`` at a time through the cohort engine
    (0: all of them at once), any other through ``client_app``."""
    pending: list[Message] = []
    for message in messages:
        if message.metadata.message_type != MessageType.TRAIN:
            yield from _train_together(pending, contexts)
            pending = []
            yield execute(client_app, message, contexts[message.metadata.dst_node_id])
            continue
        pending.append(message)
        if chunk and len(pending) == chunk:
            yield from _train_together(pending, contexts)
            pending = []
    yield from _train_together(pending, contexts)


def _train_together(messages: list[Message], contexts: dict[int, Context]) -> Iterator[Message]:
    if not messages:
        return
    nodes = [contexts[m.metadata.dst_node_id] for m in messages]
    trainers, tasks, failed = [], [], {}
    for index, (message, context) in enumerate(zip(messages, nodes)):
        try:
            trainers.append(trainer_for(message, context))
        except Exception as error:  # noqa: BLE001 (this client's reply is the error, as the loop's would be)
            failed[index] = error
            continue
        tasks.append(functools.partial(_answer, message, context))
    outcomes = iter(CohortEngine().run(tasks, trainers))
    for index, message in enumerate(messages):
        outcome = failed.get(index)
        if outcome is None:
            outcome = next(outcomes)
        yield error_reply(message, outcome) if isinstance(outcome, BaseException) else outcome


def _answer(message: Message, context: Context, member) -> Message:
    return answer_train(message, context, trainer=member)
