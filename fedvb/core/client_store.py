"""Every client's private state, one copy, addressed by client: in memory, or in files for large federations.

A client's state is what its algorithm keeps for it between the rounds it takes part in (its site, its
optimizer's momentum, a control variate): a dict of named tensors, what ``client_round`` returns as the new
state and what the server sends back with the client's next message. The server keeps it (a rejected reply
then leaves the client exactly as it was, whatever backend runs it) and a BayesADMM server reads its record
of a client's site from the same entry (:class:`SitesView`), so a site is held once.

- :class:`MemoryStore`: a dict; its checkpoint is every client's tensors (fine for tens of clients).
- :class:`DiskStore`: one file per state name in the run folder, a fixed-size row per client and name,
  read and written with ``pread``/``pwrite``. A round touches only its cohort's rows; nothing of the other
  clients is read, held in memory or rewritten, and the checkpoint is a small manifest (which row slot
  holds each client's current state). Why not ``np.memmap``: pages of a mapping stay in the process's
  resident set once touched, so a run over many cohorts would grow towards the whole store; with
  ``pread`` the kernel's page cache holds them, outside the process. Why not an embedded database
  (SQLite, LMDB): rows are fixed-size binary blobs addressed by an integer, which a file already is; a
  database would add a copy and a dependency for nothing.

Crash safety (shadow rows): each client has two slots per name. A round writes a client's new state into the
slot that is *not* current, and the manifest that makes the new slots current is written only after the
rows are flushed to disk (:meth:`DiskStore.checkpoint` is called by the run folder's checkpoint, which
renames a complete file into place). A kill at any moment leaves the last checkpoint's manifest pointing at
rows no later round has touched, so resuming gives the uninterrupted numbers.

The store keeps each tensor in the dtype the algorithm gives it: BayesADMM sites are float64 because the
server's natural-parameter algebra is (sums over thousands of clients of precisions near 1e6 would lose
the digits the site step's differences live in).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedvb.core.gaussian import Family, NaturalParams

__all__ = ["ClientStore", "DiskStore", "MemoryStore", "SitesView", "check_manifest", "restore_store"]

Arrays = dict[str, Tensor]
SITE_KEYS = ("site_linear", "site_quadratic")


class ClientStore(ABC):
    """Per-client states by client number (the module docstring)."""

    bytes_written = 0  # bytes of rows written since the last :meth:`take_bytes_written`

    @abstractmethod
    def get(self, client: int) -> Arrays:
        """The client's state (empty before its first accepted reply); tensors the caller may keep."""

    @abstractmethod
    def put(self, client: int, state: Arrays) -> None:
        """Make ``state`` the client's state (durable at the next :meth:`checkpoint`)."""

    @abstractmethod
    def clients_with(self, name: str) -> list[int]:
        """The clients whose state holds ``name``, in client order (read without loading any state)."""

    @abstractmethod
    def has(self, client: int, name: str) -> bool:
        """Whether the client's state holds ``name`` (read without loading it)."""

    @abstractmethod
    def clients(self) -> list[int]:
        """The clients that have a state, in client order."""

    @abstractmethod
    def checkpoint(self) -> dict[str, Any]:
        """Everything written so far made durable; the manifest :func:`restore_store` rebuilds the store from
        (tensors and plain containers only)."""

    def take_bytes_written(self) -> int:
        written, self.bytes_written = self.bytes_written, 0
        return written

    def __contains__(self, client: object) -> bool:
        return isinstance(client, int) and bool(self.get(client))

    def close(self) -> None:  # noqa: B027 (a store without files has nothing to release)
        """Release what the store holds open (files)."""

    def __len__(self) -> int:
        return len(self.clients())


class MemoryStore(ClientStore):
    """The states in a dict (a strategy in someone's own app, the plain-loop driver, small runs)."""

    def __init__(self, states: Mapping[int, Arrays] | None = None) -> None:
        self._states: dict[int, Arrays] = {int(k): dict(v) for k, v in (states or {}).items() if v}

    def get(self, client):
        return dict(self._states.get(client, {}))

    def put(self, client, state):
        if state:
            self._states[int(client)] = dict(state)
            self.bytes_written += sum(t.numel() * t.element_size() for t in state.values())
        else:
            self._states.pop(int(client), None)

    def clients_with(self, name):
        return sorted(k for k, state in self._states.items() if name in state)

    def has(self, client, name):
        return name in self._states.get(client, {})

    def clients(self):
        return sorted(self._states)

    def __contains__(self, client):
        return client in self._states

    def checkpoint(self):
        return {"kind": "memory", "states": {k: dict(v) for k, v in self._states.items()}}


