"""A Flower Message-API strategy that runs any :class:`~fedvb.core.algorithms.Algorithm`.

It only moves tensors: ``configure_train`` packs the algorithm's payload into
a fresh RecordDict per client (Flower's FedAvg shares one RecordDict between
messages), ``aggregate_train`` unpacks the replies and calls the algorithm's
``server_round``.  Clients are addressed by partition id, learnt once with a
query message (Flower gives the server only node ids), and sampled with
:func:`fedvb.core.driver.sample_participants`, so the Flower path draws the
same clients and random streams as the plain-loop driver.

Every reply is screened before it touches the server: error replies, replies
from clients not asked this round, missing or misshapen tensors, wrong dtypes,
non-finite values and (BayesADMM) non-positive precisions are rejected with a
logged reason, and the round goes on with the rest.  Clients' private state
(sites, duals, control variates, IVON momentum) is held here, in a client
store (:mod:`fedvb.core.client_store`: in memory, or in the run folder's files
when the ServerApp gives the strategy one), and travels with each message, so
a rejected reply leaves that client exactly as it was, and a checkpoint of the
strategy is a checkpoint of the whole federation whatever backend runs the
clients.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from fedvb.config import RunConfig
from fedvb.core.algorithms import Algorithm, RejectedReply, ServerState
from fedvb.core.client_store import ClientStore, MemoryStore, check_manifest, restore_store
from fedvb.core.driver import sample_participants
from fedvb.core.gaussian import Gaussian
from fedvb.core.robust import OUTLIER_FACTOR
from fedvb.core.tensor_checks import all_finite
from fedvb.experiment import initial_mean, make_algorithm, partition_sizes
from fedvb.records import CONFIG_KEY, config_to_json, from_array_record, join_reply, to_array_record

__all__ = ["AlgorithmStrategy", "Outgoing", "PartitionAddressing", "ReplyScreen", "RoundFailed"]

Arrays = dict[str, Tensor]

log = logging.getLogger(__name__)


class PartitionAddressing:
    """Learns which node holds which partition and samples participants by partition id."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._config_json = config_to_json(config)
        self.node_of: dict[int, int] = {}

    def discover(self, grid: Grid) -> None:
        if self.node_of:
            return
        node_ids = sorted(grid.get_node_ids())
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        for reply in grid.send_and_receive(queries):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not report its partition: {reply.error}")
            self.node_of[int(reply.content["info"]["partition-id"])] = reply.metadata.src_node_id
        if sorted(self.node_of) != list(range(self.config.num_clients)):
            raise RuntimeError(
                f"num_clients = {self.config.num_clients}, but the federation's {len(node_ids)} nodes hold "
                f"partitions {sorted(self.node_of)}; under `flwr run` give --federation-config "
                f"num-supernodes={self.config.num_clients} (or set num_clients to the number of SuperNodes)"
            )

    def partition_of(self, node_id: int) -> int | None:
        """The client (partition) a node holds, None for a node this run does not know."""
        return next((k for k, node in self.node_of.items() if node == node_id), None)

    def messages(self, grid: Grid, server_round: int, config: ConfigRecord) -> dict[int, Message]:
        """One TRAIN message per sampled client by partition, each with its own RecordDict (the caller adds
        the payload). ``config`` may carry ``attempt`` (the retry of this round; 0 by default)."""
        self.discover(grid)
        chosen = sample_participants(
            self.config.num_clients, self.config.fraction_train, seed=self.config.seed, server_round=server_round
        )
        round_config = {"attempt": 0, **dict(config), CONFIG_KEY: self._config_json, "server-round": server_round}
        return {
            k: Message(
                RecordDict({"config": ConfigRecord(round_config)}),
                dst_node_id=self.node_of[k],
                message_type=MessageType.TRAIN,
            )
            for k in chosen
        }


class Outgoing(Sequence[Message]):
    """A round's messages, each given its payload record and client state when it is first taken: a sized
    sequence for any Flower grid (Flower's own grids iterate it more than once), and :meth:`drain` for one
    that sends each message as it is built (:class:`~fedvb.backends.InProcessGrid`), so that a round holds
    one message at a time, not the cohort's."""

    def __init__(self, messages: dict[int, Message], payload: Arrays, screen: ReplyScreen) -> None:
        self._bare = list(messages.items())  # (client, message without payload), in the sampled order
        self._built: dict[int, Message] = {}
        # the payload serialised once a round; each message gets a fresh record of its own sharing these bytes
        # (immutable), where a record per client cost a serialisation per client (3 ms of IVON-ADMM's MLP)
        self._payload = dict(to_array_record(payload).items())
        self._screen = screen

    def __len__(self) -> int:
        return len(self._bare)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        if index not in self._built:
            self._built[index] = self._build(*self._bare[index])
        return self._built[index]

    def drain(self) -> Iterator[Message]:
        """Each message once, built as it is taken and not kept here."""
        for index, (client, message) in enumerate(self._bare):
            self._bare[index] = (client, None)  # the message grows its payload: only the taker holds it now
            built = self._built.pop(index, None)
            yield built if built is not None else self._build(client, message)

    def _build(self, client: int, message: Message) -> Message:
        message.content["payload"] = ArrayRecord(array_dict=self._payload)  # a fresh record per client
        state = self._screen.client_store.get(client)
        if state:
            message.content["state"] = to_array_record(state)
        self._screen.round_log["bytes_down"] += message.content["payload"].count_bytes()
        return message


