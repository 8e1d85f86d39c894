"""Local solvers on a client's own data, for any torch model.

A trainer owns one client's data and a model, and offers what the algorithms
ask of it (:mod:`fedvb.core.algorithms`):

* ``map(start, penalty)``: minimise ``sum_i loss_i / tau + 1/2 t^T A t - b^T t``
  with Adam or SGD, where ``penalty = (b, A)`` are natural parameters (the
  BayesADMM cavity ``rho lambda_bar - v``, or a baseline's proximal and linear terms);
* ``curvature(theta)``: the diagonal GGN of the summed loss on the client's own
  data (exact: for softmax cross-entropy it is the Fisher, summed over classes);
* ``ivon(server, site, ...)``: IVON with the server as prior and the site as duals;
* ``exact(server, site, ...)``: the closed-form / Newton client step of
  :mod:`fedvb.core.solvers` (linear and softmax regression without bias).

Parameters travel as one flat vector in ``model.parameters()`` order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from fedvb.core.gaussian import DIAGONAL, ISOTROPIC, Gaussian, NaturalParams
from fedvb.core.ivon import IVON
from fedvb.core.solvers import solve_linear_regression, solve_softmax_regression

__all__ = ["LR_SCHEDULES", "LocalSettings", "TorchTrainer", "lr_in_round"]

LR_SCHEDULES = ("constant", "cosine")


def lr_in_round(lr: float, schedule: str, server_round: int, rounds: int) -> float:
    """The local learning rate of round ``server_round`` (1-based) of ``rounds``.

    ``cosine`` is torch's ``CosineAnnealingLR(T_max=rounds, eta_min=0)`` stepped once per round, as the
    papers' code does: round r trains with ``lr (1 + cos(pi (r - 1) / rounds)) / 2``, the full ``lr``
    in round 1. Written as a formula: fedvb builds each client's optimizer afresh every round, so there
    is no scheduler object to step (tests/test_trainers.py checks it against torch's scheduler)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (server_round - 1) / rounds)) / 2
    raise ValueError(f"lr_schedule: unknown {schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True)
class LocalSettings:
    """How a client trains locally."""

    lr: float = 1e-3
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"  # or "sgd"
    ivon_hess_init: float = 0.1
    ivon_beta2: float = 0.99995
    ivon_mc_samples: int = 1
    ivon_kernel: str = "auto"  # see fedvb.core.ivon.IVON
    curvature_batch: int = 16


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``adam`` is torch's fused Adam (one kernel for all parameters; the default single-tensor Adam is
    1.7-2.1x slower per whole step on the papers' MLP), ``sgd`` plain SGD. tests/test_trainers.py pins the
    fused Adam to the single-tensor one within float tolerance."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.SGD(params, lr=lr)


class TorchTrainer:
    """One client's data bound to a model; ``task`` is ``classification`` or ``regression``."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, task: str, settings: LocalSettings, device=None):
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device)
        # the model's dtype (float64 for a user's float64 data, else float32) is the dtype of local training
        self.dtype = next(model.parameters()).dtype
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.task = task
        self.settings = settings
        self.lr = settings.lr  # this round's learning rate: settings.lr under a schedule (begin_round)

    def begin_round(self, lr: float) -> None:
        """Train the coming round with learning rate ``lr`` (the round's value of the run's schedule)."""
        self.lr = lr

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    # -- helpers ---------------------------------------------------------------------
    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def set_flat(self, theta: Tensor) -> None:
        """Copy ``theta`` into the parameters. A copy, not ``vector_to_parameters``: that makes each parameter
        a view of ``theta`` when dtype and device already match, and training would then write into the
        caller's tensor (the server's mean of a float64 run)."""
        with torch.no_grad():
            flat = theta.to(self.device, self.dtype)
            start = 0
            for param in self._params():
                param.copy_(flat[start : start + param.numel()].view_as(param))
                start += param.numel()

    def get_flat(self) -> Tensor:
        return parameters_to_vector(self._params()).detach().clone()

    def loss_sum(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.model(x)
        if self.task == "regression":
            return 0.5 * ((out.reshape(-1) - y) ** 2).sum()
        return nn.functional.cross_entropy(out, y, reduction="sum")

    def _batches(self, generator: torch.Generator):
        n, size = self.num_examples, self.settings.batch_size
        for _ in range(self.settings.local_epochs):
            order = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, size):
                rows = order[start : start + size]
                yield self.x[rows], self.y[rows]

    def steps_per_round(self) -> int:
        return self.settings.local_epochs * math.ceil(self.num_examples / self.settings.batch_size)

    # -- MAP with a quadratic penalty ---------------------------------------------------
    def map(
        self,
        start: Tensor,
        penalty: NaturalParams | None,
        *,
        temperature: float = 1.0,
        generator: torch.Generator,
        optimizer: str | None = None,
    ) -> Tensor:
        """Minimise ``sum loss / tau + 1/2 t^T A t - b^T t`` from ``start``; returns the flat solution.

        Each minibatch step descends ``mean batch loss + (tau / N) penalty(t)``,
        the objective divided by ``N / tau``, so the learning rate keeps its usual scale.
        """
        self.set_flat(start)
        params = self._params()
        kind = optimizer or self.settings.optimizer
        opt = make_optimizer(kind, params, self.lr)
        scale = temperature / self.num_examples
        if penalty is not None:
            quadratic = penalty.quadratic.to(self.device, self.dtype)
            linear = penalty.linear.to(self.device, self.dtype)
        self.model.train()
        for xb, yb in self._batches(generator):
            opt.zero_grad()
            loss = self.loss_sum(xb, yb) / xb.shape[0]
            if penalty is not None:
                flat = torch.cat([p.reshape(-1) for p in params])
                value = 0.5 * (flat * penalty.family.matvec(quadratic, flat)).sum() - linear @ flat
                loss = loss + scale * value
            loss.backward()
            opt.step()
        return self.get_flat()

    # -- curvature -----------------------------------------------------------------------
    def curvature(self, theta: Tensor) -> Tensor:
        """Diagonal GGN of the summed loss at ``theta`` on this client's data.

        Regression (unit-variance Gaussian): ``sum_i J_i^2``. Classification:
        ``sum_i sum_c p_ic (grad log p_c(x_i))^2``, the exact diagonal Fisher,
        which equals the GGN for softmax cross-entropy.
        """
        self.set_flat(theta)
        params = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        buffers = dict(self.model.named_buffers())
        model = self.model.eval()

        def outputs(p, x):
            out = torch.func.functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)
            return out.reshape(-1) if self.task == "regression" else torch.log_softmax(out, -1)

        jacobian = torch.func.vmap(torch.func.jacrev(outputs), in_dims=(None, 0))
        total = torch.zeros(sum(p.numel() for p in params.values()), device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for start in range(0, self.num_examples, self.settings.curvature_batch):
                xb = self.x[start : start + self.settings.curvature_batch]
                jac = jacobian(params, xb)  # name -> (B, outputs, *shape)
                flat = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)
                if self.task == "regression":
                    total += (flat**2).sum((0, 1))
                else:
                    probs = torch.func.functional_call(model, (params, buffers), (xb,)).softmax(-1)
                    total += (probs.unsqueeze(-1) * flat**2).sum((0, 1))
        return total

    # -- IVON ------------------------------------------------------------------------------
    def ivon(
        self,
        server: Gaussian,
        site: NaturalParams,
        *,
        rho: float,
        temperature: float,
        generator: torch.Generator,
        state: dict[str, Tensor] | None,
        first_round: bool = False,
    ) -> tuple[Gaussian, dict[str, Tensor]]:
        """The BayesADMM client step by IVON (docs/algorithms.md §4): ``ess = N / rho``, the server as the
        prior and the start, the site divided by ``rho`` as duals. ``state`` carries IVON's momentum
        and step counter across rounds (they are not reset, as in the reference code)."""
        if server.family not in (DIAGONAL, ISOTROPIC):
            raise ValueError(f"ivon solver needs a diagonal or isotropic family, got {server.family.name}")
        params = self._params()
        s = self.settings
        batch_generator = generator
        if self.device.type != "cpu":  # weight noise is drawn where the weights live, from a stream seeded by ours
            seed = int(torch.randint(2**62, (1,), generator=generator))
            generator = torch.Generator(device=self.device).manual_seed(seed)
        opt = IVON(
            params, lr=self.lr, ess=self.num_examples / rho, temperature=temperature, hess_init=s.ivon_hess_init,
            beta2=s.ivon_beta2, generator=generator, kernel=s.ivon_kernel,
        )  # fmt: skip
        precision = server.precision.expand(server.dim) if server.family is ISOTROPIC else server.precision
        device_dtype = dict(device=self.device, dtype=self.dtype)
        opt.set_prior(server.mean.to(**device_dtype), precision.to(**device_dtype))
        quadratic = site.quadratic.expand(server.dim) if server.family is ISOTROPIC else site.quadratic
        opt.set_dual(site.linear.to(**device_dtype) / rho, quadratic.to(**device_dtype) / rho)
        opt.warm_start(Gaussian(server.mean.to(**device_dtype), precision.to(**device_dtype), DIAGONAL))
        if first_round:  # docs/algorithms.md §4: round 1 starts from h0, later rounds from the server (h = 0)
            opt.reset_hessian(s.ivon_hess_init)
        if state:
            opt.restore_momentum(state["ivon_momentum"].to(self.device), int(state["ivon_step"].item()))
        self.model.train()
        for xb, yb in self._batches(batch_generator):
            for _ in range(s.ivon_mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    (self.loss_sum(xb, yb) / xb.shape[0]).backward()
            opt.step()
        posterior = opt.posterior()
        momentum, step = opt.momentum_state()
        new_state = {"ivon_momentum": momentum.cpu(), "ivon_step": torch.tensor(float(step))}
        return posterior.to(server.mean), new_state

    # -- exact -------------------------------------------------------------------------------
    def exact(
        self, server: Gaussian, site: NaturalParams, *, rho: float, temperature: float, point_estimate: bool
    ) -> Gaussian:
        """Closed form (``linear`` model) or Newton (``softmax`` model): no bias, one weight matrix."""
        x = self.x.reshape(self.num_examples, -1).to(server.mean)  # solve where the server's tensors are
        y = self.y.to(server.mean.device)
        kwargs = dict(rho=rho, temperature=temperature, point_estimate=point_estimate)
        if self.task == "regression":
            return solve_linear_regression(x, y.to(server.dtype), server, site, **kwargs)
        classes = server.dim // x.shape[1]
        return solve_softmax_regression(x, y, classes, server, site, **kwargs)

    # -- prediction --------------------------------------------------------------------------
    def logits_at(self, theta: Tensor, x: Tensor) -> Tensor:
        """The model's outputs at the flat parameters ``theta``, differentiable in ``theta``."""
        shapes = [(name, p.shape) for name, p in self.model.named_parameters() if p.requires_grad]
        params, start = {}, 0
        for name, shape in shapes:
            size = math.prod(shape)
            params[name] = theta[start : start + size].reshape(shape)
            start += size
        self.model.eval()
        return torch.func.functional_call(self.model, params, (x.to(self.device),))

    def predict(self, theta: Tensor, x: Tensor) -> Tensor:
        """Class probabilities (or regression outputs) of the model at ``theta``."""
        self.set_flat(theta)
        self.model.eval()
        with torch.no_grad():
            out = self.model(x.to(self.device))
        return out.reshape(-1) if self.task == "regression" else out.softmax(-1)
