"""``log = "tensorboard"``: each round's metrics as TensorBoard scalars in ``OUT/tensorboard``.

Uses torch's ``SummaryWriter``, which needs the ``tensorboard`` package (the ``tensorboard`` extra of fedvb).
Tags are the metrics rows' keys with the step the round, so curves of several runs overlay in TensorBoard.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["TensorBoardLog", "tensorboard_missing"]


def tensorboard_missing() -> str:
    """Why TensorBoard logging cannot work here ("" when it can)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return "needs the tensorboard package: pip install 'fedvb[tensorboard]'"
    return ""


class TensorBoardLog:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            elif key == "rejected":
                self._writer.add_scalar("rejected", len(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