class RoundFailed(RuntimeError):
    """Too few accepted replies, or an aggregate that is not finite: the round changed nothing (retry it)."""


class ReplyScreen:
    """What every fedvb strategy does around the algorithm: address clients, carry their state, screen
    replies, count bytes.  ``client_store`` and ``round_log`` are read by checkpoints and the run log."""

    def __init__(self, config: RunConfig, known_examples: dict[int, int] | None = None) -> None:
        self.config = config
        self.addressing = PartitionAddressing(config)
        self.client_store: ClientStore = MemoryStore()
        # what each client's reply may claim: the partition sizes of fedvb's data, else what the caller knows
        self.known_examples = partition_sizes(config) if known_examples is None else dict(known_examples)
        self.round_log: dict[str, Any] = {}
        self._asked: set[int] = set()

    def outgoing(self, grid: Grid, server_round: int, config: ConfigRecord, payload: Arrays) -> Outgoing:
        """This round's messages, each built with the payload and its client's own state as it is taken, so
        that a grid sending them one at a time holds one at a time (state bytes are not counted: in a
        deployment the state never leaves the client)."""
        messages = self.addressing.messages(grid, server_round, config)
        self._asked = set(messages)
        if int(config.get("attempt", 0)) == 0:  # a retry adds to its round's log
            self.round_log = {"bytes_down": 0, "bytes_up": 0, "rejected": []}
        return Outgoing(messages, payload, self)

    def screen(
        self,
        server_round: int,
        replies: Iterable[Message],
        algorithm: Algorithm,
        server: ServerState,
        *,
        keep_messages: bool = False,
    ) -> dict[int, tuple[Message | None, Arrays, Arrays]]:
        """The accepted replies by partition as ``(message, reply, new_state)``, in partition order.

        Replies are taken one at a time (``replies`` may be a stream): each is checked, then only what the
        algorithm reads of it is kept (:meth:`~fedvb.core.algorithms.Algorithm.kept_reply`, ``kept_state``)
        and its message is emptied and dropped, so a round holds one copy of what it needs, not the cohort's
        whole messages twice. ``keep_messages``: keep each accepted message whole (in place of ``None``), for
        a strategy that hands them on (Flower's FedAvg averages messages). Raises :class:`RoundFailed`
        (having changed nothing) below ``min_replies``."""
        accepted: dict[int, tuple[Message | None, Arrays, Arrays]] = {}
        answered: set[int | None] = set()
        dtype = server.arrays["mean"].dtype
        for message in replies:
            source = message.metadata.src_node_id
            answered.add(self.addressing.partition_of(source))
            try:
                if message.has_error():
                    raise ValueError(f"client error: {message.error.reason.strip().splitlines()[0]}")
                self.round_log["bytes_up"] += message.content["reply"].count_bytes()
                partition = int(message.content["metrics"]["partition-id"])
                if partition not in self._asked or partition in accepted:
                    raise ValueError(f"partition {partition} was not asked this round or replied twice")
                consume = not keep_messages
                content = message.content
                narrow = keep_messages and any(a.dtype == "float32" for a in content["reply"].values())
                # a reply's float32 tensors in the server's dtype: what a client sent narrowed (split_reply)
                reply = join_reply(content["reply"], content["metrics"], consume=consume, dtype=dtype)
                if narrow and dtype == torch.float64:  # Flower's FedAvg averages the message: widened too
                    content["reply"] = to_array_record({k: v for k, v in reply.items() if k != "num_examples"})
                state = from_array_record(content["state"], consume=consume) if "state" in content else {}
                if keep_messages and "state" in content:  # read; Flower's FedAvg takes one ArrayRecord a message
                    del content["state"]
                algorithm.check_reply(server, reply, partition)
                self._check_examples(partition, reply)
            except (KeyError, TypeError, ValueError) as error:  # RejectedReply is a ValueError
                client = self.addressing.partition_of(source)
                log.warning("round %d: rejected the reply of client %s (node %s): %s", server_round, client, source,
                            error)  # fmt: skip
                self.round_log["rejected"].append({"client": client, "node": source, "reason": str(error)})
                continue
            kept = message if keep_messages else None
            accepted[partition] = (kept, algorithm.kept_reply(reply), algorithm.kept_state(state))
        for client in sorted(self._asked - answered):  # lost: a timeout, a dead worker, a dropped message
            log.warning("round %d: no reply from client %d", server_round, client)
            node = self.addressing.node_of.get(client)
            self.round_log["rejected"].append({"client": client, "node": node, "reason": "no reply"})
        if len(accepted) < self.config.min_replies:
            first = next(iter(self.round_log["rejected"]), None)  # why, in the words of the first refusal
            why = f" (client {first['client']}: {first['reason']})" if first else ""
            raise RoundFailed(f"round {server_round}: {len(accepted)} accepted replies, min_replies is "
                              f"{self.config.min_replies}{why}")  # fmt: skip
        return dict(sorted(accepted.items()))  # the plain loop's order, whatever order replies arrive in

    def _check_examples(self, partition: int, reply: Arrays) -> None:
        """An example count gives a reply its weight (and its clipping bound): it must be the partition's size
        where the server knows it, as in fedvb's simulations."""
        claimed = float(reply["num_examples"])
        known = self.known_examples.get(partition)
        if known is not None and claimed != known:
            raise RejectedReply(f"num_examples: partition {partition} holds {known} examples, the reply says {claimed}")

    def log_bounds(self, server_round: int, algorithm: Algorithm) -> None:
        """Record the round's clipped and outlying replies (fedvb.core.robust), warning about outliers that
        nothing bounded: a reply that moves the model far beyond the cohort is never taken in silence."""
        self.round_log["clipped"] = list(algorithm.clipped)
        self.round_log["outliers"] = list(algorithm.outliers)
        unbounded = [c for c in algorithm.outliers if c not in algorithm.clipped]
        if unbounded and algorithm.combination.rule == "mean":
            log.warning("round %d: the replies of client(s) %s moved the model more than %g times the cohort's "
                        "median change, unbounded (robust_clip = 0, combine = mean; see the README, 'Crafted "
                        "replies')", server_round, ", ".join(map(str, unbounded)), OUTLIER_FACTOR)  # fmt: skip

    def commit_states(
        self, accepted: dict[int, tuple[Message | None, Arrays, Arrays]], algorithm: Algorithm, server: ServerState
    ) -> ServerState:
        """Keep each accepted client's state, as the algorithm settles it against the new server state; the
        server state reading its records from the store."""
        return algorithm.commit(server, {k: state for k, (_, _, state) in accepted.items()}, self.client_store)

    def use_client_store(self, store: ClientStore) -> None:
        """Hold the clients' states in ``store`` (the ServerApp's run folder); before the first round."""
        for client in self.client_store.clients():
            store.put(client, self.client_store.get(client))
        self.client_store.close()
        self.client_store = store

    def store_state(self) -> dict[str, Any]:
        """The client store's checkpoint manifest (its rows made durable first)."""
        return self.client_store.checkpoint()

    def load_store(self, state: dict[str, Any], folder: str | None, template: dict[str, Tensor]) -> dict[str, Tensor]:
        """The server arrays of a checkpoint's ``state``, after its client store (``client_states``: a
        checkpoint of an earlier fedvb) has replaced this one. ``template``: this strategy's own server
        arrays; the checkpoint's must have their names, shapes and dtypes, and its client states sizes that
        fit them. A checkpoint may come from a received run folder: ``ValueError`` naming what does not fit,
        before anything of it is used."""
        arrays = _checked_arrays(state, template)
        if "client_store" in state:
            manifest = state["client_store"]
            check_manifest(manifest, folder, self.config.num_clients)
            _check_state_sizes(manifest, template)
            store = restore_store(manifest, folder, self.config.num_clients)
        else:
            manifest = {"kind": "memory", "states": state.get("client_states", {})}
            check_manifest(manifest, None, self.config.num_clients)
            _check_state_sizes(manifest, template)
            store = MemoryStore(manifest["states"])
        self.client_store.close()
        self.client_store = store
        return arrays


