"""``engine = "vectorised"`` on Ray: the cohort split into chunks, each trained together by one Ray actor.

Flower's simulation engine hands one message to one actor call, so it cannot train a chunk of clients
together; this route is fedvb's own. The server runs its round loop on fedvb's in-process Grid
(:class:`~fedvb.backends.InProcessGrid`), whose cohort runner here is :class:`RayCohorts`: a round's TRAIN
messages are split into one chunk per actor (``cohort_chunk`` at most each, when set), each chunk goes to an
actor as Flower protobuf and raw array bytes (:func:`fedvb.workers.message_frames`, never unpickled by
fedvb), the actor answers it with :func:`fedvb.clients.cohort.cohort_replies` (the cohort engine on its CPU
or its GPU) and sends the replies and the nodes' contexts back the same way; replies come back in the
messages' order. An actor holds ``client_gpus`` GPUs (one per actor on a GPU cluster) or ``client_cpus``
CPUs; the run's data reach the actors once through Ray's object store (as on the ``ray`` backend).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator

import ray
from flwr.app import Context, Message

from fedvb.config import RunConfig
from fedvb.ray_backend import ACTOR_START_S, init_args, warm_up
from fedvb.records import config_to_json
from fedvb.workers import message_frames, message_from_frames

__all__ = ["RayCohorts", "ray_cohorts"]

Frames = list[bytes]


@ray.remote
class CohortActor:
    """One actor: the run's data taken up once (:func:`fedvb.ray_backend.warm_up`), then chunks answered."""

    def __init__(self, config_json: str, data: list[ray.ObjectRef]) -> None:
        warm_up(config_json, data[0])  # in a list: Ray would resolve a reference given as an argument itself

    def answer(self, chunk: list[Frames]) -> list[Frames]:
        from fedvb.clients.app import make_client_app
        from fedvb.clients.cohort import cohort_replies

        pairs = [message_from_frames(iter(frames)) for frames in chunk]
        contexts = {context.node_id: context for _, context in pairs}
        replies = cohort_replies(make_client_app(), [m for m, _ in pairs], contexts, chunk=0)
        return [message_frames(reply, contexts[message.metadata.dst_node_id])
                for reply, (message, _) in zip(replies, pairs)]  # fmt: skip


class RayCohorts:
    """The cohort runner of an :class:`~fedvb.backends.InProcessGrid` that trains chunks on Ray actors."""

    def __init__(self, actors: list, chunk: int) -> None:
        self.actors, self.chunk = actors, chunk

    def replies(self, messages: Iterable[Message], contexts: dict[int, Context]) -> Iterator[Message]:
        """The replies to ``messages``, in their order; ``contexts`` are updated with what each client kept."""
        messages = list(messages)
        if not messages:
            return
        size = math.ceil(len(messages) / len(self.actors))
        if self.chunk:
            size = min(size, self.chunk)
        chunks = [messages[start : start + size] for start in range(0, len(messages), size)]
        futures = [
            self.actors[index % len(self.actors)].answer.remote(
                [message_frames(m, contexts[m.metadata.dst_node_id]) for m in chunk]
            )
            for index, chunk in enumerate(chunks)
        ]
        for future in futures:
            for frames in ray.get(future):
                reply, context = message_from_frames(iter(frames))
                contexts[context.node_id] = context
                yield reply


@contextlib.contextmanager
def ray_cohorts(config: RunConfig) -> Iterator[RayCohorts]:
    """The actors of a vectorised run on Ray (a private Ray unless ``ray_address`` names a cluster), each with
    the run's data, started before the first round; shut down after it."""
    from fedvb.experiment import prepared_parts

    own = not ray.is_initialized()
    if own:
        ray.init(**init_args(config), logging_level="WARNING")
    try:
        resources = ray.cluster_resources()
        if config.client_gpus > 0:
            count = max(1, int(resources.get("GPU", 0) // config.client_gpus))
            options = {"num_gpus": config.client_gpus, "num_cpus": config.client_cpus}
        else:
            count = max(1, int(resources.get("CPU", 1) // config.client_cpus))
            options = {"num_cpus": config.client_cpus}
        count = min(count, math.ceil(config.fraction_train * config.num_clients))
        data = ray.put(prepared_parts(config))
        actor = functools.partial(CohortActor.options(**options).remote, config_to_json(config), [data])
        actors = [actor() for _ in range(count)]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=ACTOR_START_S)
        yield RayCohorts(actors, config.cohort_chunk)
        for a in actors:
            ray.kill(a)
    finally:
        if own:
            ray.shutdown()
