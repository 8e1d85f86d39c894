"""Flower's Ray backend, made to notice and heal: dead actors replaced, client time limits per client.

Flower 1.42's ``RayBackend`` puts an actor back into its pool after any failure, also after the actor
died (``RayActorError``): every later message that lands on it fails the same way, and the run goes on
with fewer clients in silence. Its only time limit is the server's per-round deadline, which also counts
actor start-up and the wait for a free actor. :class:`HealingRayBackend` changes three things:

- a dead actor is replaced by a fresh one and the client's message runs once more, on the new actor (a
  client's work is a function of the seed, the round, the client and its context, so the retry gives the
  reply the dead actor would have given); if that actor dies too, the reply is an error (rejected, so the
  run ends ``completed_with_losses``);
- ``client_timeout_s`` is applied to each client from the moment an idle actor starts its job: an actor
  that overruns is killed and replaced, and the reply is an error saying so (recorded in ``rejected``);
- the pool's actors are started, and each has imported fedvb and taken up the run's data, before any
  message is sent (so neither counts as a client's time); the data are prepared once, by the driver, and
  reach the actors through Ray's object store (one copy per node, read in place), not loaded and
  partitioned again by every actor.

Flower has no hook for a custom backend (``vce_api`` imports ``RayBackend`` from its module when the
simulation starts), so :func:`installed` swaps that module attribute for the duration of a fedvb run and
restores it after; it is used by ``fedvb.backends.run`` for ``backend = "ray"``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend import raybackend

from fedvb.config import RunConfig
from fedvb.records import config_to_json

__all__ = ["ClientTimeout", "HealingRayBackend", "init_args", "installed"]

log = logging.getLogger(__name__)

ACTOR_START_S = 600.0  # how long the pool may take to start before the run is given up


class ClientTimeout(RuntimeError):
    """A client ran past ``client_timeout_s`` (counted from when an actor started it)."""


def warm_up(config_json: str, data: ray.ObjectRef | None = None) -> None:
    """What an actor does when it starts: one torch thread (one client per actor process), and the run's
    data made ready, so that a client's first job is only its own work. ``data``: the run's prepared data
    (:func:`fedvb.experiment.prepared_parts`) in Ray's object store, put there once by the driver; an actor
    reads its arrays as read-only views of its node's store (Ray moves them to each node once), so no actor
    loads or partitions the dataset again. Without it, each actor prepares the data itself."""
    import torch

    from fedvb.experiment import adopt_parts, prepare
    from fedvb.records import config_from_json

    torch.set_num_threads(1)
    if data is not None:
        adopt_parts(ray.get(data))
    prepare(config_from_json(config_json))


def init_args(config: RunConfig) -> dict[str, Any]:
    """``ray.init``'s arguments for a run: the cluster ``ray_address`` names, else a private Ray of our own
    (``"local"`` starts one even where another cluster runs on this machine or ``RAY_ADDRESS`` names one; a bare
    ``ray.init()`` would attach to it, and to the code its workers hold)."""
    return {"address": config.ray_address} if config.ray_address else {"address": "local", "include_dashboard": False}


class HealingRayBackend(raybackend.RayBackend):
    """Flower's ``RayBackend`` with dead actors replaced and per-client time limits (the module)."""

    client_timeout_s: float = 0.0  # set by installed(); 0: no limit
    config_json: str = ""  # the run's configuration (fedvb.records.config_to_json), for warm_up
    _data: ray.ObjectRef | None = None  # the run's prepared data in the object store, held while actors need it

    def build(self, app_fn: Any) -> None:
        if self.config_json:
            from fedvb.experiment import prepared_parts
            from fedvb.records import config_from_json

            # the driver has the run's data prepared already (the server's own): into the object store once,
            # one copy of its arrays in each node's shared memory (220 MB for Fashion-MNIST, whose arrays hold the
            # whole training and test sets), where every actor used to hold a copy of its own
            self._data = ray.put(prepared_parts(config_from_json(self.config_json)))
            warm = functools.partial(warm_up, self.config_json, self._data)
            self.actor_kwargs = {**self.actor_kwargs, "on_actor_init_fn": warm}
        super().build(app_fn)
        # Start-up is not a client's time: wait for every actor's process before the first message.
        ray.get([actor.__ray_ready__.remote() for actor in self.pool.pool], timeout=ACTOR_START_S)

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.pool is None or self.app_fn is None:
            raise ValueError("the Ray backend was not built before a message arrived")
        partition = str(context.node_config[PARTITION_ID_KEY])
        limit = self.client_timeout_s or None
        for attempt in (1, 2):
            future = self.pool.submit(
                lambda actor, app_fn, msg, cid, ctx: actor.run.remote(app_fn, msg, cid, ctx),
                (self.app_fn, message, partition, context),
            )
            try:
                _, reply, updated_context = ray.get(future, timeout=limit)
            except ray.exceptions.GetTimeoutError:
                self._replace_actor(future, kill=True)
                raise ClientTimeout(
                    f"client {partition} timed out: no reply {self.client_timeout_s:g} s after it started "
                    "(client_timeout_s)"
                ) from None
            except ray.exceptions.RayActorError as error:
                self._replace_actor(future, kill=False)
                if attempt == 2:
                    raise
                log.warning("client %s: its Ray actor died (%s); replaced it, running the client again",
                            partition, type(error).__name__)  # fmt: skip
                continue
            except BaseException:
                self.pool.add_actor_back_to_pool(future)  # the actor is alive: the client itself failed
                raise
            self.pool.add_actor_back_to_pool(future)
            return reply, updated_context
        raise AssertionError("unreachable")

    def _replace_actor(self, future: Any, *, kill: bool) -> None:
        """Drop the actor that ran ``future`` (killing it first when it may still run) and add a fresh one."""
        actor = self.pool._future_to_actor.pop(future)  # Flower's pool keeps no other handle on it
        if kill:
            ray.kill(actor, no_restart=True)
        fresh = self.pool.create_actor_fn()
        ray.get(fresh.__ray_ready__.remote(), timeout=ACTOR_START_S)
        self.pool.pool.append(fresh)


@contextlib.contextmanager
def installed(config: RunConfig) -> Iterator[None]:
    """Flower's simulation engine builds :class:`HealingRayBackend` for ``config`` inside the block."""
    original = raybackend.RayBackend
    settings = {"client_timeout_s": config.client_timeout_s, "config_json": config_to_json(config)}
    backend = type("HealingRayBackend", (HealingRayBackend,), settings)
    raybackend.RayBackend = backend
    try:
        yield
    finally:
        raybackend.RayBackend = original
