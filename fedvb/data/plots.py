"""A picture of who holds what: the label distribution per client."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_label_distribution"]

BARS_UP_TO = 50  # clients; past that one bar each is unreadable, and a heatmap of class shares is drawn


def _heatmap(plt, counts: np.ndarray, names: Sequence[str], path: str | Path, title: str) -> Path:
    """Many clients: each client's class shares as a column of a heatmap (its size in the strip above), at a
    fixed picture size whatever the number of clients."""
    totals = counts.sum(1)
    shares = counts / np.maximum(totals, 1)[:, None]
    fig, (top, ax) = plt.subplots(2, 1, figsize=(12.0, 5.0), sharex=True, gridspec_kw={"height_ratios": [1, 3]})
    # one filled step line, not a bar per client: 10,000 bars cost 10 s to draw
    top.fill_between(np.arange(len(totals) + 1) - 0.5, np.append(totals, totals[-1]), step="post", color="grey")
    top.set_ylabel("examples")
    top.set_title(title)
    image = ax.imshow(shares.T, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(np.arange(len(names)), labels=names, fontsize=7)
    ax.set_xlabel(f"client (of {len(totals)})")
    ax.set_ylabel("class")
    fig.colorbar(image, ax=[top, ax], label="share of the client's examples", fraction=0.03)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_label_distribution(
    labels: np.ndarray,
    parts: Sequence[np.ndarray],
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    title: str = "label distribution per client",
) -> Path:
    """Stacked bars, one per client, one colour per class; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.unique(labels)
    counts = np.stack([np.bincount(np.searchsorted(classes, labels[rows]), minlength=len(classes)) for rows in parts])
    names = [class_names[int(c)] if class_names is not None else str(c) for c in classes]
    if len(parts) > BARS_UP_TO:
        return _heatmap(plt, counts, names, path, title)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(parts) + 3), 4.0))
    bottom = np.zeros(len(parts))
    colours = plt.cm.tab20 if len(classes) > 10 else plt.cm.tab10
    for j, name in enumerate(names):
        ax.bar(np.arange(len(parts)), counts[:, j], bottom=bottom, color=colours(j % colours.N), label=name, width=0.85)
        bottom += counts[:, j]
    ax.set_xticks(np.arange(len(parts)))  # every client labelled
    ax.tick_params(axis="x", labelsize=7 if len(parts) > 20 else 9)
    ax.set_xlim(-0.6, len(parts) - 0.4)
    ax.set_xlabel("client")
    ax.set_ylabel("training examples")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=1, bbox_to_anchor=(1.01, 1.0), loc="upper left", title="class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
