"""Where clients run: ``inprocess`` (a Flower Grid that calls the ClientApp directly) or ``ray``.

Both drive the same ServerApp logic, Strategy and ClientApp objects, and give
the same numbers for the same seed.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedvb.config import RunConfig

__all__ = ["InProcessGrid", "act_as_server", "run"]

log = logging.getLogger(__name__)


class InProcessGrid(Grid):
    """A Flower Grid that executes the ClientApp in this process, one message after another.

    No Ray, no SuperLink, no polling: the overhead per round is a function call
    per client. Nodes get random-looking ids (as under Flower's simulation) and
    each keeps its own ``Context`` (with ``partition-id``) for the whole run. A
    client that raises produces an error reply, as Flower's engines do.  With a
    ``timeout`` each client runs in a worker thread and gets that long: clients
    run one after another here, so the limit is per client (as under fedvb's Ray
    backend, :mod:`fedvb.ray_backend`); a late reply is dropped, as Flower drops replies after its timeout,
    and a node still busy with a late message finishes it before it takes the next.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, seed: int = 0, run_id: int = 1) -> None:
        self.client_app = client_app
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
        self._busy: dict[int, tuple[threading.Thread, list[str]]] = {}  # node -> its late message's worker
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

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self._counter += 1
            message_id = f"inprocess-{self._counter}"
            # Flower 1.42 has no public setter for a message's id and run id (Metadata exposes them read-only);
            # its own grids and SuperLink state write these same fields (flwr/superlink/grid/inmemory_grid.py),
            # so this runtime does as they do.
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run.run_id
            self._replies[message_id] = self._execute(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if timeout is None:
            replies = []
            for done, message in enumerate(messages, 1):
                replies.extend(self.pull_messages(self.push_messages([message])))
                self._report_progress(done, len(messages))
            return replies
        replies = []
        for done, message in enumerate(messages, 1):
            node = message.metadata.dst_node_id
            if node in self._busy:
                late, ids = self._busy.pop(node)
                late.join()
                self.pull_messages(ids)  # discarded: its round is over
            result: list[str] = []
            worker = threading.Thread(
                target=lambda m=message, out=result: out.extend(self.push_messages([m])), daemon=True
            )
            worker.start()
            worker.join(timeout)
            if result:
                replies.extend(self.pull_messages(result))
            else:
                self._busy[node] = (worker, result)
                log.warning("client on node %s gave no reply within %.1f s", node, timeout)
            self._report_progress(done, len(messages))
        return replies

    def _report_progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress({"event": "clients", "done": done, "of": total})

    def _execute(self, message: Message) -> Message:
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(message, context)
        except Exception as error:  # a failing client must not take the server down
            log.warning("client on node %s raised: %s", message.metadata.dst_node_id, error)
            reason = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


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

    if config.backend == "inprocess":
        grid = InProcessGrid(make_client_app(), config.num_clients, seed=config.seed)
        grid.on_progress = report
        act_as_server(grid)
        run_server(grid, config, resume=resume, overwrite=overwrite, report=report)
        return
    from flwr.simulation import run_simulation

    from fedvb.ray_backend import installed

    # Without ray_address, a private Ray of our own: "local" starts one even where another cluster runs on this
    # machine or RAY_ADDRESS names one (a bare ray.init() would attach to it, and to the code its workers hold).
    init_args = (
        {"address": config.ray_address} if config.ray_address else {"address": "local", "include_dashboard": False}
    )
    backend_config = {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": init_args,
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
