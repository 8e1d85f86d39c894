"""``fedvb compare DIR ...``: several run folders as one table (markdown and CSV) and overlaid curves.

Runs whose configurations differ only in the seed (and where or how they ran:
out, backend, Ray address, device, resources) form one setting; a setting's
numbers are mean +- sample std over its runs.  A setting is named by the keys
in which the settings differ (``rho=0.5, strategy=ivon-admm``), or by its strategy alone when only
strategies differ.
"""

from __future__ import annotations

import csv
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedvb.plots import plot_comparison

__all__ = ["COLUMNS", "Run", "compare_runs", "load_run"]

# summary.json keys shown, in order; a column appears when some run has it
COLUMNS = (
    "accuracy", "predictive_accuracy", "nll", "predictive_nll", "ece", "predictive_ece", "brier",
    "predictive_brier", "mse", "client_accuracy_worst", "rounds_to_target", "round", "total_time_s", "bytes_total",
)  # fmt: skip
NOT_A_SETTING = ("seed", "out", "backend", "ray_address", "device", "client_cpus", "client_gpus")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def setting(self) -> tuple:
        return tuple(sorted((k, v) for k, v in self.config.items() if k not in NOT_A_SETTING))


def load_run(path: str | Path) -> Run:
    """A run folder's config.toml, metrics.jsonl and summary.json; ValueError naming what is missing."""
    folder = Path(path)
    needed = [folder / name for name in ("config.toml", "metrics.jsonl", "summary.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ValueError(f"runs: {folder} is not a finished run folder (no {', '.join(missing)})")
    config = tomllib.loads(needed[0].read_text())
    rows = [json.loads(line) for line in needed[1].read_text().splitlines() if line.strip()]
    return Run(folder, config, rows, json.loads(needed[2].read_text()))


def _labels(groups: dict[tuple, list[Run]]) -> list[str]:
    settings = [dict(key) for key in groups]
    differing = sorted(k for k in settings[0] if any(s.get(k) != settings[0].get(k) for s in settings))
    if not differing or differing == ["strategy"]:
        return [str(s.get("strategy", "run")) for s in settings]
    return [", ".join(f"{k}={s.get(k)}" for k in differing) for s in settings]


def _cell(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def compare_runs(paths: Sequence[str | Path], out: str | Path) -> str:
    """Write compare.md, compare.csv and compare.png to ``out``; return the markdown table."""
    runs = [load_run(p) for p in paths]
    if not runs:
        raise ValueError("runs: give at least one run folder")
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    labels = _labels(groups)
    columns = [c for c in COLUMNS if any(c in r.summary for r in runs)]
    table: list[dict[str, Any]] = []
    for label, members in zip(labels, groups.values()):
        entry: dict[str, Any] = {"setting": label, "runs": len(members)}
        for column in columns:
            values = [r.summary[column] for r in members if isinstance(r.summary.get(column), (int, float))]
            reached = len(values)
            entry[column] = _cell(values) if values else None
            if column == "rounds_to_target":  # the mean is over the runs that reached the target
                entry["reached_target"] = f"{reached}/{len(members)}"
        entry["stopped"] = sum(r.summary.get("status") == "stopped" for r in members)
        table.append(entry)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(table, columns)
    (out / "compare.md").write_text(markdown)
    _csv(table, columns, out / "compare.csv")
    plot_comparison({label: [r.rows for r in members] for label, members in zip(labels, groups.values())},
                    out / "compare.png")  # fmt: skip
    return markdown


def _markdown(table: list[dict[str, Any]], columns: list[str]) -> str:
    header = ["setting", "runs", *columns, "stopped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [entry["setting"], str(entry["runs"])]
        for column in columns:
            cell = entry[column]
            if cell is None:
                text = "-"
            elif entry["runs"] > 1:
                text = f"{cell[0]:.4g} ± {cell[1]:.2g}"
            else:
                text = f"{cell[0]:.4g}"
            if column == "rounds_to_target":
                text += f" ({entry['reached_target']} reached)"
            cells.append(text)
        cells.append(str(entry["stopped"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(table: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        reached = ["reached_target"] if "rounds_to_target" in columns else []
        names = [f"{c}_{s}" for c in columns for s in ("mean", "std")]
        writer.writerow(["setting", "runs", *names, *reached, "stopped"])
        for entry in table:
            cells = [entry["setting"], entry["runs"]]
            for column in columns:
                cells.extend(entry[column] if entry[column] is not None else ("", ""))
            writer.writerow([*cells, *(entry[r] for r in reached), entry["stopped"]])
