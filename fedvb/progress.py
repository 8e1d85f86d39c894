"""What ``fedvb run`` shows while a run goes: a live bar, JSON lines, or nothing; then a summary."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["MODES", "RunDisplay"]

MODES = ("bar", "jsonl", "quiet")
KEY_METRICS = ("accuracy", "predictive_accuracy", "nll", "predictive_nll", "ece", "mse")


def _short(row: dict[str, Any]) -> str:
    return "  ".join(f"{k.replace('predictive_', 'pred_')}={row[k]:.4f}" for k in KEY_METRICS if k in row)


class RunDisplay:
    """Receives every metrics row (``__call__``) and the summary (:meth:`finish`).

    ``bar``: a rich progress bar on stderr (round, elapsed time, key metrics) and a summary table on stdout;
    ``jsonl``: each row and then ``{"summary": ...}`` as one JSON line on stdout, for scripts;
    ``quiet``: only the final line.
    """

    def __init__(self, mode: str, rounds: int, first_round: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"output: got {mode!r}; allowed: {', '.join(MODES)}")
        self.mode = mode
        self._progress = None
        if mode == "bar":
            self._progress = Progress(
                TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                TextColumn("{task.description}"), console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self._task = self._progress.add_task("", total=rounds, completed=first_round - 1)
            self._progress.start()

    def __call__(self, row: dict[str, Any]) -> None:
        if self.mode == "jsonl":
            print(json.dumps(row), flush=True)
        elif self._progress is not None:
            self._progress.update(self._task, completed=row["round"], description=_short(row))

    def finish(self, summary: dict[str, Any], headline: str) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self.mode == "jsonl":
            print(json.dumps({"summary": summary}), flush=True)
            return
        if self.mode == "bar":
            table = Table(title="fedvb summary", show_header=True)
            table.add_column("metric")
            table.add_column("value", justify="right")
            for key, value in summary.items():
                table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
            Console(file=sys.stdout).print(table)
        print(headline, flush=True)
