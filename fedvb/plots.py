"""Pictures of runs: metric curves against rounds, reliability diagrams, and several runs overlaid."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CURVE_METRICS", "plot_comparison", "plot_curves", "plot_reliability"]

# (key in metrics rows, panel title); a panel is drawn when a run has the key. The predictive_ variant of a
# key, when present, is drawn dashed in the same panel.
CURVE_METRICS = (
    ("accuracy", "test accuracy"),
    ("nll", "test NLL"),
    ("ece", "ECE (15 bins)"),
    ("brier", "Brier score"),
    ("client_accuracy_worst", "worst client accuracy"),
    ("mse", "test MSE"),
)

Rows = Sequence[Mapping[str, Any]]
SPARSE_BIN = 10  # reliability bins with fewer examples are drawn hollow


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(keys: set[str]) -> list[tuple[str, str]]:
    return [(key, title) for key, title in CURVE_METRICS if key in keys]


def _grid(plt, count: int):
    from matplotlib.ticker import MaxNLocator

    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _series(rows: Rows, key: str) -> tuple[np.ndarray, np.ndarray]:
    kept = [r for r in rows if key in r]
    return np.array([r["round"] for r in kept]), np.array([r[key] for r in kept], dtype=float)


def plot_curves(rows: Rows, path: str | Path, *, title: str = "", model: str = "posterior mean") -> Path:
    """One panel per metric against rounds; the server model (``model``: how to call it) solid, the
    predictive dashed."""
    plt = _pyplot()
    panels = _panels(set().union(*(r.keys() for r in rows)) if rows else set())
    fig, axes = _grid(plt, max(1, len(panels)))
    for ax, (key, name) in zip(axes, panels):
        ax.plot(*_series(rows, key), marker="o", ms=3, label=model)
        if any(f"predictive_{key}" in r for r in rows):
            ax.plot(*_series(rows, f"predictive_{key}"), "--", marker="s", ms=3, label="predictive")
            ax.legend(fontsize=8)
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_reliability(tables: Mapping[str, Mapping[str, np.ndarray]], path: str | Path, *, title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin, one marker line per model
    (``tables``: name -> :func:`fedvb.metrics.calibration_bins`), the diagonal for perfect calibration,
    and the share of examples per bin underneath."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.0, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfect calibration")
    width = 1.0 / len(next(iter(tables.values()))["count"])
    for offset, (name, table) in enumerate(tables.items()):
        filled = table["count"] > 0
        colour = f"C{offset}"
        top.plot(table["confidence"][filled], table["accuracy"][filled], color=colour, label=name)
        # a bin's accuracy is only as good as its count: full markers from SPARSE_BIN examples on, hollow below
        for sparse, face in ((table["count"] < SPARSE_BIN, "none"), (table["count"] >= SPARSE_BIN, colour)):
            shown = filled & sparse
            top.scatter(table["confidence"][shown], table["accuracy"][shown], s=28, facecolors=face,
                        edgecolors=colour, zorder=3)  # fmt: skip
        centres = (np.arange(len(table["count"])) + 0.5) * width
        share = table["count"] / table["count"].sum()
        bar_width = width / len(tables)
        bottom.bar(centres - width / 2 + (offset + 0.5) * bar_width, share, width=bar_width, label=name)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="lower right")
    top.grid(alpha=0.3)
    top.set_title(title or "reliability diagram")
    top.text(0.02, 0.97, f"hollow: bins of fewer than {SPARSE_BIN} examples", transform=top.transAxes, fontsize=7,
             va="top", color="grey")  # fmt: skip
    bottom.set_xlabel("confidence (top class probability)")
    bottom.set_ylabel("share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_comparison(groups: Mapping[str, Sequence[Rows]], path: str | Path) -> Path:
    """Several settings overlaid, one panel per metric titled by the metric: per setting the mean over its
    runs (seeds) and a +-1 std band; the predictive variant of a metric, where a setting has one, dashed in
    the same colour. One legend for the figure, below the panels, so that no curve is hidden."""
    plt = _pyplot()
    keys = set()
    for runs in groups.values():
        for rows in runs:
            for row in rows:
                keys.update(row)
    panels = _panels(keys)
    fig, axes = _grid(plt, max(1, len(panels)))
    legend: dict[str, Any] = {}
    for ax, (key, title) in zip(axes, panels):
        for colour, (label, runs) in enumerate(groups.items()):
            for variant, style in ((key, "-"), (f"predictive_{key}", "--")):
                series = [_series(rows, variant) for rows in runs if any(variant in r for r in rows)]
                if not series:
                    continue
                length = min(len(r) for r, _ in series)
                rounds = series[0][0][:length]
                values = np.stack([v[:length] for _, v in series])
                mean, std = values.mean(0), values.std(0)
                entry = f"{label} (n={len(series)})" if style == "-" else f"{label}, predictive"
                (line,) = ax.plot(rounds, mean, style, color=f"C{colour}", marker="o", ms=3)
                legend.setdefault(entry, line)
                if len(series) > 1:
                    ax.fill_between(rounds, mean - std, mean + std, color=f"C{colour}", alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if legend:  # under the figure: the saved picture's tight bounding box takes it in
        fig.legend(legend.values(), legend.keys(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(3, len(legend)), fontsize=9, frameon=False)  # fmt: skip
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
