"""Gaussian families in natural parameters.

A Gaussian ``q = N(m, S^-1)`` is stored by its mean ``m`` (shape ``(P,)``) and its
precision ``S``.  Its natural parameters, in the convention of
docs/algorithms.md §1, are ``lambda = (S m, S)``: the log density is
``eta^T theta - 1/2 theta^T S theta + const`` with ``eta = S m`` (the ``-1/2`` is
dropped from the stored quadratic part).

Sites (the ADMM dual variables) ``t(theta) = exp(v^T theta - 1/2 theta^T V theta)``
live in the same vector space as ``lambda`` and are stored as
``NaturalParams(linear=v, quadratic=V)``.  Only a *distribution* needs a
positive(-definite) quadratic part; a site's ``V`` may be negative.

The structure of the precision is a :class:`Family`:

==========  ======================  =====================================
family      precision tensor        statistic paired with the quadratic
==========  ======================  =====================================
isotropic   shape ``()`` (s I)      ``-1/2 theta^T theta``
diagonal    shape ``(P,)``          ``-1/2 theta * theta`` (elementwise)
dense       shape ``(P, P)``        ``-1/2 theta theta^T``
==========  ======================  =====================================

A new covariance structure is one new ``Family`` subclass in a module of its own
(:mod:`fedvb.core.kronecker` is one: Kronecker factors per layer); everything
above it (site update, aggregation, solvers, messages, checkpoints) is written
against this interface. A family owns:

- its layout: the quadratic part of natural parameters, sites and precisions is one
  tensor of ``precision_shape(dim)``, which is also what messages, client stores
  and checkpoints carry (:meth:`Family.named_arrays` names its parts for
  ``posterior.npz``);
- its algebra: :class:`NaturalParams` adds, subtracts and scales through
  :meth:`Family.add`, :meth:`Family.sub`, :meth:`Family.scale` and sums through
  :meth:`Family.total`; a family that is not closed under addition (a sum of
  Kronecker products is not one) projects the result back into itself there;
- its identity: ``==`` (one object per closed family; a family built for a model
  compares by its layout), and the properties :attr:`Family.coordinatewise` and
  :attr:`Family.closed_under_addition` that callers ask instead of naming families;
- the curvature its Laplace clients compute (:meth:`Family.laplace_curvature`).

Pure torch, float32 or float64, any device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fedvb.core.tensor_checks import all_finite, smallest_and_largest

if TYPE_CHECKING:
    from fedvb.core.trainers import TorchTrainer

__all__ = [
    "DENSE",
    "DIAGONAL",
    "FAMILIES",
    "ISOTROPIC",
    "Dense",
    "Diagonal",
    "Family",
    "Gaussian",
    "Isotropic",
    "NaturalParams",
    "NonPositivePrecisionError",
    "family_by_name",
]


class NonPositivePrecisionError(ValueError):
    """A precision that must be positive (definite) is not."""


class Family(ABC):
    """The structure of a precision matrix and the linear algebra it allows.

    All methods take the precision in the family's own layout (see the module
    docstring) and vectors with the parameter dimension last, ``(..., P)``.
    """

    name: str
    # A weighted sum of members is a member (iso, diagonal, dense): sums need no projection. (Robust clipping
    # moves a precision's layout along a straight line towards the server's, which keeps every family's
    # positive: a convex combination of positive diagonals, matrices or Kronecker factors.)
    closed_under_addition = True
    # The precision is diagonal in the parameters' own coordinates (iso, diagonal): combining members
    # coordinate by coordinate (trimmed mean, median) gives a member, IVON can hold it, and a penalty's
    # gradient is one product per parameter.
    coordinatewise = False
    # A family whose layout depends on the model (bind it with :meth:`bind` before use).
    needs_model = False

    # -- algebra of the quadratic part (natural parameters, sites, precisions) -----------------
    def add(self, a: Tensor, b: Tensor) -> Tensor:
        """``a + b`` of two quadratic parts, back in the family."""
        return a + b

    def sub(self, a: Tensor, b: Tensor) -> Tensor:
        """``a - b`` of two quadratic parts, back in the family."""
        return a - b

    def scale(self, a: Tensor, factor: float) -> Tensor:
        """``factor * a``."""
        return factor * a

    def divide(self, a: Tensor, divisor: float) -> Tensor:
        """``a / divisor`` (a division, not a product with the reciprocal: the two differ in the last bit,
        and the closed families keep the numbers they always gave)."""
        return a / divisor

    def combine(self, terms: Sequence[tuple[float, Tensor]]) -> Tensor:
        """``sum_i c_i Q_i`` of ``terms`` ``(c_i, Q_i)`` in one step: a family not closed under addition projects
        the whole combination once (where a chain of ``add`` and ``sub`` would project each partial result, and
        the difference of two projections loses what the terms had in common)."""
        total = None
        for factor, quadratic in terms:
            total = self.scale(quadratic, factor) if total is None else self.add(total, self.scale(quadratic, factor))
        if total is None:
            raise ValueError("a combination needs at least one term")
        return total

    def total(self, quadratics: Iterable[Tensor]) -> Tensor:
        """The sum of a non-empty stream of quadratic parts: left to right, each term freed once added (a
        family not closed under addition projects the whole sum once, which beats projecting pairwise)."""
        total = None
        for quadratic in quadratics:
            total = quadratic if total is None else self.add(total, quadratic)
        if total is None:
            raise ValueError("a sum needs at least one term")
        return total

    @abstractmethod
    def smallest_eigenvalue(self, precision: Tensor) -> float:
        """The smallest eigenvalue of the matrix a precision of this family stands for."""

    def diagonal(self, precision: Tensor, dim: int) -> Tensor | None:
        """The precision as one value per parameter, shape ``(P,)``, for a :attr:`coordinatewise` family
        (what IVON holds); ``None`` for the others."""
        return None

    # -- models, curvature, files -----------------------------------------------------------
    def bind(self, model: nn.Module) -> Family:
        """This family for ``model``'s trainable parameters (its layout may depend on the layers); the same
        family for one whose layout does not."""
        return self

    def laplace_curvature(self, trainer: TorchTrainer, theta: Tensor, *, generator: torch.Generator | None) -> Tensor:
        """The loss curvature a Laplace client computes at ``theta`` on its own data, in this family's layout:
        the diagonal GGN (:meth:`~fedvb.core.trainers.TorchTrainer.curvature`) put in the family
        (:meth:`from_diagonal`)."""
        return self.from_diagonal(trainer.curvature(theta, generator=generator))

    def named_arrays(self, name: str, precision: Tensor, dim: int) -> dict[str, Tensor]:
        """The precision as named arrays for ``posterior.npz`` (a user reads them without fedvb)."""
        return {name: precision}

    def can_sample(self, dim: int) -> bool:
        """Whether drawing from a ``dim``-parameter Gaussian of this family is affordable (the predictive)."""
        return True

    @abstractmethod
    def precision_shape(self, dim: int) -> tuple[int, ...]:
        """Shape of a precision of this family for ``dim`` parameters."""

    @abstractmethod
    def eye(self, dim: int, value: float, *, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        """``value * I`` in this family's layout."""

    @abstractmethod
    def matvec(self, precision: Tensor, x: Tensor) -> Tensor:
        """``S x`` for ``x`` of shape ``(..., P)``."""

    @abstractmethod
    def solve(self, precision: Tensor, x: Tensor) -> Tensor:
        """``S^-1 x`` for ``x`` of shape ``(..., P)``; ``S`` must be positive."""

    @abstractmethod
    def logdet(self, precision: Tensor, dim: int) -> Tensor:
        """``log det S``."""

    @abstractmethod
    def trace_solve(self, precision: Tensor, other: Tensor, dim: int) -> Tensor:
        """``tr(S^-1 O)`` for two precisions of this family."""

    @abstractmethod
    def sample_noise(self, precision: Tensor, dim: int, n: int, generator: torch.Generator | None) -> Tensor:
        """``n`` draws of ``eps ~ N(0, S^-1)``, shape ``(n, P)``."""

    @abstractmethod
    def marginal_variance(self, precision: Tensor, dim: int) -> Tensor:
        """``diag(S^-1)``, shape ``(P,)``."""

    @abstractmethod
    def to_dense(self, precision: Tensor, dim: int) -> Tensor:
        """The ``(P, P)`` matrix this precision stands for."""

    @abstractmethod
    def project(self, matrix: Tensor) -> Tensor:
        """The family member closest to a dense symmetric ``(P, P)`` matrix.

        This is also the mean-field VB answer: for a quadratic loss with Hessian
        ``A`` the optimal precision within the family is ``project(A)`` (dense:
        ``A``; diagonal: ``diag(A)``; isotropic: ``tr(A) / P``).
        """

    @abstractmethod
    def from_diagonal(self, diagonal: Tensor) -> Tensor:
        """``project(diag(diagonal))`` without forming the matrix: a diagonal curvature (the diagonal GGN of
        the Laplace clients) in this family's layout."""

    @abstractmethod
    def second_moment(self, mean: Tensor, precision: Tensor) -> Tensor:
        """``E[stat]`` where ``stat`` is paired with the quadratic part (without the -1/2).

        Dense: ``Sigma + m m^T``; diagonal: ``1/S + m^2``; isotropic: ``P/s + m^T m``.
        """

    @abstractmethod
    def positivity_problem(self, precision: Tensor) -> str | None:
        """``None`` if the precision is positive (definite) and finite, else why not."""

    @abstractmethod
    def clamp(self, precision: Tensor, floor: float) -> Tensor:
        """The precision with every eigenvalue raised to at least ``floor``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Isotropic(Family):
    """``S = s I`` with one scalar ``s`` (a 0-d tensor)."""

    name = "isotropic"
    coordinatewise = True

    def diagonal(self, precision, dim):
        return precision.expand(dim)

    def smallest_eigenvalue(self, precision):
        return float(precision)

    def named_arrays(self, name, precision, dim):
        return {name: precision.expand(dim).clone()}  # one value per parameter, as the other families' files

    def precision_shape(self, dim: int) -> tuple[int, ...]:
        return ()

    def eye(self, dim, value, *, dtype, device=None):
        return torch.tensor(float(value), dtype=dtype, device=device)

    def matvec(self, precision, x):
        return precision * x

    def solve(self, precision, x):
        return x / precision

    def logdet(self, precision, dim):
        return dim * torch.log(precision)

    def trace_solve(self, precision, other, dim):
        return dim * other / precision

    def sample_noise(self, precision, dim, n, generator):
        z = torch.randn(n, dim, generator=generator, dtype=precision.dtype, device=precision.device)
        return z * precision.rsqrt()

    def marginal_variance(self, precision, dim):
        return (1.0 / precision).expand(dim)

    def to_dense(self, precision, dim):
        return precision * torch.eye(dim, dtype=precision.dtype, device=precision.device)

    def project(self, matrix):
        return torch.diagonal(matrix).mean()

    def from_diagonal(self, diagonal):
        return diagonal.mean()

    def second_moment(self, mean, precision):
        return mean.numel() / precision + mean @ mean

    def positivity_problem(self, precision):
        if not torch.isfinite(precision):
            return f"isotropic precision is not finite ({precision.item()})"
        if precision <= 0:
            return f"isotropic precision {precision.item():.4g} <= 0"
        return None

    def clamp(self, precision, floor):
        return precision.clamp(min=floor)


class Diagonal(Family):
    """``S = diag(s)`` with one precision per parameter."""

    name = "diagonal"
    coordinatewise = True

    def diagonal(self, precision, dim):
        return precision

    def smallest_eigenvalue(self, precision):
        return float(precision.min())

    def precision_shape(self, dim: int) -> tuple[int, ...]:
        return (dim,)

    def eye(self, dim, value, *, dtype, device=None):
        return torch.full((dim,), float(value), dtype=dtype, device=device)

    def matvec(self, precision, x):
        return precision * x

    def solve(self, precision, x):
        return x / precision

    def logdet(self, precision, dim):
        return torch.log(precision).sum()

    def trace_solve(self, precision, other, dim):
        return (other / precision).sum()

    def sample_noise(self, precision, dim, n, generator):
        z = torch.randn(n, dim, generator=generator, dtype=precision.dtype, device=precision.device)
        return z * precision.rsqrt()

    def marginal_variance(self, precision, dim):
        return 1.0 / precision

    def to_dense(self, precision, dim):
        return torch.diag(precision)

    def project(self, matrix):
        return torch.diagonal(matrix).clone()

    def from_diagonal(self, diagonal):
        return diagonal

    def second_moment(self, mean, precision):
        return 1.0 / precision + mean * mean

    def positivity_problem(self, precision):
        low, high = smallest_and_largest(precision)
        if 0 < low and high < float("inf"):  # one pass for the answer; the masks only to describe a failure
            return None
        finite = torch.isfinite(precision)
        if not bool(finite.all()):
            return f"diagonal precision has {int((~finite).sum())} non-finite entries"
        bad = precision <= 0
        if bool(bad.any()):
            return (
                f"diagonal precision has {int(bad.sum())} of {precision.numel()} entries <= 0 "
                f"(smallest {precision.min().item():.4g} at index {int(precision.argmin())})"
            )
        return None

    def clamp(self, precision, floor):
        return precision.clamp(min=floor)


class Dense(Family):
    """A full symmetric positive-definite ``(P, P)`` precision, handled through Cholesky."""

    name = "dense"

    def can_sample(self, dim):
        return dim <= 4096  # a Cholesky factor of P x P: beyond this the predictive costs more than the round

    def smallest_eigenvalue(self, precision):
        return float(torch.linalg.eigvalsh(0.5 * (precision + precision.T))[0])

    def precision_shape(self, dim: int) -> tuple[int, ...]:
        return (dim, dim)

    def eye(self, dim, value, *, dtype, device=None):
        return float(value) * torch.eye(dim, dtype=dtype, device=device)

    def matvec(self, precision, x):
        return x @ precision  # S is symmetric, so (S x^T)^T = x S

    def solve(self, precision, x):
        chol = torch.linalg.cholesky(precision)
        flat = x.reshape(-1, x.shape[-1]).T
        return torch.cholesky_solve(flat, chol).T.reshape(x.shape)

    def logdet(self, precision, dim):
        chol = torch.linalg.cholesky(precision)
        return 2.0 * torch.log(torch.diagonal(chol)).sum()

    def trace_solve(self, precision, other, dim):
        chol = torch.linalg.cholesky(precision)
        return torch.trace(torch.cholesky_solve(other, chol))

    def sample_noise(self, precision, dim, n, generator):
        # With S = L L^T, eps = L^-T z has covariance L^-T L^-1 = S^-1.
        chol = torch.linalg.cholesky(precision)
        z = torch.randn(precision.shape[0], n, generator=generator, dtype=precision.dtype, device=precision.device)
        return torch.linalg.solve_triangular(chol.T, z, upper=True).T

    def marginal_variance(self, precision, dim):
        return torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(precision)))

    def to_dense(self, precision, dim):
        return precision

    def project(self, matrix):
        return 0.5 * (matrix + matrix.T)

    def from_diagonal(self, diagonal):
        return torch.diag(diagonal)

    def second_moment(self, mean, precision):
        return torch.cholesky_inverse(torch.linalg.cholesky(precision)) + torch.outer(mean, mean)

    def positivity_problem(self, precision):
        if not all_finite(precision):
            return "dense precision has non-finite entries"
        _, info = torch.linalg.cholesky_ex(precision)
        if int(info) != 0:
            smallest = torch.linalg.eigvalsh(0.5 * (precision + precision.T))[0].item()
            return (
                f"dense precision is not positive definite "
                f"(Cholesky failed at minor {int(info)}; smallest eigenvalue {smallest:.4g})"
            )
        return None

    def clamp(self, precision, floor):
        eigenvalues, vectors = torch.linalg.eigh(0.5 * (precision + precision.T))
        return (vectors * eigenvalues.clamp(min=floor)) @ vectors.T


ISOTROPIC = Isotropic()
DIAGONAL = Diagonal()
DENSE = Dense()
FAMILIES: dict[str, Family] = {f.name: f for f in (ISOTROPIC, DIAGONAL, DENSE)}


def family_by_name(name: str) -> Family:
    """Look a family up by name, with an error listing the allowed names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family: unknown {name!r}; allowed: {', '.join(FAMILIES)}") from None


