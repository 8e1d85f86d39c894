"""``fedvb compare DIR ...``: several run folders as one table (markdown and CSV) and overlaid curves.

Runs whose configurations differ only in the seed (and where or how they ran:
out, backend, Ray address, device, resources, logging), or in keys their
strategy does not read, form one setting; a
setting's numbers are mean +- sample std over its n runs.  A setting is named
by its strategy and the keys in which the settings differ *and* that apply to
it (``ivon-admm (rho=0.5)``; FedAvg is never labelled with IVON's keys).

Beside the table, each setting's difference to a baseline setting (the first,
or ``baseline``) with a 95% interval over seeds: paired over the seeds both
ran (Student t on the per-seed differences), else Welch's t; none with fewer
than two runs on a side.
"""

from __future__ import annotations

import csv
import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedvb.config import ConfigError, RunConfig, applies, at_strategy_default
from fedvb.plots import plot_comparison

__all__ = ["COLUMNS", "Run", "compare_runs", "load_run"]

# summary.json keys shown, in order; a column appears when some run has it
COLUMNS = (
    "accuracy", "predictive_accuracy", "nll", "predictive_nll", "ece", "predictive_ece", "brier",
    "predictive_brier", "mse", "accuracy_last3", "nll_last3", "client_accuracy_worst", "rounds_to_target", "round",
    "s_per_round", "total_time_s", "bytes_total",
)  # fmt: skip
# metrics compared with the baseline, and whether higher is better
DIRECTIONS = {
    "accuracy": 1, "predictive_accuracy": 1, "nll": -1, "predictive_nll": -1, "ece": -1, "predictive_ece": -1,
    "brier": -1, "predictive_brier": -1, "mse": -1, "accuracy_last3": 1, "nll_last3": -1, "client_accuracy_worst": 1,
    "s_per_round": -1, "total_time_s": -1,
}  # fmt: skip
NOT_A_SETTING = ("seed", "out", "backend", "ray_address", "device", "client_cpus", "client_gpus", "log", "provenance")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def setting(self) -> tuple:
        """What the run computes: its keys but the seed and where it ran, and only those its strategy reads (a
        FedDyn run saved under another default of fedlap-func's ``func_lr`` is the same FedDyn)."""
        return tuple(
            sorted((k, v) for k, v in self.config.items() if k not in NOT_A_SETTING and applies(k, self.config))
        )


