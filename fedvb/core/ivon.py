"""IVON: Improved Variational Online Newton (Shen et al., ICML 2024), with a Gaussian prior and ADMM duals.

Written from the paper's update (docs/ivon.md) rather than wrapping
the GPL-3 ``ivon-opt`` package, because a federated client needs what that
package lacks: a per-parameter prior ``N(m0, diag(S0)^-1)`` with any mean,
dual terms, a step counter that survives ``state_dict``, parameters without
gradients and frozen parameters, and speed.

Objective over ``q = N(m, diag(lam (h + delta))^-1)`` with ``lam = ess / temperature``::

    lam E_q[lbar(theta)] + E_q[v^T theta - 1/2 theta^T V theta] + KL(q || N(m0, diag(S0)^-1))

``lbar`` is the mean loss of a minibatch (what PyTorch returns).  Per example,
the prior precision is ``delta = S0 / lam`` and the duals are ``d_m = v / lam``,
``d_p = V / lam`` (sign convention of docs/algorithms.md §1: the site is
``exp(v^T theta - 1/2 theta^T V theta)``; ``V`` may be negative).

One step, after ``S >= 1`` contexts ``sampled_params(train=True)`` (docs/algorithms.md §4)::

    eps_s = z_s / sqrt(lam (h + delta)),  theta_s = m + eps_s,  g_s = grad lbar(theta_s)
    g_hat = mean_s g_s,  h_hat = mean_s g_s * eps_s * lam (h + delta)     (Price's theorem)
    momentum <- beta1 momentum + (1 - beta1) g_hat
    f = h_hat - d_p
    h <- beta2 h + (1 - beta2) f + 1/2 (1 - beta2)^2 (h - f)^2 / (h + delta)
    m <- m - lr clip([momentum / (1 - beta1^t) + d_m - d_p m + delta (m - m0)] / (h + delta))

The posterior precision is ``lam (h + delta)``; the correction term keeps
``h + delta`` positive whatever the sign of ``f``.  ``lr`` is a Newton step
size (``rescale_lr=False`` in ``ivon-opt``).

Implementation: the trainable parameters of each group become views into one
flat buffer, so sampling, restoring and the update are a handful of
whole-buffer tensor ops instead of a Python loop over parameters (CPU and GPU
alike).  On a CPU with float32 parameters the draw and the update run in two
fused native loops (``ivon_native.c``, :mod:`fedvb.core.ivon_native`): the
noise then comes from a counter-based generator keyed by one 64-bit number
drawn from ``generator`` per sample, instead of torch's ``normal_``; with
``kernel="torch"`` (or without a C compiler) everything is torch ops.
Parameters with ``requires_grad=False`` are left out entirely (never
perturbed, never decayed); a parameter whose gradient is ``None`` in a step is
not moved by that step and its curvature and momentum are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedvb.core import ivon_native
from fedvb.core.gaussian import DIAGONAL, Gaussian

__all__ = ["IVON"]

_CPU_CHUNK = 32768  # elements per chunk: ~8 float32 buffers of it fit a 512 KiB L2 cache


@dataclass
class _FlatGroup:
    """The flat buffers of one parameter group (trainable parameters only).

    Besides the parameters, ``h`` and the momentum, a group keeps five
    parameter-sized scratch buffers (two more once a step averages several
    Monte Carlo samples) so that a step allocates nothing: fresh large
    allocations cost more than the arithmetic on a CPU.
    """

    params: list[torch.nn.Parameter]
    offsets: list[int]
    storage: Tensor  # the parameters are views into this: the mean outside a context
    hess: Tensor
    momentum: Tensor
    prior_mean: Tensor | None = None  # None: zero mean
    prior_precision: Tensor | None = None  # absolute (full-data) precision S0: 0-d or flat
    prior_natural: Tensor | None = None  # S0 * m0, cached
    dual_linear: Tensor | None = None  # v
    dual_quadratic: Tensor | None = None  # V
    grad: Tensor | None = None  # the gradients of the current sample, gathered
    saved: Tensor | None = None  # the mean while the parameters hold a draw
    noise: Tensor | None = None  # z of the current draw; g * z once collected (one sample, torch kernels)
    sqrt_precision: Tensor | None = None  # sqrt(lam (h + delta)), fixed within a step
    work: Tensor | None = None
    grad_sum: Tensor | None = None  # sum of g over samples, allocated for a second sample
    grad_noise: Tensor | None = None  # sum of g * z over samples, likewise
    precision_lam: float | None = None  # lam for which sqrt_precision is valid (None: stale)
    summed: bool = False
    seen: list[bool] = field(default_factory=list)
    count: int = 0
    chunk: int = 0
    views: dict[str, list[Tensor | None]] = field(default_factory=dict)
    native: ivon_native.NativeKernels | None = None  # the fused CPU kernels, when they serve this group

    @property
    def numel(self) -> int:
        return self.storage.numel()

    def allocate_scratch(self) -> None:
        for name in ("grad", "saved", "noise", "sqrt_precision", "work"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros_like(self.storage))
        # On a CPU the update is memory-bound: doing all its operations on one
        # cache-sized chunk before the next beats whole-buffer passes (~2x here).
        self.chunk = _CPU_CHUNK if self.storage.device.type == "cpu" else self.numel
        self.refresh_views()

    _CHUNKED = (
        "storage", "hess", "momentum", "grad", "saved", "noise", "sqrt_precision", "grad_sum", "grad_noise",
        "work", "prior_natural", "dual_linear", "dual_quadratic", "prior_precision",
    )  # fmt: skip

    def refresh_views(self) -> None:
        """Cache per-chunk views of every buffer (``None`` and numbers repeat per chunk)."""
        starts = range(0, self.numel, self.chunk)
        for name in self._CHUNKED:
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.dim() == 1:
                self.views[name] = [value[i : i + self.chunk] for i in starts]
            else:
                self.views[name] = [value] * len(starts)


class IVON(torch.optim.Optimizer):
    """Variational online Newton with a diagonal Gaussian posterior, prior and duals.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: Newton step size.
        ess: effective sample size (the data-set size ``N``; ``N / rho`` for a BayesADMM client).
        temperature: ``tau``; the likelihood is weighted by ``ess / tau``.
        prior_precision: absolute prior precision ``S0`` of a zero-mean isotropic prior
            (``set_prior`` gives any mean and per-parameter precisions).
        hess_init: initial ``h`` (the data part of the per-example precision).
        beta1, beta2: momentum of the gradient and of ``h``.
        clip_radius: elementwise clip of the preconditioned step (``inf``: none).
        generator: the random source of the weight noise (for reproducible runs).
        kernel: ``auto`` (the fused native CPU kernels for float32 CPU groups when a C compiler is
            available, torch ops otherwise), ``torch``, or ``native`` (an error when unavailable).

    Training pattern::

        for x, y in loader:
            for _ in range(mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss_fn(model(x), y).backward()
            opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        ess: float,
        *,
        temperature: float = 1.0,
        prior_precision: float = 1.0,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        clip_radius: float = math.inf,
        generator: torch.Generator | None = None,
        kernel: str = "auto",
    ) -> None:
        if kernel not in ("auto", "torch", "native"):
            raise ValueError(f"IVON: kernel must be auto, torch or native, got {kernel!r}")
        self._kernels = None if kernel == "torch" else ivon_native.load()
        if kernel == "native" and self._kernels is None:
            raise RuntimeError("IVON: kernel='native' but the native kernels could not be built (see the log)")
        for name, value, ok, allowed in (
            ("lr", lr, lr >= 0, ">= 0"),
            ("ess", ess, ess > 0, "> 0"),
            ("temperature", temperature, temperature > 0, "> 0"),
            ("prior_precision", prior_precision, prior_precision >= 0, ">= 0"),
            ("hess_init", hess_init, hess_init >= 0, ">= 0"),
            ("beta1", beta1, 0 <= beta1 < 1, "in [0, 1)"),
            ("beta2", beta2, 0 <= beta2 < 1, "in [0, 1)"),
            ("clip_radius", clip_radius, clip_radius > 0, "> 0"),
        ):
            if not ok:
                raise ValueError(f"IVON: {name} must be {allowed}, got {value}")
        self.generator = generator
        self._prior_precision_default = float(prior_precision)
        self._flat: list[_FlatGroup] = []
        self._in_context = False
        defaults = dict(
            lr=lr,
            ess=ess,
            temperature=temperature,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            clip_radius=clip_radius,
            step=0,
        )
        super().__init__(params, defaults)

    # -- parameter groups --------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        trainable = [p for p in group["params"] if p.requires_grad]
        if not trainable:
            raise ValueError("IVON: a parameter group has no parameter with requires_grad=True")
        devices = {p.device for p in trainable}
        dtypes = {p.dtype for p in trainable}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ValueError(
                f"IVON: the trainable parameters of a group must share one device and dtype, "
                f"got {sorted(map(str, devices))} and {sorted(map(str, dtypes))}"
            )
        offsets, total = [], 0
        for p in trainable:
            offsets.append(total)
            total += p.numel()
        storage = torch.empty(total, dtype=trainable[0].dtype, device=trainable[0].device)
        flat = _FlatGroup(
            params=trainable,
            offsets=offsets,
            storage=storage,
            hess=torch.full_like(storage, group["hess_init"]),
            momentum=torch.zeros_like(storage),
            prior_precision=torch.tensor(self._prior_precision_default, dtype=storage.dtype, device=storage.device),
        )
        self._bind(flat, copy_values=True)
        flat.allocate_scratch()
        if self._kernels is not None and ivon_native.NativeKernels.supports(storage):
            flat.native = self._kernels
        self._flat.append(flat)

    @staticmethod
    def _bind(flat: _FlatGroup, copy_values: bool) -> None:
        """Make each trainable parameter a view into the group's flat storage."""
        with torch.no_grad():
            for p, offset in zip(flat.params, flat.offsets):
                view = flat.storage[offset : offset + p.numel()].view_as(p)
                if copy_values:
                    view.copy_(p)
                p.data = view

    def _ensure_bound(self) -> None:
        # Someone may have re-pointed p.data (e.g. model.load_state_dict(assign=True));
        # copy the new values into the flat storage and bind again.
        for flat in self._flat:
            base, size = flat.storage.data_ptr(), flat.storage.element_size()
            if any(p.data.data_ptr() != base + offset * size for p, offset in zip(flat.params, flat.offsets)):
                self._bind(flat, copy_values=True)

    # -- prior, duals, warm start, read-back -------------------------------------------
    def _split(self, value: Tensor | float | None, what: str) -> list[Tensor | None]:
        """Per-group pieces of a flat vector; a number becomes a 0-d tensor (it broadcasts)."""
        if value is None:
            return [None] * len(self._flat)
        value = torch.as_tensor(value)
        if value.dim() == 0:
            return [value.to(flat.storage).clone() for flat in self._flat]
        if value.shape != (self.num_trainable,):
            raise ValueError(
                f"IVON: {what} must be a number or have shape ({self.num_trainable},), got {tuple(value.shape)}"
            )
        parts, start = [], 0
        for flat in self._flat:
            parts.append(value[start : start + flat.numel].to(flat.storage).clone())
            start += flat.numel
        return parts

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars ``P`` (the length of every flat vector below)."""
        return sum(flat.numel for flat in self._flat)

    def set_prior(self, mean: Tensor | None = None, precision: Tensor | float = 1.0) -> None:
        """Prior ``N(mean, diag(precision)^-1)``; ``precision`` is the absolute (full-data) ``S0``.

        ``mean`` and a tensor ``precision`` are flat over the trainable parameters in order.
        """
        precisions = self._split(precision, "prior precision")
        if any(bool((p < 0).any()) for p in precisions):
            raise ValueError("IVON: prior precision must be >= 0")
        for flat, m, s in zip(self._flat, self._split(mean, "prior mean"), precisions):
            flat.prior_mean, flat.prior_precision = m, s
            flat.prior_natural = None if m is None else m * s
            flat.precision_lam = None
            flat.refresh_views()

    def set_dual(self, linear: Tensor | None, quadratic: Tensor | None) -> None:
        """Dual (site) terms ``E_q[v^T theta - 1/2 theta^T V theta]``; ``None`` removes them."""
        for flat, v, big_v in zip(
            self._flat, self._split(linear, "dual linear"), self._split(quadratic, "dual quadratic")
        ):
            flat.dual_linear, flat.dual_quadratic = v, big_v
            flat.refresh_views()

    @staticmethod
    def _scale(group: dict[str, Any]) -> float:
        return group["ess"] / group["temperature"]

    def _delta(self, flat: _FlatGroup, scale: float) -> Tensor | float:
        return flat.prior_precision / scale

    def warm_start(self, posterior: Gaussian) -> None:
        """Set the mean to ``posterior.mean`` and ``h`` so that ``lam (h + delta)`` is its precision.

        Call after ``set_prior`` (``h`` is the part of the precision beyond the prior).
        """
        precision = posterior.family.diagonal(posterior.precision, posterior.dim)
        if precision is None:
            raise ValueError(f"IVON: warm start needs a diagonal or isotropic Gaussian, got {posterior.family.name}")
        if posterior.dim != self.num_trainable:
            raise ValueError(f"IVON: warm start has {posterior.dim} parameters, the optimizer {self.num_trainable}")
        start = 0
        with torch.no_grad():
            for flat, group in zip(self._flat, self.param_groups):
                end = start + flat.numel
                scale = self._scale(group)
                flat.storage.copy_(posterior.mean[start:end])
                flat.hess.copy_(precision[start:end] / scale - self._delta(flat, scale))
                flat.precision_lam = None
                start = end

    def reset_hessian(self, value: float) -> None:
        """Set ``h`` to ``value`` everywhere (e.g. ``hess_init`` after a warm start of the mean)."""
        for flat in self._flat:
            flat.hess.fill_(value)
            flat.precision_lam = None

    def momentum_state(self) -> tuple[Tensor, int]:
        """The gradient momentum (flat) and the step counter of the first group, to carry across rounds."""
        return self._flat[0].momentum.detach().clone(), int(self.param_groups[0]["step"])

    def restore_momentum(self, momentum: Tensor, step: int) -> None:
        """Undo :meth:`momentum_state` on a fresh optimizer (same parameters)."""
        self._flat[0].momentum.copy_(momentum)
        self.param_groups[0]["step"] = step

    def posterior(self) -> Gaussian:
        """The current ``N(m, diag(lam (h + delta))^-1)`` over the trainable parameters, as a core Gaussian."""
        means, precisions = [], []
        for flat, group in zip(self._flat, self.param_groups):
            scale = self._scale(group)
            mean = flat.saved if self._in_context else flat.storage  # inside a context storage holds a draw
            means.append(mean.detach().clone())
            precisions.append(scale * (flat.hess + self._delta(flat, scale)))
        return Gaussian(torch.cat(means), torch.cat(precisions), DIAGONAL)

    # -- sampling -------------------------------------------------------------------------
    @contextmanager
    def sampled_params(self, train: bool = False, noise: Tensor | None = None) -> Iterator[None]:
        """Inside, the parameters are one draw ``m + eps`` from the posterior; the mean is restored on exit.

        With ``train=True`` the gradients present on exit are collected for the
        next ``step()``; several contexts before one step average several Monte
        Carlo samples.  ``noise`` (flat, standard normal) replaces the random draw.
        """
        if self._in_context:
            raise RuntimeError("IVON: sampled_params contexts cannot be nested")
        self._ensure_bound()
        noises = self._split(noise, "noise") if noise is not None else [None] * len(self._flat)
        self._in_context = True
        try:
            with torch.no_grad():
                for flat, group, given in zip(self._flat, self.param_groups, noises):
                    self._perturb(flat, group, given, train)
            yield
            if train:
                with torch.no_grad():
                    for flat in self._flat:
                        self._collect(flat)
        finally:
            with torch.no_grad():
                for flat in self._flat:
                    flat.storage.copy_(flat.saved)
            self._in_context = False

    def _perturb(self, flat: _FlatGroup, group: dict[str, Any], given: Tensor | None, train: bool) -> None:
        lam = self._scale(group)
        if flat.precision_lam != lam:  # sqrt(lam h + S0); normally left by the last step
            torch.add(flat.prior_precision, flat.hess, alpha=lam, out=flat.sqrt_precision).sqrt_()
            flat.precision_lam = lam
        if train:
            if flat.count == 1 and not flat.summed:
                # A second Monte Carlo sample: move the first one's g and g * z out of the
                # buffers the next backward pass and draw will overwrite.
                if flat.grad_sum is None:
                    flat.grad_sum, flat.grad_noise = torch.empty_like(flat.grad), torch.empty_like(flat.noise)
                    flat.refresh_views()
                flat.grad_sum.copy_(flat.grad)
                if flat.native is not None:  # the native path keeps z, not g * z, after one sample
                    torch.mul(flat.grad, flat.noise, out=flat.grad_noise)
                else:
                    flat.grad_noise.copy_(flat.noise)
                flat.summed = True
        if given is None and flat.native is not None:
            key = int(torch.randint(0, 2**63 - 1, (), generator=self.generator))
            flat.native.sample_(flat.storage, flat.saved, flat.noise, flat.sqrt_precision, key)
            return
        if given is None:
            flat.noise.normal_(generator=self.generator)
        else:
            flat.noise.copy_(given)
        v = flat.views
        for storage, saved, noise, sqrt_precision in zip(v["storage"], v["saved"], v["noise"], v["sqrt_precision"]):
            saved.copy_(storage)
            storage.addcdiv_(noise, sqrt_precision)

    def _collect(self, flat: _FlatGroup) -> None:
        seen = [p.grad is not None for p in flat.params]
        parts = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            for p in flat.params
        ]
        torch.cat(parts, out=flat.grad)
        if flat.count == 0:
            if flat.native is None:  # the native update forms g * z itself
                flat.noise.mul_(flat.grad)  # now g * z
            flat.seen = seen
        else:
            flat.grad_sum.add_(flat.grad)
            flat.grad_noise.addcmul_(flat.grad, flat.noise)
            flat.seen = [a or b for a, b in zip(flat.seen, seen)]
        flat.count += 1

    def posterior_predictive(self, fn: Callable[[], Tensor], samples: int) -> Tensor:
        """``1/S sum_s fn()`` evaluated at ``S`` posterior draws (e.g. ``fn = lambda: model(x).softmax(-1)``)."""
        if samples < 1:
            raise ValueError(f"IVON: samples must be >= 1, got {samples}")
        total = None
        with torch.no_grad():
            for _ in range(samples):
                with self.sampled_params():
                    out = fn()
                total = out.clone() if total is None else total.add_(out)
        return total / samples

    # -- the update ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One IVON update from the samples collected since the last step.

        ``closure`` (optional) must open ``sampled_params(train=True)`` itself
        and return the loss; it is called once.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for flat, group in zip(self._flat, self.param_groups):
            if flat.count == 0:
                raise RuntimeError(
                    "IVON: step() needs gradients collected inside sampled_params(train=True) since the last step"
                )
            self._update(flat, group)
        return loss

    def _update(self, flat: _FlatGroup, group: dict[str, Any]) -> None:
        # Written with every term multiplied by lam = ess / temperature, so that
        # lam (h + delta) = lam h + S0 and lam d = (v, V): no per-example copies.
        beta1, beta2, lr, clip = group["beta1"], group["beta2"], group["lr"], group["clip_radius"]
        group["step"] += 1
        lam = self._scale(group)
        if flat.precision_lam != lam:
            raise RuntimeError("IVON: ess or temperature changed between sampling and step()")
        keep = None if all(flat.seen) else self._unseen_mask(flat)
        if keep is not None:
            old = (flat.hess.clone(), flat.momentum.clone(), flat.storage.clone())
        if flat.summed:
            flat.grad_sum.div_(flat.count)
            flat.grad_noise.div_(flat.count)
        c = lam / (1.0 - beta1 ** group["step"])
        scalars = dict(beta1=beta1, beta2=beta2, lam=lam, c=c, lr=lr, clip=clip)
        if flat.native is not None:
            grad, grad_noise = (flat.grad_sum, flat.grad_noise) if flat.summed else (flat.grad, flat.noise)
            flat.native.update_(
                flat.storage, flat.hess, flat.momentum, grad, grad_noise, flat.sqrt_precision, flat.prior_precision,
                flat.prior_natural, flat.dual_linear, flat.dual_quadratic, raw_noise=not flat.summed, **scalars,
            )  # fmt: skip
        else:
            v = flat.views
            grads, grad_noises = (v["grad_sum"], v["grad_noise"]) if flat.summed else (v["grad"], v["noise"])
            for chunk in zip(
                v["storage"], v["hess"], v["momentum"], grads, grad_noises, v["sqrt_precision"],
                v["prior_precision"], v["prior_natural"], v["dual_linear"], v["dual_quadratic"], v["work"],
            ):  # fmt: skip
                ivon_update_(*chunk, **scalars)

        if keep is not None:  # parameters without a gradient this step are left as they were
            for buffer, previous in zip((flat.hess, flat.momentum, flat.storage), old):
                torch.where(keep, buffer, previous, out=buffer)
            flat.precision_lam = None
        flat.count = 0
        flat.summed = False

    @staticmethod
    def _unseen_mask(flat: _FlatGroup) -> Tensor:
        keep = torch.zeros(flat.numel, dtype=torch.bool, device=flat.storage.device)
        for p, offset, seen in zip(flat.params, flat.offsets, flat.seen):
            if seen:
                keep[offset : offset + p.numel()] = True
        return keep

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, step counters, ``h``, momentum, prior, duals and the noise generator's state."""
        groups, state = [], {}
        index = 0
        for i, (group, flat) in enumerate(zip(self.param_groups, self._flat)):
            ids = list(range(index, index + len(group["params"])))
            index += len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
            state[i] = {
                "hess": flat.hess.clone(),
                "momentum": flat.momentum.clone(),
                "prior_mean": None if flat.prior_mean is None else flat.prior_mean.clone(),
                "prior_precision": flat.prior_precision.clone(),
                "dual_linear": None if flat.dual_linear is None else flat.dual_linear.clone(),
                "dual_quadratic": None if flat.dual_quadratic is None else flat.dual_quadratic.clone(),
            }
        generator = None if self.generator is None else self.generator.get_state()
        return {"state": state, "param_groups": groups, "generator": generator}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the model's weights (the mean) are restored by the model."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"IVON: state has {len(groups)} parameter groups, the optimizer {len(self.param_groups)}")
        for i, (saved, group, flat) in enumerate(zip(groups, self.param_groups, self._flat)):
            saved_state = state_dict["state"][i]
            if saved_state["hess"].numel() != flat.numel:
                raise ValueError(
                    f"IVON: group {i} has {flat.numel} trainable scalars, the state {saved_state['hess'].numel()}"
                )
            group.update({k: v for k, v in saved.items() if k != "params"})
            flat.hess.copy_(saved_state["hess"])
            flat.momentum.copy_(saved_state["momentum"])

            like = flat.storage
            flat.prior_mean = _restore(saved_state["prior_mean"], like)
            flat.prior_precision = _restore(saved_state["prior_precision"], like)
            flat.dual_linear = _restore(saved_state["dual_linear"], like)
            flat.dual_quadratic = _restore(saved_state["dual_quadratic"], like)
            flat.prior_natural = None if flat.prior_mean is None else flat.prior_mean * flat.prior_precision
            flat.count = 0
            flat.summed = False
            flat.precision_lam = None
            flat.refresh_views()
        if state_dict.get("generator") is not None:
            if self.generator is None:
                raise ValueError("IVON: the state holds a generator state but this optimizer has no generator")
            self.generator.set_state(state_dict["generator"])


