"""The self-describing run folder: config.toml, metrics.jsonl (and metrics.csv), checkpoint.pt, clients/ (every
client's state, fedvb.core.client_store), summary.json, posterior.npz and the pictures labels.png, curves.png,
reliability.png.

Every file is written whole to a temporary name, flushed to disk and renamed,
so a crash never leaves a half-written file.  After each round the checkpoint
(the round, the server's state, the manifest of the clients' states and every
metrics row so far) is written before the row is appended to metrics.jsonl;
the rows of clients/ it points at are on disk before it is (shadow rows: a
round writes only slots no checkpoint points at); on resume metrics.jsonl
is rewritten from the checkpoint, so the two always agree.  No random state
needs saving: every random stream is derived from (seed, round, client).
A folder that already holds a run is replaced only when asked (``overwrite``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedvb.config import ConfigError, RunConfig
from fedvb.core.gaussian import Gaussian

__all__ = [
    "CHECKPOINT",
    "CLIENT_STORE",
    "RUN_FILES",
    "RunFolder",
    "check_not_locked",
    "check_out_folder",
    "fingerprint",
    "read_checkpoint",
    "take_up",
]

CHECKPOINT = "checkpoint.pt"
# everything a run writes into its folder (an earlier run's are removed when a run replaces it)
RUN_FILES = ("config.toml", "metrics.jsonl", "metrics.csv", CHECKPOINT, "summary.json", "posterior.npz",
             "labels.png", "curves.png", "reliability.png")  # fmt: skip
TENSORBOARD = "tensorboard"
CLIENT_STORE = "clients"  # the clients' states (fedvb.core.client_store.DiskStore); the checkpoint names its rows


def read_checkpoint(path: Path, expected_fingerprint: str | None = None) -> dict[str, Any]:
    """A fedvb checkpoint (tensors and plain containers only: ``weights_only``, nothing in it is run),
    mmapped; ConfigError naming ``resume`` when it is missing, unreadable, not fedvb's, or made under
    another configuration."""
    if not path.is_file():
        raise ConfigError("resume", f"{path.parent} has no {CHECKPOINT}")
    try:
        state = torch.load(path, weights_only=True, mmap=True)
    except Exception as error:  # truncated, corrupt or foreign: bad input, not a crash
        raise ConfigError("resume", f"{path} is not a readable fedvb checkpoint ({type(error).__name__})") from None
    if not isinstance(state, dict) or not {"round", "strategy", "rows"} <= set(state):
        raise ConfigError("resume", f"{path} is not a fedvb checkpoint")
    rounds, rows = state["round"], state["rows"]
    if not isinstance(rounds, int) or not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError("resume", f"{path} is not a fedvb checkpoint (its round and rows)")
    if [r.get("round") for r in rows] != list(range(1, rounds + 1)) or not all(
        isinstance(r.get("elapsed_s", 0.0), int | float) for r in rows
    ):
        raise ConfigError("resume", f"{path} does not hold one metrics row for each of its {rounds} rounds")
    found = state.get("fingerprint")
    if expected_fingerprint is not None and found is not None and found != expected_fingerprint:
        raise ConfigError("resume", f"{path} was written under another configuration than {path.parent}/config.toml")
    return state


def take_up(path: Path, checkpoint: dict[str, Any], restore: Callable[[dict[str, Any]], Any]) -> None:
    """``restore(checkpoint)`` (a strategy taking up the state of ``path``); whatever it raises on a
    checkpoint that does not fit (``ValueError``, ``KeyError``, ``TypeError``, ``OSError``: a crafted or
    damaged run folder) becomes one :class:`ConfigError` naming ``resume``."""
    try:
        restore(checkpoint)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError("resume", f"{path} does not fit this run: {reason}") from None


def check_out_folder(out: str | Path, *, overwrite: bool = False) -> None:
    """``out`` can take a new run: not an empty path, not a file, not inside a file, writable, and holding no
    earlier run unless ``overwrite``. Raises :class:`ConfigError` naming ``out``; writes nothing."""
    if not str(out).strip():
        raise ConfigError("out", "is empty; give a folder for the run (default runs/latest)")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError("out", f"{path} is a file, not a folder")
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError("out", f"{existing} is a file, so {path} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("out", f"{existing} is not writable")
    check_not_locked(path)
    held = [name for name in RUN_FILES if (path / name).exists()]
    if held and not overwrite:
        raise ConfigError("out", f"{path} already holds a run ({', '.join(held[:3])}); pass --overwrite to replace "
                                 "it, --resume to continue it, or choose another --out")  # fmt: skip


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


LOCK = ".lock"
_HELD: set[Path] = set()  # the run folders this process is writing


def fingerprint(config: RunConfig) -> str:
    """What a checkpoint must match to be resumed under ``config``: every key but those a resume may change
    (rounds) or that say only where and how the run goes."""
    free = {"rounds", "out", "backend", "ray_address", "device", "client_cpus", "client_gpus", "log"}
    values = {k: v for k, v in sorted(config.as_dict().items()) if k not in free}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def check_not_locked(path: str | Path) -> None:
    """ConfigError naming ``out`` while another live process writes the run folder ``path``."""
    holder = lock_holder(Path(path))
    if holder is not None:
        raise ConfigError("out", f"{path} is being written by another fedvb run (PID {holder})")


def lock_holder(path: Path) -> int | None:
    """The PID of a live process other than this one's current runs that holds ``path``'s lock, else None."""
    try:
        pid = int((path / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():
        return pid if path.resolve() in _HELD else None  # a lock left by an earlier run of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # its owner is gone (killed): the lock is stale
    except PermissionError:
        pass  # alive, another user's
    return pid


class RunFolder:
    """A run's folder. ``resume=True`` reopens one (from its checkpoint, see :meth:`load_checkpoint`; one
    killed before its first checkpoint starts again). A lock file holding the writer's PID keeps a second
    process out while a run writes the folder."""

    def __init__(
        self,
        config: RunConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        restore: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        """``restore(checkpoint)``: takes up a resumed run's state before anything is written (see
        :func:`take_up`); on a checkpoint that does not fit, the folder is left as it was."""
        self.path = Path(config.out)
        self.metrics_path = self.path / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.resumed: dict[str, Any] | None = None  # the checkpoint a resumed run continues from
        self.summary: dict[str, Any] = {}  # summary.json, once written
        self.fingerprint = fingerprint(config)
        if not resume:
            check_out_folder(self.path, overwrite=overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if resume and (self.path / CHECKPOINT).is_file():  # the checkpoint's rows are the truth
            try:
                self.resumed = self.load_checkpoint()
                if restore is not None:
                    take_up(self.path / CHECKPOINT, self.resumed, restore)
            except ConfigError:
                self.release()
                raise
            self.rows = self.resumed["rows"]
            _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        else:
            for stale in RUN_FILES:  # from the earlier run this one replaces
                (self.path / stale).unlink(missing_ok=True)
            shutil.rmtree(self.path / TENSORBOARD, ignore_errors=True)
            shutil.rmtree(self.path / CLIENT_STORE, ignore_errors=True)
            _atomic_write(self.metrics_path, b"")
        self._write_csv()
        from fedvb.provenance import provenance

        # resume may extend the rounds, and records the versions that continued the run
        _atomic_write(self.path / "config.toml", config.to_toml(provenance()).encode())
        self._tensorboard = None
        if config.log == "tensorboard":
            from fedvb.servers.tensorboard import TensorBoardLog

            self._tensorboard = TensorBoardLog(self.path / TENSORBOARD)

    def write_picture(self, name: str, draw: Callable[[Path], Any]) -> None:
        """``draw(path)`` writes a PNG (or nothing) to a temporary name, renamed to ``name`` when complete."""
        temporary = self.path / f"{Path(name).stem}.tmp.png"
        draw(temporary)
        if temporary.exists():
            temporary.replace(self.path / name)

    def _lock(self) -> None:
        check_not_locked(self.path)
        _atomic_write(self.path / LOCK, f"{os.getpid()}\n".encode())
        _HELD.add(self.path.resolve())

    def release(self) -> None:
        """Drop the folder's lock (at the end of the run, however it ended)."""
        if self.path.resolve() in _HELD:
            _HELD.discard(self.path.resolve())
            (self.path / LOCK).unlink(missing_ok=True)

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint, checked to be fedvb's and to belong to this folder's configuration."""
        return read_checkpoint(self.path / CHECKPOINT, self.fingerprint)

    def write_checkpoint(self, server_round: int, strategy_state: dict[str, Any]) -> None:
        """The federation after ``server_round`` (0: before the first round) and the rows so far."""
        buffer = io.BytesIO()
        state = {"round": server_round, "strategy": strategy_state, "rows": self.rows, "fingerprint": self.fingerprint}
        torch.save(state, buffer)
        _atomic_write(self.path / CHECKPOINT, buffer.getvalue())

    def end_round(self, server_round: int, strategy_state: dict[str, Any], row: dict[str, Any]) -> None:
        """Checkpoint after ``server_round`` (state and rows), then append ``row`` to metrics.jsonl."""
        self.rows.append(row)
        self.write_checkpoint(server_round, strategy_state)
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_csv()
        if self._tensorboard is not None:
            self._tensorboard.write(row)

    def _write_csv(self) -> None:
        """metrics.csv: the rows of metrics.jsonl as a table (``rejected`` as the number of rejected replies)."""
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for row in self.rows:
            writer.writerow([len(v) if isinstance(v := row.get(c, ""), list) else v for c in columns])
        _atomic_write(self.path / "metrics.csv", buffer.getvalue().encode())

    def finish(self, mean: torch.Tensor, posterior: Gaussian | None, totals: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (the last row plus ``totals``) and posterior.npz; return the summary."""
        summary = {**(self.rows[-1] if self.rows else {}), **totals}
        summary.pop("rejected", None)
        self.summary = summary
        _atomic_write(self.path / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        arrays = {"mean": mean.detach().cpu().numpy()}
        if posterior is not None:  # the family names its precision's parts (one array for iso, diagonal, dense)
            named = posterior.family.named_arrays("precision", posterior.precision.detach(), posterior.dim)
            arrays.update({name: value.cpu().numpy() for name, value in named.items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _atomic_write(self.path / "posterior.npz", buffer.getvalue())
        return summary

    def close(self) -> None:
        """The end of a run, however it ended: TensorBoard's file closed and the lock dropped."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        self.release()
