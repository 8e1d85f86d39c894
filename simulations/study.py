"""What every study script of simulations/ does first: the CLI's process settings and a results folder."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch


def start_study(out: str, prefix: str) -> Path:
    """One torch thread (as fedvb's CLI, so the numbers are the CLI's), Flower and fedvb logging only
    errors (the tables are the output), and the folder ``out`` (a fresh temp folder when empty)."""
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("fedvb").setLevel(logging.ERROR)
    return Path(out or tempfile.mkdtemp(prefix=prefix))
