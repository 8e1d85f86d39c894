"""Bounding what one client's reply can do to the server: clipping each change to a norm set by the cohort.

``clip_to_cohort(changes, sizes, factor)``: client ``k``'s change ``d_k`` (its reply minus the server's
reference, one tensor per client) is scaled down, if needed, to

    ||d_k|| <= factor * median_i ||d_i|| * max(1, n_k / median_i n_i)

where ``n_k`` is the client's (verified) example count. A client with more data than the median may move
further in proportion (a sum loss, more local steps), and none is held below the median's allowance (a small
client's change does not shrink with its size: it still takes at least one step). Scaling a change towards
zero keeps a precision positive (a convex combination of the server's and the client's), so clipped
posteriors stay Gaussians.

Guarantee: with ``f < n/2`` of the ``n >= 3`` replies crafted, both medians lie within the honest clients'
range, so a crafted change has a norm of at most ``factor * max_honest ||d_i|| * max(1, n_a / min_honest
n_i)``, whatever it sends: one client moves an unweighted average of ``n`` replies by at most ``1/n`` of
that, and a weighted average by its verified share of the examples times that. Honest runs are untouched as
long as no honest client's change exceeds that bound; each round's metrics row lists the clients clipped.
That is not always so: on the README's main job (IVON-ADMM, 10 heterogeneous digits clients) a factor of
10 clips one honest client in 9 of 10 rounds (final accuracy 0.9415 against 0.9443), so clipping is off by
default (``robust_clip = 0``) and a choice; the other checks (sites, example counts) are always on. With
fewer than 3 replies nothing is clipped: there is no honest majority to anchor a median.

Outliers, always watched: whether or not ``robust_clip`` bounds them, a reply whose change exceeds the
allowance at a factor of ``OUTLIER_FACTOR`` (1000) is an outlier, listed in its round's metrics row
(``outliers``) and, where nothing bounds it, named in a warning: with the default (no bound) a reply that
would own the average does not do so silently. The factor sits far above honest heterogeneity (a factor of
10 clips honest clients, above; on the digits demonstration one honest client once passed 100) and far
below a crafted magnitude (1e10 and more). Watching computes one norm per reply and tensor, one reply at a
time, and changes nothing.

``Combination``: what the server uses in place of each (weighted) average or sum over the cohort. ``mean``
is the algorithm's own average, bit for bit. ``trimmed`` drops, coordinate by coordinate, the ``t``
smallest and ``t`` largest of the ``n`` values (``t = max(1, floor(trim * n))`` once ``n >= 3``, at most
``(n - 1) // 2``) and averages the rest with their weights; ``median`` is the coordinate-wise median.

Guarantee: with at most ``t`` crafted replies (``f < n/2`` for ``median``), every coordinate of the
combination lies between the smallest and the largest honest value of that coordinate, whatever the
crafted replies hold (each kept value is bracketed by honest values, because at most ``t`` values above
and ``t`` below any kept one can be crafted). A sum over ``n`` terms is ``n`` times the combination. For
natural parameters the linear and the quadratic part are combined coordinate by coordinate; with an
isotropic or diagonal family the combined precision is then positive, because every honest one is. A
dense precision combined entry by entry need not be positive definite (the aggregation would fail), so the
configuration refuses ``trimmed`` and ``median`` with a dense family.

Cost: on heterogeneous clients the trimmed values are real information, so an honest run moves (the
trimmed mean is biased towards the cohort's centre); ``benchmarks/results/robust.md`` gives the figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedvb.core.gaussian import NaturalParams, mean_natural, sum_natural

__all__ = ["COMBINATIONS", "MEAN", "OUTLIER_FACTOR", "Combination", "beyond_cohort", "clip_to_cohort"]

COMBINATIONS = ("mean", "trimmed", "median")
OUTLIER_FACTOR = 1000.0


def _allowance(norms: Tensor, sizes: Sequence[float], factor: float) -> Tensor:
    """Each client's bound ``factor * median ||d|| * max(1, n_k / median n)`` (the module)."""
    n = torch.tensor([max(float(s), 1.0) for s in sizes], dtype=torch.float64)
    return factor * norms.median() * (n / n.median()).clamp_min(1.0)


