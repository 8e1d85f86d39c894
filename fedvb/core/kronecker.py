"""Kronecker-factored Gaussians (K-FAC): per linear or convolutional layer a Kronecker product plus a multiple
of the identity, a diagonal for every other parameter (docs/algorithms.md §10).

A layer's weight and bias are one matrix ``M = [W | b]`` of ``rows`` outputs by ``width`` columns (the inputs,
times the kernel's size for a convolution, plus one for the bias). Its precision over ``vec(M)`` (row-major,
the order of the flat parameter vector) is ``G kron A + s I``: ``G`` (``rows x rows``) over the outputs,
``A`` (``width x width``) over the inputs, ``s`` a number. The ``s I`` part is what K-FAC's Laplace
posteriors carry anyway (the prior ``delta I`` plus a curvature ``G kron A``), and it makes the prior, a
client's posterior and the difference of two members with one factor pair in common exact. With
``G = U diag(l) U^T`` and ``A = V diag(m) V^T``, ``G kron A + s I = (U kron V) diag(l m^T + s) (U kron V)^T``,
so solves, determinants and draws cost two symmetric eigendecompositions per layer::

    (G kron A + s I) vec(M) = vec(G M A + s M),
    (G kron A + s I)^-1 vec(M) = vec(U [(U^T M V) / (l m^T + s)] V^T),
    log det = sum_ij log(l_i m_j + s).

The quadratic part of natural parameters, sites and precisions is one tensor (what messages, client stores
and checkpoints carry): each layer's ``G``, ``A`` (flattened) and ``s``, then the diagonal of the other
parameters. A member is positive definite when every ``l_i m_j + s > 0``.

**Not closed under addition.** A sum of Kronecker products is not one, and the BayesADMM algebra adds:
sites, the site sum, the cavity, the client precision ``S_bar + (C / tau - V) / rho``. The ``s I`` parts
add exactly; the Kronecker parts of a sum are projected back by the nearest Kronecker product in the
Frobenius norm (Van Loan and Pitsianis 1993): rearranging ``sum_i c_i G_i kron A_i`` into
``sum_i c_i vec(G_i) vec(A_i)^T`` makes it the best rank-one approximation of that matrix, whose top singular
pair comes from thin QR factors of the stacked ``vec(G_i)``, ``vec(A_i)`` and an SVD of an ``n x n`` matrix,
never a ``P x P`` one. Why this projection: it is the one the other families use (the Frobenius-nearest
diagonal matrix is the diagonal, the nearest multiple of the identity has the mean trace), it is exact when
the sum is a Kronecker product (terms sharing a factor, or cancelling), and a positive-definite sum gets
positive-definite factors (Van Loan and Pitsianis, Theorem 5.8). A sum of many terms (the site sum over
clients) is projected once, a sum of two at each ``+`` and ``-``. The linear parts add exactly, so a
projected precision and its linear part no longer describe the exact mean of the sum: the price of the
family, measured in benchmarks/results/kronecker.md.

**The Laplace client's curvature** (:meth:`Kronecker.laplace_curvature`): K-FAC's "expand" approximation of
the GGN of the summed loss on the client's own data. From the per-layer pieces of
:meth:`~fedvb.core.trainers.TorchTrainer.layer_gradients` (each layer's input ``a`` and the output-gradient
rows ``g`` with weights ``w``; for a convolution every spatial position is a term, its input the unfolded
patch): ``GGN ~ (sum w g g^T) kron (sum a a^T) / n``, ``n`` the number of terms (examples times positions);
exact for one example of a linear layer. The other parameters (normalisation layers) take the diagonal GGN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedvb.core.gaussian import Family
from fedvb.core.tensor_checks import all_finite

if TYPE_CHECKING:
    from fedvb.core.trainers import TorchTrainer

__all__ = ["KRONECKER", "Block", "Kronecker", "nearest_kronecker"]


@dataclass(frozen=True)
class Block:
    """One layer's ``M = [W | b]``: where its weight (and bias) sit in the flat trainable vector."""

    name: str  # the layer's name in the model ("" for a model that is one layer)
    weight: int  # offset of the weight
    rows: int  # outputs (features or channels)
    columns: int  # inputs, times the kernel's size for a convolution
    bias: int | None  # offset of the bias; None without one
    conv: tuple | None = None  # (kernel_size, dilation, padding, stride) of a Conv2d; None for a Linear

    @property
    def width(self) -> int:
        return self.columns + (self.bias is not None)

    @property
    def packed(self) -> int:
        return self.rows * self.rows + self.width * self.width + 1

    def gather(self, x: Tensor) -> Tensor:
        """``M`` (``(..., rows, width)``) from flat vectors ``x`` (``(..., P)``)."""
        weight = x[..., self.weight : self.weight + self.rows * self.columns].unflatten(-1, (self.rows, self.columns))
        if self.bias is None:
            return weight
        return torch.cat([weight, x[..., self.bias : self.bias + self.rows].unsqueeze(-1)], dim=-1)

    def scatter(self, out: Tensor, matrix: Tensor) -> None:
        """Write ``M`` (``(..., rows, width)``) into the flat vectors ``out`` at this block's places."""
        out[..., self.weight : self.weight + self.rows * self.columns] = matrix[..., : self.columns].flatten(-2)
        if self.bias is not None:
            out[..., self.bias : self.bias + self.rows] = matrix[..., self.columns]

    def indices(self, device=None) -> Tensor:
        """The flat position of each entry of ``vec(M)``, row-major."""
        index = torch.arange(self.rows * self.columns, device=device).view(self.rows, self.columns) + self.weight
        if self.bias is not None:
            bias = torch.arange(self.rows, device=device).view(self.rows, 1) + self.bias
            index = torch.cat([index, bias], dim=1)
        return index.reshape(-1)


