"""Where clients run: ``inprocess`` (a Flower Grid that calls the ClientApp directly) or ``ray``.

Both drive the same ServerApp logic, Strategy and ClientApp objects, and give
the same numbers for the same seed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedvb.config import RunConfig
from fedvb.workers import WorkerPool, available_cores, execute, shared_pool

__all__ = ["InProcessGrid", "act_as_server", "client_workers", "run", "worker_count"]

log = logging.getLogger(__name__)


class CohortRunner(Protocol):
    """Answers a round's messages together (``engine = "vectorised"``): the replies in the messages' order, each
    node's context in ``contexts`` updated (in process: :func:`fedvb.clients.cohort.cohort_replies`; on Ray:
    :class:`fedvb.ray_cohort.RayCohorts`)."""

    def __call__(self, messages: Iterable[Message], contexts: dict[int, Context]) -> Iterator[Message]: ...


@runtime_checkable
class DrainableMessages(Protocol):
    """A round's outgoing messages that can be built one at a time as they are sent, each forgotten once
    handed over (:class:`fedvb.strategies.base.Outgoing`); a grid that sends them in turn calls :meth:`drain`
    instead of iterating, so a round never holds the cohort's messages at once."""

    def drain(self) -> Iterator[Message]: ...


class InProcessGrid(Grid):
    """A Flower Grid that executes the ClientApp in this process, one message after another, or on a
    :class:`~fedvb.workers.WorkerPool` (``pool``: a round's clients spread over its processes).

    No Ray, no SuperLink, no polling: the overhead per round is a function call
    per client. Nodes get random-looking ids (as under Flower's simulation) and
    each keeps its own ``Context`` (with ``partition-id``) for the whole run. A
    client that raises produces an error reply, as Flower's engines do.  With a
    ``timeout`` each client runs in a worker thread and gets that long: clients
    run one after another here, so the limit is per client (as under fedvb's Ray
    backend, :mod:`fedvb.ray_backend`); a late reply is dropped, as Flower drops replies after its timeout,
    and a node still busy with a late message finishes it before it takes the next.  On a pool the
    replies come back in the messages' order and each client's limit counts from its start on a worker.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        seed: int = 0,
        run_id: int = 1,
        pool: WorkerPool | None = None,
        cohort: CohortRunner | None = None,
    ) -> None:
        self.client_app = client_app
        self.pool = pool
        self.cohort = cohort  # engine = vectorised: what answers a round's messages together (None: one by one)
        ids = np.random.default_rng(seed).choice(2**62, size=num_nodes, replace=False) + 1
        self.contexts = {
            int(node_id): Context(
                run_id=run_id,
                node_id=int(node_id),
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for k, node_id in enumerate(ids)
        }
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message] = {}
        self._counter = 0
        self._busy: dict[int, tuple[threading.Thread, list[Message]]] = {}  # node -> its late message's worker
        # receives {"event": "clients", "done": d, "of": n} after each client of a send_and_receive
        self.on_progress: Callable[[dict], None] | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _stamp(self, message: Message) -> str:
        self._counter += 1
        message_id = f"inprocess-{self._counter}"
        # Flower 1.42 has no public setter for a message's id and run id (Metadata exposes them read-only);
        # its own grids and SuperLink state write these same fields (flwr/superlink/grid/inmemory_grid.py),
        # so this runtime does as they do.
        message.metadata.__dict__["_message_id"] = message_id
        message.metadata.__dict__["_run_id"] = self._run.run_id
        return message_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        replies = list(self._run_messages(messages, timeout=None))  # with no deadline every message is answered
        ids = [message.metadata.message_id for message in messages]
        self._replies.update(zip(ids, replies, strict=True))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The replies, as a stream: each message is built (``messages`` may be lazy), run and answered in
        turn, so a round holds one client's messages at a time, not the cohort's (the caller takes each reply
        as it comes; the order is the messages' order, on one worker or many)."""
        return self._run_messages(messages, timeout=timeout)

    def _run_messages(self, messages: Iterable[Message], *, timeout: float | None) -> Iterator[Message]:
        if not isinstance(messages, Sized):
            messages = list(messages)
        total = len(messages)
        if isinstance(messages, DrainableMessages):  # build each message as it is sent, keep none
            messages = messages.drain()
        if self.cohort is not None:  # the cohort engine: a chunk's messages are held while it trains together
            for done, reply in enumerate(self.cohort(self._stamped(messages), self.contexts), 1):
                yield reply
                self._report_progress(done, total)
            return
        if self.pool is not None:
            jobs = ((m, self.contexts[m.metadata.dst_node_id]) for m in self._stamped(messages))
            for result in self.pool.stream(jobs, total, timeout=timeout, on_done=self._report_progress):
                if result is not None:
                    reply, context = result
                    self.contexts[context.node_id] = context
                    yield reply
            return
        for done, message in enumerate(self._stamped(messages), 1):
            reply = self._execute(message, timeout)
            if reply is not None:
                yield reply
            self._report_progress(done, total)

    def _stamped(self, messages: Iterable[Message]) -> Iterator[Message]:
        for message in messages:
            self._stamp(message)
            yield message

    def _execute(self, message: Message, timeout: float | None) -> Message | None:
        """``message``'s reply from the ClientApp in this process; ``None`` when it ran past ``timeout`` (it
        runs on in a thread; its node finishes it before it takes the next message, whose round it missed)."""
        node = message.metadata.dst_node_id
        if timeout is None:
            return execute(self.client_app, message, self.contexts[node])
        if node in self._busy:
            late, _ = self._busy.pop(node)
            late.join()  # its reply is discarded: its round is over
        result: list[Message] = []
        worker = threading.Thread(
            target=lambda: result.append(execute(self.client_app, message, self.contexts[node])), daemon=True
        )
        worker.start()
        worker.join(timeout)
        if result:
            return result[0]
        self._busy[node] = (worker, result)
        log.warning("client on node %s gave no reply within %.1f s", node, timeout)
        return None

    def _report_progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress({"event": "clients", "done": done, "of": total})