def _check_layout(family: Family, linear: Tensor, quadratic: Tensor, what: str) -> None:
    if linear.dim() != 1:
        raise ValueError(f"{what}: the vector part must be 1-d (P,), got shape {tuple(linear.shape)}")
    expected = family.precision_shape(linear.numel())
    if tuple(quadratic.shape) != expected:
        raise ValueError(
            f"{what}: a {family.name} precision for P={linear.numel()} has shape {expected}, "
            f"got {tuple(quadratic.shape)}"
        )
    if linear.dtype != quadratic.dtype:
        raise ValueError(f"{what}: dtypes differ ({linear.dtype} vs {quadratic.dtype})")


@dataclass(frozen=True, eq=False)
class NaturalParams:
    """A point ``(linear, quadratic)`` of the natural-parameter space of a family.

    Used both for the natural parameters ``(S m, S)`` of a Gaussian and for
    sites ``(v, V)``.  Supports ``+``, ``-``, unary ``-`` and scaling by a number.
    """

    linear: Tensor
    quadratic: Tensor
    family: Family

    def __post_init__(self) -> None:
        _check_layout(self.family, self.linear, self.quadratic, "natural parameters")

    @classmethod
    def zeros(cls, dim: int, family: Family, *, dtype: torch.dtype = torch.float64, device=None) -> NaturalParams:
        return cls(
            torch.zeros(dim, dtype=dtype, device=device),
            family.eye(dim, 0.0, dtype=dtype, device=device),
            family,
        )

    @property
    def dim(self) -> int:
        return self.linear.numel()

    def _same_family(self, other: NaturalParams) -> None:
        if other.family != self.family or other.dim != self.dim:
            raise ValueError(
                f"cannot combine {self.family.name}(P={self.dim}) with "
                f"{other.family.name}(P={other.dim}) natural parameters"
            )

    def __add__(self, other: NaturalParams) -> NaturalParams:
        self._same_family(other)
        return NaturalParams(self.linear + other.linear, self.family.add(self.quadratic, other.quadratic), self.family)

    def __sub__(self, other: NaturalParams) -> NaturalParams:
        self._same_family(other)
        return NaturalParams(self.linear - other.linear, self.family.sub(self.quadratic, other.quadratic), self.family)

    def __neg__(self) -> NaturalParams:
        return NaturalParams(-self.linear, self.family.scale(self.quadratic, -1.0), self.family)

    def __mul__(self, scale: float) -> NaturalParams:
        return NaturalParams(scale * self.linear, self.family.scale(self.quadratic, scale), self.family)

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> NaturalParams:
        return self * (1.0 / scale)