def clip_to_cohort(changes: list[Tensor], sizes: list[float], factor: float) -> list[Tensor]:
    """Each change scaled to at most ``factor * median ||d|| * max(1, n_k / median n)`` in norm (the module)."""
    if factor <= 0 or len(changes) < 3:
        return changes
    norms = torch.stack([c.double().norm() for c in changes])
    bound = _allowance(norms, sizes, factor)
    scale = torch.where(norms > bound, bound / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    return [c if s >= 1.0 else c * s.to(c.dtype) for c, s in zip(changes, scale)]


def beyond_cohort(norms: Sequence[float], sizes: Sequence[float], factor: float = OUTLIER_FACTOR) -> list[bool]:
    """Whether each change's norm exceeds ``factor`` times its allowance (the module; none with fewer than 3)."""
    if len(norms) < 3:
        return [False] * len(norms)
    values = torch.tensor([float(v) for v in norms], dtype=torch.float64)
    return (values > _allowance(values, sizes, factor)).tolist()


@dataclass(frozen=True)
class Combination:
    """How the server combines the cohort's tensors (the module docstring): ``rule`` one of
    :data:`COMBINATIONS`, ``trim`` the fraction dropped at each end by ``trimmed``."""

    rule: str = "mean"
    trim: float = 0.1

    def __post_init__(self) -> None:
        if self.rule not in COMBINATIONS:
            raise ValueError(f"combine: unknown {self.rule!r}; allowed: {', '.join(COMBINATIONS)}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"combine_trim must be in [0, 0.5), got {self.trim}")

    def trimmed_count(self, n: int) -> int:
        """How many values ``trimmed`` drops at each end of ``n``."""
        if n < 3:
            return 0
        return min(max(1, int(self.trim * n)), (n - 1) // 2)

    def mean(self, tensors: Sequence[Tensor], weights: Sequence[float] | Tensor | None = None) -> Tensor:
        """The combined (weighted) average of ``tensors`` (same shape): float64 when weighted or robust, else
        in the tensors' dtype (the plain mean, as the algorithms always computed it)."""
        if weights is None and (self.rule == "mean" or len(tensors) < 3):
            return torch.stack(list(tensors)).mean(0)
        stacked = torch.stack([t.double() for t in tensors])
        w = (torch.ones(len(tensors), dtype=torch.float64) if weights is None
             else torch.as_tensor(weights, dtype=torch.float64).reshape(-1).to(stacked.device))  # fmt: skip
        if self.rule == "mean" or len(tensors) < 3:
            return (w[:, None] * stacked.reshape(len(tensors), -1)).sum(0).reshape(stacked.shape[1:]) / w.sum()
        if self.rule == "median":
            ordered, n = stacked.sort(dim=0).values, len(tensors)
            return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
        t = self.trimmed_count(len(tensors))
        order = stacked.argsort(dim=0)  # per coordinate, the replies from smallest to largest
        kept = order[t : len(tensors) - t]
        values = stacked.gather(0, kept)
        kept_w = w[kept]  # each kept value's own weight
        return (kept_w * values).sum(0) / kept_w.sum(0)

    def natural_mean(self, items: Iterable[NaturalParams]) -> NaturalParams:
        """The combined average of natural parameters (linear and quadratic part each coordinate-wise); the
        plain mean takes a stream term by term."""
        if self.rule == "mean":
            return mean_natural(items)
        items = list(items)
        like = items[0]
        linear = self.mean([i.linear for i in items]).to(like.linear)
        quadratic = self.mean([i.quadratic for i in items]).to(like.quadratic)
        return NaturalParams(linear, quadratic, like.family)

    def natural_sum(self, items: Sequence[NaturalParams]) -> NaturalParams:
        """``len(items)`` times :meth:`natural_mean` (the plain sum for ``mean``)."""
        if self.rule == "mean":
            return sum_natural(list(items))
        return self.natural_mean(items) * float(len(items))


MEAN = Combination("mean")  # the algorithms' own averages