@dataclass(frozen=True)
class Layer:
    """One layer's ``G kron A + s I`` (views into a packed quadratic part)."""

    block: Block
    g: Tensor
    a: Tensor
    s: Tensor  # 0-d

    def eigen(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, V, D)``: ``G = U diag(l) U^T``, ``A = V diag(m) V^T`` and the eigenvalues ``D = l m^T + s``
        of ``G kron A + s I`` (``rows x width``)."""
        l_values, u = torch.linalg.eigh(0.5 * (self.g + self.g.T))
        m_values, v = torch.linalg.eigh(0.5 * (self.a + self.a.T))
        return u, v, torch.outer(l_values, m_values) + self.s


def _balanced(g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """The same product with ``||G||_F = ||A||_F`` and a non-negative trace in ``A``."""
    g_norm, a_norm = torch.linalg.matrix_norm(g), torch.linalg.matrix_norm(a)
    if float(g_norm) == 0.0 or float(a_norm) == 0.0:
        return torch.zeros_like(g), torch.zeros_like(a)
    ratio = torch.sqrt(a_norm / g_norm)
    sign = -1.0 if float(torch.trace(a)) < 0 else 1.0
    return sign * ratio * g, sign * a / ratio


def nearest_kronecker(terms: list[tuple[float, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(G, A)`` with ``G kron A`` the Frobenius-nearest Kronecker product to ``sum_i c_i G_i kron A_i``
    (``terms``: ``(c_i, G_i, A_i)``), balanced; exact when the sum is a Kronecker product. The rearranged
    sum ``sum_i c_i vec(G_i) vec(A_i)^T = Q_G (R_G diag(c) R_A^T) Q_A^T`` (thin QR of the stacked factors)
    has the top singular pair of the small middle matrix, mapped back by ``Q_G`` and ``Q_A``."""
    first_g, first_a = terms[0][1], terms[0][2]
    if len(terms) == 1:
        c, g, a = terms[0]
        return _balanced(c * g, a)
    coefficients = torch.tensor([c for c, _, _ in terms], dtype=first_g.dtype, device=first_g.device)
    q_g, r_g = torch.linalg.qr(torch.stack([g.reshape(-1) for _, g, _ in terms], dim=1))
    q_a, r_a = torch.linalg.qr(torch.stack([a.reshape(-1) for _, _, a in terms], dim=1))
    u, sigma, vh = torch.linalg.svd((r_g * coefficients) @ r_a.T)
    if float(sigma[0]) <= float(sigma.sum()) * torch.finfo(sigma.dtype).eps * len(terms):
        return torch.zeros_like(first_g), torch.zeros_like(first_a)  # the terms cancel
    scale = torch.sqrt(sigma[0])
    g = (q_g @ u[:, 0]).view_as(first_g) * scale
    a = (q_a @ vh[0]).view_as(first_a) * scale
    return _balanced(0.5 * (g + g.T), 0.5 * (a + a.T))  # symmetric up to rounding: made exactly so