def _checked_arrays(state: Any, template: dict[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's server arrays when they are ``template``'s names, shapes and dtypes, all finite."""
    arrays = state.get("arrays") if isinstance(state, dict) else None
    if not isinstance(arrays, dict) or set(arrays) != set(template):
        found = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise ValueError(f"the server state holds {found}, this strategy's is {sorted(template)}")
    for name, expected in template.items():
        found = arrays[name]
        if not isinstance(found, Tensor) or found.shape != expected.shape or found.dtype != expected.dtype:
            seen = (tuple(found.shape), found.dtype) if isinstance(found, Tensor) else type(found).__name__
            raise ValueError(
                f"server array {name!r} is {seen}, this strategy's is {(tuple(expected.shape), expected.dtype)}"
            )
        if not all_finite(found):
            raise ValueError(f"server array {name!r} has non-finite entries")
    return dict(arrays)


def _check_state_sizes(manifest: dict[str, Any], template: dict[str, Tensor]) -> None:
    """A disk store's per-client tensors must fit the model: a site the shape of the server's site sum, any
    other state (momentum, control variates, IVON's step) one value per parameter or a single number."""
    parameters = template["mean"].numel()
    if manifest["kind"] == "memory":
        shapes = [(name, tuple(t.shape)) for state in manifest["states"].values() for name, t in state.items()]
    else:
        shapes = [(name, tuple(entry["shape"])) for name, entry in manifest["layout"].items()]
    for name, shape in shapes:
        total = f"_site_sum_{name.removeprefix('site_')}"
        if name.startswith("site_") and total in template:
            fits = shape == tuple(template[total].shape)
        else:
            fits = int(torch.tensor(shape).prod()) in (parameters, 1)
        if not fits:
            raise ValueError(f"client state {name!r} has shape {list(shape)}, which does not fit this model")


class AlgorithmStrategy(ReplyScreen, Strategy):
    """Any fedvb algorithm as a Flower strategy; the server state lives on the instance."""

    def __init__(
        self,
        config: RunConfig,
        algorithm: Algorithm | None = None,
        *,
        start: Tensor | None = None,
        known_examples: dict[int, int] | None = None,
    ) -> None:
        """``start``: the flat initial model (default: fedvb's model for ``config``); ``known_examples``: each
        client's example count, checked against its replies (default: fedvb's partition sizes)."""
        super().__init__(config, known_examples)
        self.algorithm = algorithm or make_algorithm(config)
        mean = initial_mean(config) if start is None else start.detach().double()
        self.server: ServerState = self.algorithm.attach(
            self.algorithm.init_server(mean, config.num_clients), self.client_store
        )

    def use_client_store(self, store: ClientStore) -> None:
        super().use_client_store(store)
        self.server = self.algorithm.attach(self.server, store)

    # -- what the ServerApp reads --------------------------------------------------------------
    def initial_arrays(self) -> ArrayRecord:
        return to_array_record({"mean": self.algorithm.server_mean(self.server)})

    def posterior(self) -> Gaussian | None:
        return self.algorithm.server_posterior(self.server)

    def mean(self) -> Tensor:
        return self.algorithm.server_mean(self.server)

    def state_dict(self) -> dict[str, Any]:
        """Everything the federation holds (server tensors, and the client store's manifest: every client's
        state, sites among them), for checkpoints."""
        return {"arrays": self.server.arrays, "client_store": self.store_state()}

    def load_state_dict(self, state: dict[str, Any], folder: str | None = None) -> None:
        """Continue from :meth:`state_dict`'s checkpoint; ``folder``: the run folder a disk store lies in."""
        arrays = self.load_store(state, folder, self.server.arrays)
        self.server = self.algorithm.attach(ServerState(arrays), self.client_store)

    # -- Strategy ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.outgoing(grid, server_round, config, self.algorithm.payload(self.server))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen(server_round, replies, self.algorithm, self.server)
        replies_by_client = {k: reply for k, (_, reply, _) in accepted.items()}
        try:  # whatever the replies hold, a failed aggregation is a failed round, never a crashed server
            new = self.algorithm.server_round(self.server, replies_by_client, self.config.num_clients)
        except (ValueError, RuntimeError, ArithmeticError) as error:  # NonPositivePrecisionError among them
            raise RoundFailed(f"round {server_round}: the aggregate failed ({error}); server state kept") from None
        if not all(all_finite(v) for v in new.arrays.values()):
            raise RoundFailed(f"round {server_round}: the aggregate is not finite; server state kept")
        self.server = self.commit_states(accepted, self.algorithm, new)
        self.log_bounds(server_round, self.algorithm)
        count = sum(float(r["num_examples"]) for r in replies_by_client.values())
        return self.initial_arrays(), MetricRecord({"replies": len(accepted), "num-examples": count})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # the server evaluates its own model (ServerApp)

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "fedvb %s over %d clients (fraction %.2f)",
            self.algorithm.name,
            self.config.num_clients,
            self.config.fraction_train,
        )
