"""The self-describing run folder: config.toml, metrics.jsonl, summary.json, posterior.npz.

Every file is written whole to a temporary name and renamed (metrics.jsonl is
appended line by line and flushed), so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedvb.config import RunConfig
from fedvb.core.gaussian import Gaussian

__all__ = ["RunFolder"]


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


class RunFolder:
    def __init__(self, config: RunConfig) -> None:
        self.path = Path(config.out)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "config.toml", config.to_toml().encode())
        self.metrics_path = self.path / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.rows: list[dict[str, Any]] = []

    def log_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, mean, posterior: Gaussian | None, totals: dict[str, Any]) -> None:
        summary = {**(self.rows[-1] if self.rows else {}), **totals}
        _atomic_write(self.path / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        arrays = {"mean": mean.detach().cpu().numpy()}
        if posterior is not None:
            precision = posterior.precision.detach().cpu().numpy()
            arrays["precision"] = np.full(mean.shape, precision) if precision.ndim == 0 else precision
        temporary = self.path / "posterior.tmp.npz"
        np.savez(temporary, **arrays)
        temporary.replace(self.path / "posterior.npz")
