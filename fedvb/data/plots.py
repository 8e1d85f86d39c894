"""A picture of who holds what: the label distribution per client."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_label_distribution"]


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
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(parts) + 3), 4.0))
    bottom = np.zeros(len(parts))
    colours = plt.cm.tab20 if len(classes) > 10 else plt.cm.tab10
    for j, cls in enumerate(classes):
        name = class_names[int(cls)] if class_names is not None else str(cls)
        ax.bar(np.arange(len(parts)), counts[:, j], bottom=bottom, color=colours(j % colours.N), label=name, width=0.85)
        bottom += counts[:, j]
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