def load_run(path: str | Path) -> Run:
    """A run folder's config.toml, metrics.jsonl and summary.json; ValueError naming what is missing."""
    folder = Path(path)
    needed = [folder / name for name in ("config.toml", "metrics.jsonl", "summary.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ValueError(f"runs: {folder} is not a finished run folder (no {', '.join(missing)})")
    config = _with_keys_added_since(tomllib.loads(needed[0].read_text()))
    rows = [json.loads(line) for line in needed[1].read_text().splitlines() if line.strip()]
    return Run(folder, config, rows, {**_from_rows(rows), **json.loads(needed[2].read_text())})


def _with_keys_added_since(config: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration with each key fedvb gained after the run was made, at the value that run took:
    the key's default for its strategy (else two runs of one setting would differ by a key one of them lacks)."""
    missing = [key for key in RunConfig.__dataclass_fields__ if key not in config]
    if not missing:
        return config
    try:
        defaults = RunConfig.from_mapping({k: config[k] for k in ("strategy", "num_clients") if k in config})
    except ConfigError:
        return config
    return {**config, **{key: getattr(defaults, key) for key in missing}}


def _from_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Columns read off the rounds: the papers' mean of the last 3 (evaluated) rounds (accuracy, NLL) and the mean
    seconds per round (the rounds' own wall time, without start-up)."""
    derived = {}
    for name in ("accuracy", "nll"):
        values = [r[name] for r in rows if _number(r.get(name))][-3:]  # the last 3 evaluated rounds
        if len(values) == 3:
            derived[f"{name}_last3"] = float(np.mean(values))
    times = [r["wall_time_s"] for r in rows if _number(r.get("wall_time_s"))]
    if times:
        derived["s_per_round"] = float(np.mean(times))
    return derived


def _labels(groups: dict[tuple, list[Run]]) -> list[str]:
    """Each setting's name: its strategy, then the keys that differ between the settings they apply to, apply to
    it and are not its strategy's own default (a key only one setting reads, say fedlap-func's ``func_lr`` beside
    FedAvg runs saved with another default of it, tells no two settings apart)."""
    settings = [dict(key) for key in groups]
    differing = sorted(
        k for k in set().union(*settings)
        if k != "strategy" and len({repr(s.get(k)) for s in settings if applies(k, s)}) > 1
    )  # fmt: skip
    labels = []
    for setting in settings:
        named = [k for k in differing if applies(k, setting) and not at_strategy_default(k, setting)]
        keys = [f"{k}={setting.get(k)}" for k in named]
        name = str(setting.get("strategy", "run"))
        labels.append(f"{name} ({', '.join(keys)})" if keys else name)
    return labels


def _cell(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def difference(runs: list[Run], baseline: list[Run], column: str) -> tuple[float, float, float] | None:
    """mean(runs) - mean(baseline) of a summary column and its 95% interval over seeds (nan bounds when a side
    has one run); None when a side lacks the column."""
    from scipy import stats

    ours = {r.config.get("seed"): r.summary[column] for r in runs if _number(r.summary.get(column))}
    theirs = {r.config.get("seed"): r.summary[column] for r in baseline if _number(r.summary.get(column))}
    if not ours or not theirs:
        return None
    a, b = np.asarray(list(ours.values()), float), np.asarray(list(theirs.values()), float)
    delta = float(a.mean() - b.mean())
    shared = sorted(set(ours) & set(theirs), key=str)
    if len(shared) == len(ours) == len(theirs) and len(shared) > 1:  # paired over seeds
        d = np.asarray([ours[s] - theirs[s] for s in shared], float)
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    elif len(a) > 1 and len(b) > 1:  # Welch
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else 1.0
        half = stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    else:
        return delta, math.nan, math.nan
    return delta, delta - half, delta + half


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_runs(paths: Sequence[str | Path], out: str | Path, *, baseline: str = "") -> str:
    """Write compare.md, compare.csv and compare.png to ``out``; return the markdown. ``baseline``: the
    setting (its label, or a strategy name) the others are compared with; default the first."""
    runs = [load_run(p) for p in paths]
    if not runs:
        raise ValueError("runs: give at least one run folder")
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.setting, []).append(run)
    labels = _labels(groups)
    if len(set(labels)) < len(labels):  # never two settings under one name (a dict of them would keep one)
        raise ValueError(f"runs: settings that differ only in keys no label names: {sorted(labels)}")
    members = dict(zip(labels, groups.values()))
    base = _baseline(labels, baseline)
    columns = [c for c in COLUMNS if any(c in r.summary for r in runs)]
    table: list[dict[str, Any]] = []
    for label, group in members.items():
        entry: dict[str, Any] = {"setting": label, "runs": len(group)}
        for column in columns:
            values = [r.summary[column] for r in group if _number(r.summary.get(column))]
            entry[column] = _cell(values) if values else None
            if column == "rounds_to_target":  # the mean is over the runs that reached the target
                entry["reached_target"] = f"{len(values)}/{len(group)}"
        entry["stopped"] = sum(r.summary.get("status") == "stopped" for r in group)
        entry["differences"] = {c: difference(group, members[base], c) for c in columns if c in DIRECTIONS}
        table.append(entry)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(table, columns) + "\n" + _difference_markdown(table, base)
    (out / "compare.md").write_text(markdown)
    _csv(table, columns, out / "compare.csv")
    plot_comparison({label: [r.rows for r in group] for label, group in members.items()}, out / "compare.png")
    return markdown


def _baseline(labels: list[str], wanted: str) -> str:
    if not wanted:
        return labels[0]
    matches = [label for label in labels if label == wanted or label.split(" (")[0] == wanted]
    if len(matches) != 1:
        raise ValueError(f"baseline: {wanted!r} names {len(matches)} settings; choose one of: {'; '.join(labels)}")
    return matches[0]


def _format(cell: tuple[float, float] | None, runs: int) -> str:
    if cell is None:
        return "-"
    return f"{cell[0]:.4g}" if runs == 1 else f"{cell[0]:.4g} ± {cell[1]:.2g}"


def _markdown(table: list[dict[str, Any]], columns: list[str]) -> str:
    arrows = {1: " ↑", -1: " ↓"}
    header = ["setting", "n", *(c + arrows.get(DIRECTIONS.get(c, 0), "") for c in columns), "stopped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [entry["setting"], str(entry["runs"])]
        for column in columns:
            text = _format(entry[column], entry["runs"])
            if column == "rounds_to_target":
                text += f" ({entry['reached_target']} reached)"
            cells.append(text)
        cells.append(str(entry["stopped"]))
        lines.append("| " + " | ".join(cells) + " |")
    note = "mean ± sample std over the n runs of a setting (seeds); ↑ higher is better, ↓ lower is better"
    return "\n".join(lines) + f"\n\n{note}\n"


def _difference_markdown(table: list[dict[str, Any]], base: str) -> str:
    others = [e for e in table if e["setting"] != base]
    if not others:
        return ""
    columns = [c for c in others[0]["differences"] if any(e["differences"].get(c) for e in others)]
    lines = [f"Difference to {base} (setting minus baseline; 95% interval over seeds):", "",
             "| setting | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]  # fmt: skip
    for entry in others:
        cells = []
        for column in columns:
            found = entry["differences"].get(column)
            if found is None:
                cells.append("-")
            elif math.isnan(found[1]):
                cells.append(f"{found[0]:+.4g} (n < 2)")
            else:
                cells.append(f"{found[0]:+.4g} [{found[1]:+.3g}, {found[2]:+.3g}]")
        lines.append(f"| {entry['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(table: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    differences = [c for c in columns if c in DIRECTIONS]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        reached = ["reached_target"] if "rounds_to_target" in columns else []
        names = [f"{c}_{s}" for c in columns for s in ("mean", "std")]
        diff_names = [f"{c}_{s}" for c in differences for s in ("diff", "diff_low", "diff_high")]
        writer.writerow(["setting", "runs", *names, *reached, "stopped", *diff_names])
        for entry in table:
            cells = [entry["setting"], entry["runs"]]
            for column in columns:
                cells.extend(_blank_nan(entry[column]) if entry[column] is not None else ("", ""))
            diffs = []
            for column in differences:
                found = entry["differences"].get(column)
                diffs.extend(_blank_nan(found) if found is not None else ("", "", ""))
            writer.writerow([*cells, *(entry[r] for r in reached), entry["stopped"], *diffs])


def _blank_nan(values) -> list:
    return ["" if isinstance(v, float) and math.isnan(v) else v for v in values]