def sum_natural(items: Iterable[NaturalParams]) -> NaturalParams:
    """The sum of a non-empty sequence of natural parameters, left to right (a stream is summed as it comes:
    each term can be freed once added)."""
    return _fold(items)[0]


def mean_natural(items: Iterable[NaturalParams]) -> NaturalParams:
    """The average of a non-empty sequence of natural parameters (:func:`sum_natural` over the count)."""
    total, count = _fold(items)
    return total / count


def _fold(items: Iterable[NaturalParams]) -> tuple[NaturalParams, int]:
    items = iter(items)
    first = next(items, None)
    if first is None:
        raise ValueError("sum_natural needs at least one term")
    if first.family.closed_under_addition:  # left to right, each term dropped once added
        total, count = first, 1
        for item in items:
            total, count = total + item, count + 1
        return total, count
    terms = [first, *items]  # the family projects the whole sum once (Family.total)
    for term in terms[1:]:
        first._same_family(term)
    linear = terms[0].linear
    for term in terms[1:]:
        linear = linear + term.linear
    return NaturalParams(linear, first.family.total(t.quadratic for t in terms), first.family), len(terms)


@dataclass(frozen=True, eq=False)
class Gaussian:
    """``N(mean, precision^-1)`` with the precision in ``family``'s layout.

    Construction checks shapes and that the precision is positive (definite)
    and finite, raising :class:`NonPositivePrecisionError` otherwise.
    """

    mean: Tensor
    precision: Tensor
    family: Family

    def __post_init__(self) -> None:
        _check_layout(self.family, self.mean, self.precision, "Gaussian")
        problem = self.family.positivity_problem(self.precision)
        if problem is not None:
            raise NonPositivePrecisionError(problem)
        if not all_finite(self.mean):
            raise ValueError("Gaussian mean has non-finite entries")

    # -- construction -------------------------------------------------------------
    @classmethod
    def isotropic_prior(
        cls,
        dim: int,
        precision: float,
        family: Family,
        *,
        mean: Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        device=None,
    ) -> Gaussian:
        """``N(mean, precision^-1 I)`` (zero mean by default) written in ``family``."""
        if mean is None:
            mean = torch.zeros(dim, dtype=dtype, device=device)
        return cls(mean.to(dtype=dtype, device=device), family.eye(dim, precision, dtype=dtype, device=device), family)

    @classmethod
    def from_natural(cls, natural: NaturalParams, *, what: str = "Gaussian") -> Gaussian:
        """The Gaussian with natural parameters ``(S m, S)``; raises if ``S`` is not positive."""
        problem = natural.family.positivity_problem(natural.quadratic)
        if problem is not None:
            raise NonPositivePrecisionError(f"{what}: {problem}")
        mean = natural.family.solve(natural.quadratic, natural.linear)
        return cls(mean, natural.quadratic, natural.family)

    # -- views -----------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def natural(self) -> NaturalParams:
        """``(S m, S)``."""
        return NaturalParams(self.family.matvec(self.precision, self.mean), self.precision, self.family)

    def expectation(self) -> NaturalParams:
        """Expectation parameters ``(E theta, -1/2 E[stat])`` in the layout of the natural ones.

        They pair with a site through ``<v, E T(theta)> = v^T m - 1/2 <V, E[stat]>``;
        the Bregman-ADMM dual step takes differences of these.
        """
        return NaturalParams(self.mean, -0.5 * self.family.second_moment(self.mean, self.precision), self.family)

    def dense_precision(self) -> Tensor:
        return self.family.to_dense(self.precision, self.dim)

    def covariance(self) -> Tensor:
        """The dense ``(P, P)`` covariance (for small ``P``: tests and reporting)."""
        dense = self.dense_precision()
        return torch.cholesky_inverse(torch.linalg.cholesky(dense))

    def variance(self) -> Tensor:
        """Marginal variances, shape ``(P,)``."""
        return self.family.marginal_variance(self.precision, self.dim)

    def to(self, *args, **kwargs) -> Gaussian:
        return Gaussian(self.mean.to(*args, **kwargs), self.precision.to(*args, **kwargs), self.family)

    def in_family(self, family: Family) -> Gaussian:
        """This Gaussian's precision projected onto ``family`` (same mean)."""
        return Gaussian(self.mean, family.project(self.dense_precision()), family)

    # -- probability -------------------------------------------------------------
    @cached_property
    def _logdet(self) -> Tensor:
        return self.family.logdet(self.precision, self.dim)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; m, S^-1)`` for ``x`` of shape ``(..., P)``."""
        diff = x - self.mean
        mahalanobis = (diff * self.family.matvec(self.precision, diff)).sum(-1)
        return 0.5 * (self._logdet - self.dim * math.log(2.0 * math.pi) - mahalanobis)

    def kl(self, other: Gaussian) -> Tensor:
        """``KL(self || other)``."""
        if other.family != self.family or other.dim != self.dim:
            raise ValueError("kl: both Gaussians must share family and dimension")
        diff = self.mean - other.mean
        return 0.5 * (
            self.family.trace_solve(self.precision, other.precision, self.dim)
            + diff @ self.family.matvec(other.precision, diff)
            - self.dim
            + self._logdet
            - other._logdet
        )

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws, shape ``(n, P)``."""
        return self.mean + self.family.sample_noise(self.precision, self.dim, n, generator)

    def clamped(self, floor: float) -> Gaussian:
        """The same mean with every precision eigenvalue raised to at least ``floor``."""
        return Gaussian(self.mean, self.family.clamp(self.precision, floor), self.family)
