"""Where dataset files are looked for, and the error that says so when they are missing."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["DataNotFoundError", "cache_dir", "find_first", "search_dirs"]

ENV_DATA = "FEDVB_DATA"
ENV_CACHE = "FEDVB_CACHE"


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not in any of the places searched."""


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for dataset files, in order.

    1. ``data_dir`` (the ``data_dir`` configuration key), 2. ``$FEDVB_DATA``,
    3. a ``shared/data`` folder beside the repository checkout (where this
    project's offline copies live). The current directory is not searched
    unless named (``data_dir = "data"``): what a run reads should not depend
    on where it was started from.
    """
    dirs = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get(ENV_DATA):
        dirs.append(Path(os.environ[ENV_DATA]))
    repo = Path(__file__).resolve().parents[2]
    dirs.append(repo.parent / "shared" / "data")
    return dirs


def find_first(candidates: Iterable[Path], dataset: str, how_to_get: str) -> Path:
    """The first existing path among ``candidates``, else a :class:`DataNotFoundError` naming them all."""
    candidates = list(candidates)
    for path in candidates:
        if path.exists():
            return path
    looked = "\n  ".join(str(p) for p in candidates)
    raise DataNotFoundError(
        f"{dataset}: no data found. Looked in:\n  {looked}\n{how_to_get} "
        f"Or point ${ENV_DATA} (or the data_dir key) at a folder that holds it."
    )


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$FEDVB_CACHE`` or ``~/.cache/fedvb``."""
    path = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "fedvb")
    path.mkdir(parents=True, exist_ok=True)
    return path
