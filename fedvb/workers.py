"""Worker processes for the in-process backend: a round's clients spread over N persistent processes.

Each worker is a spawned Python process with one torch thread that builds the run's ClientApp once and
then runs whatever message it is given, with the destination node's :class:`~flwr.app.Context` (the
grid keeps every node's context and ships it with the message, as Flower's simulation does, so any idle
worker can take any client). The run's prepared data (:func:`fedvb.experiment.prepare`) is loaded once,
by the server process, and handed to the workers in shared memory, not copied or reloaded per worker.

Replies come back as Flower's protobuf bytes and are parsed, never unpickled. Clients are independent
given their message and each draws from its own (seed, round, client) stream, so a round's numbers do
not depend on how many workers run it or on which worker ran which client: the grid returns replies in
the order of the messages. A client that runs past ``timeout`` (counted from its start on a worker)
is dropped, as under one worker; its worker finishes it and its late reply is discarded. A worker
that dies (killed, out of memory, a crash in native code) answers its client with an error reply and
is replaced.

Why not :mod:`concurrent.futures`: a process pool breaks as a whole when one worker dies
(``BrokenProcessPool``), cannot say when a task started (the deadline is per client, from its start),
and would unpickle the replies.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Connection, wait

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.app.message import make_message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedvb.parsing import PARSING

__all__ = [
    "SharedData", "WorkerPool", "attach", "available_cores", "close_pools", "execute", "pool_pids", "shared_pool",
]  # fmt: skip

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MAX_FRAMES = 1_000_000  # more arrays than any message has: a count beyond it is a broken stream


def send_message(connection: Connection, message: Message, context: Context) -> None:
    """Send ``message`` and ``context`` as the frames of :func:`message_frames`, one by one."""
    for frame in message_frames(message, context):
        connection.send_bytes(frame)


def message_frames(message: Message, context: Context) -> list[bytes]:
    """``message`` and ``context`` as frames: their count, Flower's protobuf of the message with every array's
    bytes left out, those bytes one frame each, then the context's protobuf. Flower's ``message_to_proto``
    copies each array's bytes three times (40-70 ms for a 9 MB IVON-ADMM message of the papers' MLP, a third of
    that client's local training); a frame is the array's own bytes."""
    data: list[bytes] = []
    header = message
    if message.has_content():
        content = RecordDict()
        for name, record in message.content.items():
            if isinstance(record, ArrayRecord):
                empty = {}
                for key, array in record.items():
                    data.append(array.data)
                    empty[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=b"")
                record = ArrayRecord(array_dict=empty, keep_input=False)
            content[name] = record
        header = make_message(metadata=message.metadata, content=content)
    header_bytes = message_to_proto(header).SerializeToString()
    return [len(data).to_bytes(8, "little"), header_bytes, *data, context_to_proto(context).SerializeToString()]


def receive_message(connection: Connection) -> tuple[Message, Context]:
    """What :func:`send_message` sent: parsed as Flower's protobuf and raw array bytes, never unpickled.
    ``ValueError`` for a stream that does not add up."""
    return message_from_frames(iter(connection.recv_bytes, None))


def message_from_frames(frames: Iterator[bytes]) -> tuple[Message, Context]:
    """The message and context of :func:`message_frames`, taken from ``frames`` in order: Flower's protobuf and
    raw array bytes, never unpickled. ``ValueError`` for frames that do not add up."""
    count = int.from_bytes(next(frames), "little")
    if count > MAX_FRAMES:
        raise ValueError(f"a message of {count} arrays")
    message = message_from_proto(ProtoMessage.FromString(next(frames)))
    slots = [(record, key) for record in (message.content.values() if message.has_content() else [])
             if isinstance(record, ArrayRecord) for key in record]  # fmt: skip
    if len(slots) != count:
        raise ValueError(f"a message of {len(slots)} arrays announced as {count}")
    for record, key in slots:
        array = record[key]
        record[key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=next(frames))
    return message, context_from_proto(ProtoContext.FromString(next(frames)))


def execute(client_app: ClientApp, message: Message, context: Context) -> Message:
    """``client_app``'s reply to ``message``; a client that raises gives an error reply, as Flower's engines do."""
    try:
        return client_app(message, context)
    except Exception as error:  # a failing client must not take the server down
        return error_reply(message, error)


def error_reply(message: Message, error: BaseException) -> Message:
    """The error reply of a client that raised ``error`` answering ``message`` (as Flower's engines make one)."""
    log.warning("client on node %s raised: %s", message.metadata.dst_node_id, error)
    with PARSING:  # traceback's caret anchors parse source lines (fedvb.parsing)
        trace = "".join(traceback.format_exception(error))
    reason = f"{type(error).__name__}: {error}\n{trace}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


@dataclass(frozen=True)
class SharedArray:
    """Where a worker finds one array of the shared data: a shared-memory block, its shape and dtype."""

    block: str
    shape: tuple[int, ...]
    dtype: str


class SharedData:
    """Arrays copied once into shared memory (owned here, unlinked on :meth:`close`) and the description
    a worker rebuilds them from."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.blocks: list[shared_memory.SharedMemory] = []
        self.spec: dict[str, SharedArray] = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            block = shared_memory.SharedMemory(create=True, size=max(array.nbytes, 1))
            np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
            self.blocks.append(block)
            self.spec[name] = SharedArray(block.name, array.shape, array.dtype.str)

    def close(self) -> None:
        for block in self.blocks:
            block.close()
            block.unlink()
        self.blocks.clear()


_ATTACHED: list[shared_memory.SharedMemory] = []  # a worker's open blocks: the arrays' memory lives as long


def attach(spec: dict[str, SharedArray]) -> dict[str, np.ndarray]:
    """A worker's read-only views of the arrays ``spec`` describes (blocks of earlier data that nothing
    uses any more are closed first, so a worker serving run after run holds one run's data)."""
    for block in list(_ATTACHED):
        try:
            block.close()
            _ATTACHED.remove(block)
        except BufferError:  # an array of it is still in use (a cached trainer or model): keep it open
            pass
    arrays = {}
    for name, shared in spec.items():
        # Python < 3.13 registers an attached block with the resource tracker as if this process owned it;
        # a spawned worker shares its server's tracker, where the name is registered already (a set), and the
        # server unlinks it: so nothing is to be undone here.
        block = shared_memory.SharedMemory(name=shared.block)
        _ATTACHED.append(block)
        view = np.ndarray(shared.shape, np.dtype(shared.dtype), buffer=block.buf)
        view.flags.writeable = False
        arrays[name] = view
    return arrays


Setup = Callable[[object], None]  # a worker's set-up of one run's data, from what the pool was given


def _worker_main(connection: Connection, app_factory: Callable[[], ClientApp], setup: Setup | None) -> None:
    """A worker's loop: ``("data", payload)`` installs a run's shared data (``setup``), ``("run",)`` followed
    by a message (:func:`send_message`) is answered with the reply and the node's updated context the same
    way, ``("stop",)`` ends it."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle: it stops the workers
    torch.set_num_threads(1)  # this process is one of N: one thread each keeps every core busy, none oversubscribed
    client_app = app_factory()
    connection.send(("ready",))  # a client's deadline starts when it reaches a worker that can run it, not before
    while True:
        try:
            order = connection.recv()  # from the server process that started us (our own parent)
        except EOFError:
            return
        if order[0] == "stop":
            return
        if order[0] == "data":
            setup(order[1])
            continue
        message, context = receive_message(connection)
        send_message(connection, execute(client_app, message, context), context)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: Connection
    job: int | None = None  # index of the message it runs in the current call
    started: float = 0.0
    late: bool = False  # it runs a message whose client was given up on
    ready: bool = False  # it has built its ClientApp (a spawned worker takes seconds to import torch and Flower)
    message: Message | None = None  # the message it runs (what an error reply answers)
    context_sent: Context | None = None  # and its node's context as sent (kept when the worker dies)


class WorkerPool:
    """``size`` worker processes running ``app_factory()``'s ClientApp (a module-level callable: it is
    imported by name in each spawned worker). ``setup(payload)`` runs in each worker for every
    :meth:`share` of a run's data, and again in a worker that replaces a dead one."""

    def __init__(self, size: int, app_factory: Callable[[], ClientApp], *, setup: Setup | None = None) -> None:
        if size < 1:
            raise ValueError(f"workers: must be >= 1, got {size}")
        self._factory, self._setup = app_factory, setup
        self._context = multiprocessing.get_context("spawn")  # fork would copy a server mid-run, threads and all
        self._data: object | None = None  # the latest data payload, for replacement workers
        self._workers = [self._start() for _ in range(size)]

    @property
    def size(self) -> int:
        return len(self._workers)

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(theirs, self._factory, self._setup), daemon=True, name="fedvb-worker"
        )
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        if self._data is not None:
            worker.connection.send(("data", self._data))
        return worker

    @property
    def alive(self) -> bool:
        return bool(self._workers)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (to measure or watch them)."""
        return [worker.process.pid for worker in self._workers]

    def share(self, payload: object) -> None:
        """Send every worker ``payload`` for ``setup`` (a description of the run's shared data, not the
        data), in place of the previous run's."""
        self._data = payload
        for worker in self._workers:
            try:
                worker.connection.send(("data", payload))
            except (BrokenPipeError, ConnectionResetError):
                pass  # it died: it is replaced, with this payload, before it is given a client

    def run(
        self,
        jobs: list[tuple[Message, Context]],
        *,
        timeout: float | None = None,
        on_done: Callable[[int, int], None] | None = None,
    ) -> list[tuple[Message, Context] | None]:
        """Each job's reply and its node's updated context, in the jobs' order; ``None`` for a client that
        gave no reply within ``timeout`` seconds of its start. ``on_done(done, total)`` after each."""
        return list(self.stream(jobs, len(jobs), timeout=timeout, on_done=on_done))

    def stream(
        self,
        jobs: Iterable[tuple[Message, Context]],
        total: int,
        *,
        timeout: float | None = None,
        on_done: Callable[[int, int], None] | None = None,
    ) -> Iterator[tuple[Message, Context] | None]:
        """:meth:`run` as a stream: a job is taken from ``jobs`` (``total`` of them) only when a worker is free,
        and each result is given as soon as it and every result before it are in (replies out of order wait
        for those before them, so a consumer sees the jobs' order). A consumer that stops early leaves the
        workers it had busy finishing, as for a late client; their replies are discarded."""
        pending = iter(jobs)
        taken = finished = given = 0
        results: dict[int, tuple[Message, Context] | None] = {}
        try:
            while given < total:
                for slot, worker in enumerate(self._workers):
                    idle = worker.job is None and not worker.late
                    if idle and taken < total and not worker.process.is_alive():
                        worker = self._workers[slot] = self._start()  # it died between rounds
                    if worker.ready and worker.job is None and not worker.late and taken < total:
                        message, context = next(pending)
                        worker.job, worker.started = taken, time.monotonic()
                        worker.message, worker.context_sent = message, context
                        taken += 1
                        try:
                            worker.connection.send(("run",))
                            send_message(worker.connection, message, context)
                        except (BrokenPipeError, ConnectionResetError):
                            pass  # it died: the wait below sees it and answers for it
                for index, result in self._collect(timeout):
                    results[index] = result
                    finished += 1
                    if on_done:
                        on_done(finished, total)
                while given in results:
                    yield results.pop(given)
                    given += 1
        finally:
            for worker in self._workers:  # stopped early: whatever they run now is given up on
                if worker.job is not None:
                    worker.job, worker.late = None, True

    def _collect(self, timeout: float | None) -> list[tuple[int, tuple[Message, Context] | None]]:
        """Wait for a worker to finish, die, start or run past ``timeout``; the jobs that ended, with their
        results (``None``: no reply in time)."""
        busy = [w for w in self._workers if w.job is not None or w.late or not w.ready]
        waits = [w.started + timeout - time.monotonic() for w in busy if w.job is not None and timeout]
        ready = wait(
            [w.connection for w in busy] + [w.process.sentinel for w in busy],
            timeout=max(0.0, min(waits)) if waits else None,
        )
        ended = []
        for slot, worker in enumerate(self._workers):
            if not worker.ready:
                self._await_start(slot, ready)
                continue
            if worker.job is None and not worker.late:
                continue
            index, message = worker.job, worker.message
            if worker.connection in ready or worker.process.sentinel in ready:
                answer = self._receive(worker)
                if answer is None:  # the worker died
                    code = worker.process.exitcode
                    self._workers[slot] = self._start()
                    if worker.late:
                        continue
                    reason = f"the worker process running this client died (exit code {code})"
                    log.warning("client on node %s: %s", message.metadata.dst_node_id, reason)
                    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                    answer = (Message(error, reply_to=message), worker.context_sent)
                elif worker.late:
                    worker.late = False  # its late reply is discarded: that client's round is over
                    continue
                worker.job = worker.message = None
                ended.append((index, answer))
            elif not worker.late and timeout and time.monotonic() - worker.started >= timeout:
                log.warning("client on node %s gave no reply within %.1f s", message.metadata.dst_node_id, timeout)
                worker.job, worker.message, worker.late = None, None, True
                ended.append((index, None))
        return ended

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every worker has built its ClientApp (to time rounds without the workers' start-up)."""
        deadline = time.monotonic() + timeout
        while starting := [w for w in self._workers if not w.ready]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(starting)} worker process(es) not started within {timeout:.0f} s")
            ready = wait([w.connection for w in starting] + [w.process.sentinel for w in starting], timeout=1.0)
            for slot in range(len(self._workers)):
                if not self._workers[slot].ready:
                    self._await_start(slot, ready)

    def _await_start(self, slot: int, ready: list) -> None:
        """Mark the worker in ``slot`` ready once it says so; one that died starting cannot run any client."""
        worker = self._workers[slot]
        if worker.connection not in ready and worker.process.sentinel not in ready:
            return
        try:
            worker.ready = worker.connection.recv() == ("ready",)
        except (EOFError, OSError) as err:
            worker.process.join(5)
            code = worker.process.exitcode
            raise RuntimeError(f"a worker process died starting its ClientApp (exit code {code})") from err

    @staticmethod
    def _receive(worker: _Worker) -> tuple[Message, Context] | None:
        try:
            return receive_message(worker.connection)
        except (EOFError, OSError, ValueError):  # it died mid-reply, or its stream is broken: it is replaced
            worker.process.kill()
            worker.process.join(5)
            return None

    def close(self) -> None:
        """Stop every worker (a worker busy with a late client is killed)."""
        for worker in self._workers:
            try:
                if worker.late or worker.job is not None:
                    worker.process.kill()
                else:
                    worker.connection.send(("stop",))
            except (BrokenPipeError, ConnectionResetError):
                pass
        for worker in self._workers:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self._workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_POOLS: dict[tuple, WorkerPool] = {}


def shared_pool(size: int, app_factory: Callable[[], ClientApp], *, setup: Setup | None = None) -> WorkerPool:
    """A pool of ``size`` workers for this process, started on first use and kept for the runs that follow
    (a sweep or a test session pays the workers' start-up once); stopped at exit (:func:`close_pools`)."""
    key = (size, app_factory, setup)
    pool = _POOLS.get(key)
    if pool is None or not pool.alive:
        if not _POOLS:
            atexit.register(close_pools)
        pool = _POOLS[key] = WorkerPool(size, app_factory, setup=setup)
    return pool


def pool_pids() -> list[int]:
    """The process ids of every worker :func:`shared_pool` started."""
    return [pid for pool in _POOLS.values() for pid in pool.pids]


def close_pools() -> None:
    """Stop every pool :func:`shared_pool` started."""
    while _POOLS:
        _POOLS.popitem()[1].close()
