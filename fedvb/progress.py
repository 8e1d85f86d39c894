"""What ``fedvb run`` and ``fedvb sweep`` show while they go: a live bar, JSON lines, or nothing; then a summary.

The bar line always keeps, at any terminal width down to 60 columns, the round counter, the bar, the
elapsed time and the estimated time left; the clients done within the round and the key metrics follow
while they fit, and are cut (metrics first) when they do not. The bar moves per client within a round
where the backend reports it (in process); under Ray it moves per round.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["MODES", "RunDisplay", "SweepDisplay", "metric_pairs"]

MODES = ("bar", "jsonl", "quiet")
KEY_METRICS = ("accuracy", "nll", "ece", "predictive_accuracy", "predictive_nll", "mse")
BAR_WIDTH = 16
CLOCK = len("0:00:00")


def metric_pairs(row: dict[str, Any]) -> list[str]:
    """``key=value`` texts of the row's key metrics, most important first."""
    return [
        f"{key.replace('predictive_', 'pred_').replace('accuracy', 'acc')}={row[key]:.4f}"
        for key in KEY_METRICS
        if key in row
    ]


class _Bar:
    """A rich progress line: ``round R/N <bar> elapsed eta left clients c/n metrics``."""

    def __init__(self, console: Console, label: str, total: int, completed: int) -> None:
        self.console, self.label = console, label
        self.progress = Progress(
            TextColumn("{task.fields[head]}"), BarColumn(bar_width=BAR_WIDTH), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[tail]}"),
            console=console, transient=False,
        )  # fmt: skip
        self.task = self.progress.add_task("", total=total, completed=completed, head=label, tail="")
        self.progress.start()

    def update(self, completed: float, head: str, tail_parts: list[str]) -> None:
        # six column gaps; the tail gets what the fixed columns leave (rich would squeeze every column instead)
        room = self.console.width - len(head) - BAR_WIDTH - 2 * CLOCK - len("eta") - 6
        tail = ""
        for part in filter(None, tail_parts):  # whole parts, in order, while they fit
            if len(tail) + len(part) + bool(tail) > room:
                break
            tail = f"{tail} {part}" if tail else part
        self.progress.update(self.task, completed=completed, head=head, tail=tail)

    def stop(self) -> None:
        self.progress.stop()


class RunDisplay:
    """Receives every metrics row and within-round progress (``__call__``) and the summary (:meth:`finish`).

    ``bar``: a progress line on stderr and a summary table on stdout; ``jsonl``: each row and then
    ``{"summary": ...}`` as one JSON line on stdout, for scripts; ``quiet``: only the final line.
    """

    def __init__(self, mode: str, rounds: int, first_round: int = 1, *, console: Console | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"output: got {mode!r}; allowed: {', '.join(MODES)}")
        self.mode, self.rounds = mode, rounds
        self._round = first_round - 1
        self._last: dict[str, Any] = {}
        self._bar = None
        if mode == "bar":
            console = console or Console(stderr=True)
            self._bar = _Bar(console, self._head(), rounds, first_round - 1)

    def _head(self) -> str:
        width = len(str(self.rounds))
        return f"round {min(self._round + 1, self.rounds):>{width}}/{self.rounds}"

    def __call__(self, event: dict[str, Any]) -> None:
        if "round" in event:  # a finished round's metrics row
            if self.mode == "jsonl":
                print(json.dumps(event), flush=True)
            self._round, self._last = int(event["round"]), event
            self._show(self._round, "")
        elif event.get("event") == "clients" and event["of"]:  # progress within the round
            self._show(self._round + event["done"] / event["of"], f"clients {event['done']}/{event['of']}")

    def _show(self, completed: float, clients: str) -> None:
        if self._bar is not None:
            self._bar.update(completed, self._head(), [clients, *metric_pairs(self._last)])

    def stop(self) -> None:
        """End the live line (an interrupted run)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def finish(self, summary: dict[str, Any], headline: str) -> None:
        self.stop()
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


class SweepDisplay:
    """``fedvb sweep``'s line: runs done of the grid, and the current run's name and round (in process)."""

    def __init__(self, mode: str, runs: int, *, console: Console | None = None) -> None:
        self.runs, self.done = runs, 0
        self._current, self._round = "", ""
        self._bar = _Bar(console or Console(stderr=True), self._head(), runs, 0) if mode == "bar" else None

    def _head(self) -> str:
        return f"runs {self.done:>{len(str(self.runs))}}/{self.runs}"

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run-started":
            self._current, self._round = event["name"], ""
        elif kind == "run-done":
            self.done += 1
            self._current, self._round = "", ""
        elif "round" in event:
            self._round = f"round {event['round']}" + (f"/{event['rounds']}" if "rounds" in event else "")
        if self._bar is not None:
            self._bar.update(self.done, self._head(), [self._current, self._round])

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