@dataclass(frozen=True)
class Kronecker(Family):
    """``G kron A + s I`` per linear or convolutional layer, diagonal for the rest (the module docstring).

    :data:`KRONECKER` is the template, with no layout; :meth:`bind` gives the family of a model's layers.
    """

    blocks: tuple[Block, ...] = ()
    rest: tuple[tuple[int, int], ...] = ()  # (offset, length) of every parameter outside the blocks
    dim: int | None = None  # None: the template

    name = "kronecker"
    closed_under_addition = False
    coordinatewise = False
    needs_model = True

    # -- layout ------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> Kronecker:
        offsets, total = {}, 0
        for parameter in model.parameters():
            if parameter.requires_grad:
                offsets[id(parameter)], total = total, total + parameter.numel()
        blocks, covered = [], set()
        for name, module in model.named_modules():
            if not _factored(module) or id(module.weight) not in offsets:
                continue
            bias = module.bias if module.bias is not None and id(module.bias) in offsets else None
            if isinstance(module, nn.Conv2d):
                columns = module.in_channels * math.prod(module.kernel_size)
                conv = (module.kernel_size, module.dilation, module.padding, module.stride)
                rows = module.out_channels
            else:
                rows, columns, conv = module.out_features, module.in_features, None
            offset_bias = None if bias is None else offsets[id(bias)]
            blocks.append(Block(name, offsets[id(module.weight)], rows, columns, offset_bias, conv))
            covered |= {id(module.weight)} | ({id(bias)} if bias is not None else set())
        rest = tuple(
            (offsets[id(p)], p.numel()) for p in model.parameters() if id(p) in offsets and id(p) not in covered
        )
        bound = Kronecker(tuple(blocks), rest, total)
        if self.dim is not None and bound != self:
            raise ValueError("kronecker family: bound to another architecture than this model's")
        return self if self.dim is not None else bound

    def _check(self, dim: int) -> None:
        if self.dim is None:
            raise ValueError("kronecker family: bind it to a model first (Family.bind)")
        if dim != self.dim:
            raise ValueError(f"kronecker family: built for {self.dim} parameters, got {dim}")

    @property
    def rest_size(self) -> int:
        return sum(length for _, length in self.rest)

    def precision_shape(self, dim: int) -> tuple[int, ...]:
        self._check(dim)
        return (sum(block.packed for block in self.blocks) + self.rest_size,)

    def _parts(self, quadratic: Tensor) -> tuple[list[Layer], Tensor]:
        """Each layer's ``G``, ``A``, ``s`` (views) and the rest's diagonal."""
        layers, position = [], 0
        for block in self.blocks:
            g = quadratic[position : position + block.rows**2].view(block.rows, block.rows)
            position += block.rows**2
            a = quadratic[position : position + block.width**2].view(block.width, block.width)
            position += block.width**2
            layers.append(Layer(block, g, a, quadratic[position]))
            position += 1
        return layers, quadratic[position:]

    def _pack(self, layers: Iterable[tuple[Tensor, Tensor, Tensor | float]], rest: Tensor) -> Tensor:
        pieces = []
        for g, a, s in layers:
            pieces += [g.reshape(-1), a.reshape(-1), torch.as_tensor(s, dtype=g.dtype, device=g.device).reshape(1)]
        return torch.cat(pieces + [rest.reshape(-1)])

    def _rest_view(self, x: Tensor) -> Tensor:
        """The rest's coordinates of flat vectors ``x`` (``(..., P)``), gathered."""
        if not self.rest:
            return x[..., :0]
        return torch.cat([x[..., start : start + length] for start, length in self.rest], dim=-1)

    def _rest_write(self, out: Tensor, values: Tensor) -> None:
        position = 0
        for start, length in self.rest:
            out[..., start : start + length] = values[..., position : position + length]
            position += length

    # -- the family's algebra ---------------------------------------------------------------------
    def combine(self, terms):
        """``sum_i c_i Q_i``: the Kronecker parts projected (one projection per layer), the rest exact."""
        split = [(c, self._parts(q)) for c, q in terms]
        layers = []
        for index in range(len(self.blocks)):
            pieces = [(c, layers_of[index]) for c, (layers_of, _) in split]
            g, a = nearest_kronecker([(c, layer.g, layer.a) for c, layer in pieces])
            layers.append((g, a, sum(c * layer.s for c, layer in pieces)))
        return self._pack(layers, sum(c * rest for c, (_, rest) in split))

    def add(self, a, b):
        return self.combine([(1.0, a), (1.0, b)])

    def sub(self, a, b):
        return self.combine([(1.0, a), (-1.0, b)])

    def scale(self, a, factor):
        layers, rest = self._parts(a)
        return self._pack([(factor * x.g, x.a, factor * x.s) for x in layers], factor * rest)  # G carries the factor

    def divide(self, a, divisor):
        return self.scale(a, 1.0 / divisor)

    def total(self, quadratics):
        terms = [(1.0, q) for q in quadratics]
        if not terms:
            raise ValueError("a sum needs at least one term")
        return self.combine(terms)

    # -- the Family interface ------------------------------------------------------------------------
    def eye(self, dim, value, *, dtype, device=None):
        self._check(dim)
        layers = [
            (torch.zeros(b.rows, b.rows, dtype=dtype, device=device),
             torch.zeros(b.width, b.width, dtype=dtype, device=device), float(value))
            for b in self.blocks
        ]  # fmt: skip
        return self._pack(layers, torch.full((self.rest_size,), float(value), dtype=dtype, device=device))

    def matvec(self, precision, x):
        layers, rest = self._parts(precision)
        out = torch.empty_like(x)
        for layer in layers:
            m = layer.block.gather(x)
            layer.block.scatter(out, layer.g @ m @ layer.a + layer.s * m)
        self._rest_write(out, rest * self._rest_view(x))
        return out

    def solve(self, precision, x):
        layers, rest = self._parts(precision)
        out = torch.empty_like(x)
        for layer in layers:
            u, v, d = layer.eigen()
            layer.block.scatter(out, u @ ((u.T @ layer.block.gather(x) @ v) / d) @ v.T)
        self._rest_write(out, self._rest_view(x) / rest)
        return out

    def logdet(self, precision, dim):
        layers, rest = self._parts(precision)
        return torch.log(rest).sum() + sum(torch.log(layer.eigen()[2]).sum() for layer in layers)

    def trace_solve(self, precision, other, dim):
        layers, rest = self._parts(precision)
        others, other_rest = self._parts(other)
        total = (other_rest / rest).sum()
        for layer, o in zip(layers, others):  # tr(S^-1 O) in S's eigenbasis: diag(U^T G_o U) diag(V^T A_o V)^T + s_o
            u, v, d = layer.eigen()
            numerator = torch.outer(torch.diagonal(u.T @ o.g @ u), torch.diagonal(v.T @ o.a @ v)) + o.s
            total = total + (numerator / d).sum()
        return total

    def sample_noise(self, precision, dim, n, generator):
        z = torch.randn(n, dim, generator=generator, dtype=precision.dtype, device=precision.device)
        layers, rest = self._parts(precision)
        out = torch.empty_like(z)
        for layer in layers:  # (U kron V) D^-1/2 z: covariance (U kron V) D^-1 (U kron V)^T
            u, v, d = layer.eigen()
            layer.block.scatter(out, u @ (layer.block.gather(z) * d.rsqrt()) @ v.T)
        self._rest_write(out, self._rest_view(z) * rest.rsqrt())
        return out

    def marginal_variance(self, precision, dim):
        layers, rest = self._parts(precision)
        out = torch.empty(dim, dtype=precision.dtype, device=precision.device)
        for layer in layers:  # diag((U kron V) D^-1 (U kron V)^T) = (U o U) D^-1 (V o V)^T
            u, v, d = layer.eigen()
            layer.block.scatter(out, u.square() @ (1.0 / d) @ v.square().T)
        self._rest_write(out, 1.0 / rest)
        return out

    def to_dense(self, precision, dim):
        layers, rest = self._parts(precision)
        dense = torch.zeros(dim, dim, dtype=precision.dtype, device=precision.device)
        for layer in layers:
            index = layer.block.indices(precision.device)
            eye = torch.eye(index.numel(), dtype=precision.dtype, device=precision.device)
            dense[index[:, None], index[None, :]] = torch.kron(layer.g, layer.a) + layer.s * eye
        rest_index = self._rest_view(torch.arange(dim, device=precision.device))
        dense[rest_index, rest_index] = rest
        return dense

    def project(self, matrix):
        """The nearest Kronecker product (Frobenius) of each layer's block of ``matrix`` (``s = 0``), the
        diagonal of the rest; the blocks between layers are dropped."""
        dim = matrix.shape[0]
        layers = []
        for block in self.blocks:
            index = block.indices(matrix.device)
            sub = matrix[index[:, None], index[None, :]].reshape(block.rows, block.width, block.rows, block.width)
            rearranged = sub.permute(0, 2, 1, 3).reshape(block.rows**2, block.width**2)
            u, sigma, vh = torch.linalg.svd(rearranged, full_matrices=False)
            g = (u[:, 0] * torch.sqrt(sigma[0])).view(block.rows, block.rows)
            a = (vh[0] * torch.sqrt(sigma[0])).view(block.width, block.width)
            layers.append((*_balanced(0.5 * (g + g.T), 0.5 * (a + a.T)), 0.0))
        rest_index = self._rest_view(torch.arange(dim, device=matrix.device))
        return self._pack(layers, torch.diagonal(matrix)[rest_index])

    def from_diagonal(self, diagonal):
        # the nearest Kronecker product of diag(vec D) is sigma diag(u) kron diag(v), (u, v) D's top singular pair
        layers = []
        for block in self.blocks:
            u, sigma, vh = torch.linalg.svd(block.gather(diagonal), full_matrices=False)
            root = torch.sqrt(sigma[0])
            layers.append((*_balanced(torch.diag(u[:, 0] * root), torch.diag(vh[0] * root)), 0.0))
        return self._pack(layers, self._rest_view(diagonal))

    def second_moment(self, mean, precision):
        raise NotImplementedError(
            "kronecker family: E[theta theta^T] is not of its form (m m^T is not); the expectation-parameter "
            "(Bregman) site step is not defined for it"
        )

    def positivity_problem(self, precision):
        if not all_finite(precision):
            return "kronecker precision has non-finite entries"
        layers, rest = self._parts(precision)
        for layer in layers:
            smallest = float(layer.eigen()[2].min())
            if smallest <= 0:
                return f"kronecker precision of layer {layer.block.name!r} has eigenvalue {smallest:.4g} <= 0"
        if rest.numel() and not bool((rest > 0).all()):
            return f"kronecker precision: {int((rest <= 0).sum())} diagonal entries <= 0"
        return None

    def clamp(self, precision, floor):
        """Every eigenvalue raised to at least ``floor``: each layer's ``s`` raised by what its smallest
        eigenvalue lacks (which keeps the form), the diagonal entry by entry."""
        layers, rest = self._parts(precision)
        clamped = [(x.g, x.a, x.s + (floor - x.eigen()[2].min()).clamp(min=0.0)) for x in layers]
        return self._pack(clamped, rest.clamp(min=floor))

    def smallest_eigenvalue(self, precision):
        layers, rest = self._parts(precision)
        values = [float(layer.eigen()[2].min()) for layer in layers] + ([float(rest.min())] if rest.numel() else [])
        return min(values)

    def named_arrays(self, name, precision, dim):
        layers, rest = self._parts(precision)
        arrays = {name: precision}  # the family's own layout, as fedvb reads it back; then its parts by layer
        for layer in layers:  # G over the layer's outputs, A over its inputs (and the bias), s the identity's part
            label = f"{name}.{layer.block.name or 'layer'}"
            arrays[f"{label}.out"], arrays[f"{label}.in"], arrays[f"{label}.identity"] = layer.g, layer.a, layer.s
        if rest.numel():
            arrays[f"{name}.rest"] = rest
        return arrays

    # -- the Laplace client's curvature ---------------------------------------------------------------
    def laplace_curvature(self, trainer: TorchTrainer, theta: Tensor, *, generator: torch.Generator | None) -> Tensor:
        self._check(theta.numel())
        modules = dict(trainer.model.named_modules())
        layers = [modules[block.name] for block in self.blocks]
        dtype, device = trainer.dtype, trainer.device
        outer = [torch.zeros(b.rows, b.rows, dtype=dtype, device=device) for b in self.blocks]
        inner = [torch.zeros(b.width, b.width, dtype=dtype, device=device) for b in self.blocks]
        terms = [0] * len(self.blocks)
        for inputs, grads, weights in trainer.layer_gradients(theta, layers, generator=generator):
            for index, (block, layer) in enumerate(zip(self.blocks, layers)):
                a, g = _terms(block, inputs[layer], grads[layer], weights)
                inner[index] += a.T @ a
                outer[index] += torch.einsum("rno,rnp->op", g, g)
                terms[index] += a.shape[0]
        factors = [(*_balanced(g / n, a), 0.0) for g, a, n in zip(outer, inner, terms)]
        rest = self._rest_view(trainer.curvature(theta, generator=generator)) if self.rest else theta[:0].to(dtype)
        return self._pack(factors, rest.to(dtype))

    def __repr__(self) -> str:
        return "Kronecker()" if self.dim is None else f"Kronecker({len(self.blocks)} layers, P={self.dim})"


def _factored(module: nn.Module) -> bool:
    """A layer this family factors: ``nn.Linear``, or an ``nn.Conv2d`` with one group, zero padding of a
    fixed size."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )  # fmt: skip


def _terms(block: Block, inputs: Tensor, grads: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """A layer's K-FAC terms: the inputs as rows ``(n, width)`` (a convolution's unfolded patches, one row per
    example and position; a ones column for the bias) and the weighted output gradients ``(R, n, rows)``."""
    if block.conv is None:
        a = inputs.reshape(-1, block.columns)
        positions = a.shape[0] // inputs.shape[0]
        g = grads.reshape(grads.shape[0], -1, block.rows)
    else:
        kernel, dilation, padding, stride = block.conv
        patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, columns, T)
        a = patches.transpose(1, 2).reshape(-1, block.columns)
        positions = patches.shape[2]
        g = grads.flatten(3).transpose(2, 3).reshape(grads.shape[0], -1, block.rows)  # (R, B T, rows)
    if block.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
    root = weights.sqrt().repeat_interleave(positions, dim=1)  # (R, B T): each position weighs as its example
    return a, g * root.unsqueeze(-1)


KRONECKER = Kronecker()