class DiskStore(ClientStore):
    """Fixed-size rows in one file per state name under ``folder`` (the module docstring).

    ``layout``/``slots`` come from a manifest (:func:`restore_store`); a new store starts empty."""

    def __init__(
        self,
        folder: str | Path,
        num_clients: int,
        *,
        layout: Mapping[str, Mapping[str, Any]] | None = None,
        slots: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.folder, self.num_clients = Path(folder), int(num_clients)
        self.folder.mkdir(parents=True, exist_ok=True)
        # name -> (shape, dtype); name -> each client's current slot (0 or 1; -1: no such tensor)
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._current: dict[str, np.ndarray] = {}
        self._pending: dict[str, dict[int, int]] = {}  # written since the last checkpoint
        self._files: dict[str, int] = {}
        for name, entry in (layout or {}).items():
            self._open(name, tuple(int(s) for s in entry["shape"]), getattr(torch, str(entry["dtype"])), create=False)
            self._current[name] = np.asarray(slots[name], dtype=np.int8).copy() if slots else self._current[name]

    def _open(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *, create: bool) -> None:
        if not name.isidentifier():  # the name becomes a file name: nothing like "../x"
            raise ValueError(f"client state name {name!r} is not an identifier")
        path = self.folder / f"{name}.bin"
        if not create and not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run folder's client states are incomplete")
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._layout[name] = (shape, dtype)
        self._current[name] = np.full(self.num_clients, -1, dtype=np.int8)
        self._files[name] = descriptor
        if create:  # sparse: only rows written take space
            os.ftruncate(descriptor, 2 * self.num_clients * self._row_bytes(name))

    def _row_bytes(self, name: str) -> int:
        shape, dtype = self._layout[name]
        return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()

    def _offset(self, name: str, client: int, slot: int) -> int:
        return (2 * client + slot) * self._row_bytes(name)

    def _slot(self, name: str, client: int) -> int:
        pending = self._pending.get(name, {})
        return pending[client] if client in pending else int(self._current[name][client])

    def _check_client(self, client: int) -> None:
        if not 0 <= client < self.num_clients:
            raise KeyError(f"client {client} is not one of the store's {self.num_clients}")

    def get(self, client):
        self._check_client(client)
        state = {}
        for name, (shape, dtype) in self._layout.items():
            slot = self._slot(name, client)
            if slot < 0:
                continue
            size = self._row_bytes(name)
            data = os.pread(self._files[name], size, self._offset(name, client, slot))
            if len(data) != size:
                raise OSError(f"{self.folder / name}.bin is truncated (client {client})")
            state[name] = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
        return state

    def put(self, client, state):
        self._check_client(client)
        for name, tensor in state.items():
            shape, dtype = tuple(tensor.shape), tensor.dtype
            if name not in self._layout:
                self._open(name, shape, dtype, create=True)
            elif self._layout[name] != (shape, dtype):
                raise ValueError(f"client state {name!r} was {self._layout[name]}, now {(shape, dtype)}")
            current = int(self._current[name][client])
            slot = 0 if current < 0 else 1 - current  # never the slot the last checkpoint points at
            data = tensor.detach().cpu().contiguous().numpy().tobytes()
            os.pwrite(self._files[name], data, self._offset(name, client, slot))
            self._pending.setdefault(name, {})[client] = slot
            self.bytes_written += len(data)
        for name in self._layout.keys() - state.keys():
            self._pending.setdefault(name, {})[client] = -1

    def clients_with(self, name):
        if name not in self._layout:
            return []
        current = self._current[name].copy()
        for client, slot in self._pending.get(name, {}).items():
            current[client] = slot
        return [int(k) for k in np.flatnonzero(current >= 0)]

    def has(self, client, name):
        return (
            isinstance(client, int)
            and 0 <= client < self.num_clients
            and name in self._layout
            and (self._slot(name, client) >= 0)
        )

    def clients(self):
        return sorted({k for name in self._layout for k in self.clients_with(name)})

    def __contains__(self, client):
        return any(self.has(client, name) for name in self._layout)

    def checkpoint(self):
        for descriptor in self._files.values():
            os.fsync(descriptor)  # the rows first: the manifest below must never point at rows not on disk
        for name, pending in self._pending.items():
            for client, slot in pending.items():
                self._current[name][client] = slot
        self._pending = {}
        layout = {name: {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
                  for name, (shape, dtype) in self._layout.items()}  # fmt: skip
        slots = {name: torch.from_numpy(current.copy()) for name, current in self._current.items()}
        return {"kind": "disk", "folder": self.folder.name, "num_clients": self.num_clients, "layout": layout,
                "slots": slots}  # fmt: skip

    def close(self) -> None:
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter teardown
            pass


_STATE_DTYPES = {"float16", "bfloat16", "float32", "float64"}  # what an algorithm keeps per client


def restore_store(manifest: Any, base: str | Path | None = None, num_clients: int | None = None) -> ClientStore:
    """The store a :meth:`ClientStore.checkpoint` manifest describes; a disk store's files are looked for
    in ``base`` (the run folder), under the manifest's folder name (never a path that leaves ``base``).

    A checkpoint may come from someone else's run folder, so the manifest is checked before anything is
    opened: ``ValueError`` naming what does not fit (``num_clients``: the federation it must describe)."""
    check_manifest(manifest, base, num_clients)
    if manifest["kind"] == "memory":
        return MemoryStore(manifest["states"])
    return DiskStore(Path(base) / manifest["folder"], int(manifest["num_clients"]), layout=manifest["layout"],
                     slots=manifest["slots"])  # fmt: skip


def check_manifest(manifest: Any, base: str | Path | None = None, num_clients: int | None = None) -> None:
    """``ValueError`` unless ``manifest`` is one :func:`restore_store` can rebuild without a surprise: plain
    names, floating dtypes, non-negative shapes, one slot (-1, 0 or 1) per client, row files of the size the
    layout gives, and ``num_clients`` clients where it is given."""
    if not isinstance(manifest, Mapping) or manifest.get("kind") not in ("memory", "disk"):
        kind = manifest.get("kind") if isinstance(manifest, Mapping) else type(manifest).__name__
        raise ValueError(f"unknown client store {kind!r}")
    if manifest["kind"] == "memory":
        states = manifest.get("states")
        if not isinstance(states, Mapping) or not all(
            isinstance(k, int) and isinstance(v, Mapping) and all(isinstance(t, Tensor) for t in v.values())
            for k, v in states.items()
        ):
            raise ValueError("the clients' states must map client numbers to named tensors")
        if num_clients is not None and any(not 0 <= k < num_clients for k in states):
            raise ValueError(f"the clients' states name clients outside 0..{num_clients - 1}")
        return
    name, count = manifest.get("folder"), manifest.get("num_clients")
    if base is None or not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a disk client store needs its run folder, and {name!r} must be a plain name")
    if not isinstance(count, int) or count < 0 or (num_clients is not None and count != num_clients):
        raise ValueError(f"the client store holds {count!r} clients, this run has {num_clients}")
    layout, slots = manifest.get("layout"), manifest.get("slots")
    if not isinstance(layout, Mapping) or not isinstance(slots, Mapping) or set(layout) != set(slots):
        raise ValueError("the client store's layout and slots must name the same states")
    for state, entry in layout.items():
        if not isinstance(state, str) or not state.isidentifier():  # it becomes a file name: nothing like "../x"
            raise ValueError(f"client state name {state!r} is not an identifier")
        shape, dtype = (entry.get("shape"), entry.get("dtype")) if isinstance(entry, Mapping) else (None, None)
        if not isinstance(shape, list) or not all(isinstance(s, int) and 0 <= s < 2**31 for s in shape):
            raise ValueError(f"client state {state!r} has shape {shape!r}, not a list of sizes")
        if dtype not in _STATE_DTYPES:
            raise ValueError(f"client state {state!r} has dtype {dtype!r}; allowed: {', '.join(sorted(_STATE_DTYPES))}")
        slot = slots[state]
        if not isinstance(slot, Tensor) or slot.shape != (count,) or slot.is_floating_point() or slot.is_complex():
            raise ValueError(f"client state {state!r} needs one integer slot per client ({count})")
        if bool(((slot < -1) | (slot > 1)).any()):
            raise ValueError(f"client state {state!r} has slots other than -1, 0 and 1")
        path = Path(base) / name / f"{state}.bin"
        row = int(np.prod(shape, dtype=np.int64)) * getattr(torch, dtype).itemsize
        if not path.is_file() or path.stat().st_size != 2 * count * row:
            raise ValueError(f"{path} is missing or not the {2 * count * row} bytes its layout gives")


class SitesView(Mapping):
    """The server's record of every client's site, read from the clients' states in ``store``: client ->
    :class:`~fedvb.core.gaussian.NaturalParams` (one copy of each site; nothing is read until asked)."""

    def __init__(self, store: ClientStore, family: Family) -> None:
        self.store, self.family = store, family

    def __getitem__(self, client: int) -> NaturalParams:
        state = self.store.get(client) if isinstance(client, int) else {}
        if SITE_KEYS[0] not in state:
            raise KeyError(client)
        return NaturalParams(state[SITE_KEYS[0]], state[SITE_KEYS[1]], self.family)

    def __iter__(self) -> Iterator[int]:
        return iter(self.store.clients_with(SITE_KEYS[0]))

    def __len__(self) -> int:
        return len(self.store.clients_with(SITE_KEYS[0]))

    def __contains__(self, client: object) -> bool:
        return isinstance(client, int) and self.store.has(client, SITE_KEYS[0])