def _restore(value: Tensor | float | None, like: Tensor) -> Tensor | float | None:
    """A saved buffer on the device and dtype of ``like`` (numbers and ``None`` pass through)."""
    return value.to(like).clone() if isinstance(value, Tensor) else value


def ivon_update_(
    mean: Tensor,
    hess: Tensor,
    momentum: Tensor,
    grad: Tensor,
    grad_noise: Tensor,
    sqrt_precision: Tensor,
    s0: Tensor,
    s0m0: Tensor | None,
    dual_v: Tensor | None,
    dual_big_v: Tensor | None,
    work: Tensor,
    *,
    beta1: float,
    beta2: float,
    lam: float,
    c: float,
    lr: float,
    clip: float,
) -> None:
    """One IVON update, in place, of ``mean``, ``hess``, ``momentum`` and ``sqrt_precision``.

    ``work`` is scratch of ``mean``'s shape; ``grad_noise`` is overwritten.
    Inputs: ``grad`` = mean_s g_s and ``grad_noise`` = mean_s g_s z_s over the
    step's samples, ``sqrt_precision`` = sqrt(lam h + S0) at which they were drawn,
    ``s0`` = S0, ``s0m0`` = S0 m0, duals ``v``, ``V``; ``c = lam / (1 - beta1^t)``.
    Every term is multiplied by ``lam`` so that ``lam (h + delta) = lam h + S0``::

        momentum <- beta1 momentum + (1 - beta1) grad
        f = grad_noise sqrt(lam (h + delta)) - V / lam              (h_hat - d_p)
        h <- beta2 h + (1 - beta2) f + 1/2 (1 - beta2)^2 (h - f)^2 / (h + delta)
        m <- m - lr c [momentum + (S0 (m - m0) + v - V m) / c] / (lam h + S0)
        sqrt_precision <- sqrt(lam h + S0)                           (for the next draw)

    IVON calls it on cache-sized chunks of its flat buffers (whole buffers on a GPU).
    """
    momentum.lerp_(grad, 1.0 - beta1)
    f = grad_noise.mul_(sqrt_precision)  # grad_noise is spent after this
    if dual_big_v is not None:
        f.sub_(dual_big_v, alpha=1.0 / lam)
    ratio = torch.sub(hess, f, out=work).div_(sqrt_precision)  # (h - f) / sqrt(lam (h + delta))
    hess.lerp_(f, 1.0 - beta2)
    hess.addcmul_(ratio, ratio, value=0.5 * (1.0 - beta2) ** 2 * lam)
    step = torch.addcmul(momentum, mean, s0, value=1.0 / c, out=work)
    if s0m0 is not None:
        step.sub_(s0m0, alpha=1.0 / c)
    if dual_big_v is not None:
        step.addcmul_(dual_big_v, mean, value=-1.0 / c)
    if dual_v is not None:
        step.add_(dual_v, alpha=1.0 / c)
    precision = torch.add(s0, hess, alpha=lam, out=sqrt_precision)  # lam h + S0 with the new h
    step.div_(precision)
    if clip != math.inf:
        step.clamp_(-clip / c, clip / c)
    mean.sub_(step, alpha=lr * c)
    precision.sqrt_()
