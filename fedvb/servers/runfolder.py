"""The self-describing run folder: config.toml, metrics.jsonl, checkpoint.pt, summary.json, posterior.npz
and the pictures labels.png, curves.png, reliability.png.

Every file is written whole to a temporary name, flushed to disk and renamed,
so a crash never leaves a half-written file.  After each round the checkpoint
(the round, the strategy's whole state and every metrics row so far) is
written before the row is appended to metrics.jsonl; on resume metrics.jsonl
is rewritten from the checkpoint, so the two always agree.  No random state
needs saving: every random stream is derived from (seed, round, client).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedvb.config import ConfigError, RunConfig
from fedvb.core.gaussian import Gaussian

__all__ = ["CHECKPOINT", "RunFolder"]

CHECKPOINT = "checkpoint.pt"


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


class RunFolder:
    """A run's folder. ``resume=True`` reopens one that holds a checkpoint (see :meth:`load_checkpoint`)."""

    def __init__(self, config: RunConfig, *, resume: bool = False) -> None:
        self.path = Path(config.out)
        self.metrics_path = self.path / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        self.resumed: dict[str, Any] | None = None  # the checkpoint a resumed run continues from
        if resume:  # the checkpoint's rows are the truth: a crash may have come before a row's append
            self.resumed = self.load_checkpoint()
            self.rows = self.resumed["rows"]
            _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in (CHECKPOINT, "summary.json", "posterior.npz"):  # from an earlier run in this folder
                (self.path / stale).unlink(missing_ok=True)
            _atomic_write(self.metrics_path, b"")
        _atomic_write(self.path / "config.toml", config.to_toml().encode())  # resume may extend the rounds

    def write_picture(self, name: str, draw: Callable[[Path], Any]) -> None:
        """``draw(path)`` writes a PNG (or nothing) to a temporary name, renamed to ``name`` when complete."""
        temporary = self.path / f"{Path(name).stem}.tmp.png"
        draw(temporary)
        if temporary.exists():
            temporary.replace(self.path / name)

    def load_checkpoint(self) -> dict[str, Any]:
        path = self.path / CHECKPOINT
        if not path.is_file():
            raise ConfigError("resume", f"{self.path} has no {CHECKPOINT} (no round finished there)")
        return torch.load(path, weights_only=True)

    def end_round(self, server_round: int, strategy_state: dict[str, Any], row: dict[str, Any]) -> None:
        """Checkpoint after ``server_round`` (state and rows), then append ``row`` to metrics.jsonl."""
        self.rows.append(row)
        buffer = io.BytesIO()
        torch.save({"round": server_round, "strategy": strategy_state, "rows": self.rows}, buffer)
        _atomic_write(self.path / CHECKPOINT, buffer.getvalue())
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, mean: torch.Tensor, posterior: Gaussian | None, totals: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (the last row plus ``totals``) and posterior.npz; return the summary."""
        summary = {**(self.rows[-1] if self.rows else {}), **totals}
        summary.pop("rejected", None)
        _atomic_write(self.path / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        arrays = {"mean": mean.detach().cpu().numpy()}
        if posterior is not None:
            precision = posterior.precision.detach().cpu().numpy()
            arrays["precision"] = np.full(mean.shape, precision) if precision.ndim == 0 else precision
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _atomic_write(self.path / "posterior.npz", buffer.getvalue())
        return summary
