"""What produced a run: the versions of fedvb, Flower, torch and Python, and the git commit of a checkout."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["provenance"]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    """The commit of the checkout fedvb runs from (``-dirty`` with uncommitted changes); "" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("-dirty" if dirty else "")


def provenance() -> dict[str, str]:
    """The table written as ``[provenance]`` in a run's config.toml (read back, it is not configuration)."""
    import fedvb

    return {
        "fedvb": fedvb.__version__,
        "flwr": _version("flwr"),
        "torch": _version("torch"),
        "python": platform.python_version(),
        "commit": _commit(),
    }