def worker_count(config: RunConfig) -> int:
    """How many worker processes an in-process run uses: ``workers`` (0: one per core this process may run
    on; one on a GPU, which the clients would share), never more than the clients of a round."""
    wanted = config.workers or (1 if config.device != "cpu" else available_cores())
    return max(1, min(wanted, math.ceil(config.fraction_train * config.num_clients)))


@contextlib.contextmanager
def client_workers(config: RunConfig) -> Iterator[WorkerPool | None]:
    """The worker pool of an in-process run, with the run's data in shared memory; ``None`` for one worker
    (clients run in this process). The pool outlives the run (:func:`fedvb.workers.shared_pool`) unless the
    run ends in an exception (Ctrl-C mid-round leaves workers busy): then it is stopped."""
    count = worker_count(config)
    if count == 1:
        yield None
        return
    from fedvb.clients.app import make_client_app
    from fedvb.experiment import adopt_prepared, share_prepared

    shared, payload = share_prepared(config)
    try:
        pool = shared_pool(count, make_client_app, setup=adopt_prepared)
        pool.share(payload)
        try:
            yield pool
        except BaseException:
            pool.close()
            raise
    finally:
        shared.close()


@contextlib.contextmanager
def _clients(config: RunConfig) -> Iterator[tuple[WorkerPool | None, CohortRunner | None]]:
    """What runs the clients of a run on fedvb's own Grid: the worker pool (``engine = "loop"``, in process), or
    what trains the cohorts (``engine = "vectorised"``: the engine in this process, or chunks on Ray actors)."""
    if config.engine != "vectorised":
        with client_workers(config) as pool:
            yield pool, None
        return
    if config.backend == "ray":
        from fedvb.ray_cohort import ray_cohorts

        with ray_cohorts(config) as cohorts:
            yield None, cohorts.replies
        return
    from fedvb.clients.app import make_client_app
    from fedvb.clients.cohort import cohort_replies

    yield None, functools.partial(cohort_replies, make_client_app(), chunk=config.cohort_chunk)


def act_as_server(grid: InProcessGrid) -> None:
    """Flower stamps new messages with the identity of the task the process runs, which its own runtimes
    set; with an :class:`InProcessGrid` we are that runtime (as flwr.server.compat does)."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = grid.run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def run(config: RunConfig, *, resume: bool = False, overwrite: bool = False, report=None) -> None:
    """Run ``config`` on its backend and write the run folder ``config.out`` (continue it when ``resume``;
    replace a run already there when ``overwrite``); ``report`` receives each round's metrics row and the
    progress within rounds (see :func:`fedvb.servers.app.run_server`)."""
    from fedvb.clients.app import make_client_app
    from fedvb.servers.app import make_server_app, run_server

    if config.engine == "vectorised" or config.backend == "inprocess":  # the server's own round loop
        with _clients(config) as (pool, cohort):
            grid = InProcessGrid(make_client_app(), config.num_clients, seed=config.seed, pool=pool, cohort=cohort)
            grid.on_progress = report
            act_as_server(grid)
            run_server(grid, config, resume=resume, overwrite=overwrite, report=report)
        return
    from flwr.simulation import run_simulation

    from fedvb.ray_backend import init_args, installed

    backend_config = {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": init_args(config),
    }
    # fedvb's Ray backend heals dead actors and limits each client from its start (fedvb.ray_backend), so
    # the server sets no deadline of its own on a round.
    server_app = make_server_app(config, resume=resume, overwrite=overwrite, report=report, round_deadline=False)
    with installed(config):
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(),
            num_supernodes=config.num_clients,
            backend_config=backend_config,
        )
