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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from fedvb.core.gaussian import DIAGONAL, Gaussian, NaturalParams
from fedvb.core.ivon import IVON
from fedvb.core.solvers import solve_linear_regression, solve_softmax_regression

__all__ = [
    "CARRIED_OPTIMIZER",
    "CURVATURES",
    "LR_SCHEDULES",
    "OPTIMIZER_STATES",
    "LocalSettings",
    "TorchTrainer",
    "lr_in_round",
]

LR_SCHEDULES = ("constant", "cosine")
CURVATURES = ("exact", "mc")
OPTIMIZER_STATES = ("fresh", "kept")  # a MAP client's Adam each round: new (the textbook), or its last round's
# The names under which a client's state carries its Adam between rounds (optimizer_state = "kept"): the step
# count and the two moments, each moment one flat vector over the trainable parameters in model order.
CARRIED_OPTIMIZER = ("adam_step", "adam_exp_avg", "adam_exp_avg_sq")


def _linear_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The model's ``nn.Linear`` layers when they hold every trainable parameter (an MLP, softmax or linear
    regression: each example's gradient then factors per layer), else ``None``."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owned = {id(p) for layer in layers for p in layer.parameters()}
    if any(p.requires_grad and id(p) not in owned for p in model.parameters()):
        return None
    return layers


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
    weight_decay: float = 0.0  # the MAP optimizer's L2 decay (torch's weight_decay)
    grad_clip: float = 0.0  # each MAP step's gradient clipped to this norm; 0: none
    optimizer_state: str = "fresh"  # or "kept": Adam's moments and step count carried across rounds (map)
    ivon_hess_init: float = 0.1
    ivon_beta2: float = 0.99995
    ivon_mc_samples: int = 1
    ivon_clip_radius: float = 0.0  # each coordinate's preconditioned IVON step clipped to this; 0: none
    ivon_kernel: str = "auto"  # see fedvb.core.ivon.IVON
    curvature_batch: int = 16
    curvature: str = "exact"  # or "mc": one label drawn per example (see TorchTrainer.curvature)

    @property
    def ivon_clip(self) -> float:
        """IVON's ``clip_radius`` for :attr:`ivon_clip_radius` (0, no clip, is IVON's ``inf``)."""
        return self.ivon_clip_radius or math.inf


def make_optimizer(
    kind: str, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``adam`` is torch's fused Adam (one kernel for all parameters; the default single-tensor Adam is
    1.7-2.1x slower per whole step on the papers' MLP), ``sgd`` plain SGD; both with torch's L2
    ``weight_decay`` (Adam's is added to the gradient, as the papers' code uses it, not AdamW's).
    tests/test_trainers.py pins the fused Adam to the single-tensor one within float tolerance."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _flat_adam(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, Tensor]:
    """``optimizer``'s Adam state as :data:`CARRIED_OPTIMIZER`: the step count (float64, one per client: every
    parameter takes each step) and each moment flattened over ``params`` in order, on the CPU."""
    state = [optimizer.state[p] for p in params]
    return {
        "adam_step": torch.tensor(float(state[0]["step"]), dtype=torch.float64),
        "adam_exp_avg": torch.cat([s["exp_avg"].reshape(-1) for s in state]).detach().cpu(),
        "adam_exp_avg_sq": torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]).detach().cpu(),
    }


def _load_adam(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], carried: dict[str, Tensor]) -> None:
    """Put :func:`_flat_adam`'s state into a new Adam over ``params``, through ``load_state_dict`` (which casts
    the step count as the fused kernel wants it). ``ValueError`` when the carried moments do not fit."""
    sizes = [p.numel() for p in params]
    moments = {}
    for name in ("exp_avg", "exp_avg_sq"):
        flat = carried[f"adam_{name}"]
        if flat.shape != (sum(sizes),):
            raise ValueError(f"the carried adam_{name} has shape {tuple(flat.shape)}, the model {sum(sizes)} values")
        moments[name] = torch.split(flat, sizes)
    step = float(carried["adam_step"])
    saved = optimizer.state_dict()
    saved["state"] = {
        i: {"step": torch.tensor(step), "exp_avg": moments["exp_avg"][i].view_as(p).to(p),
            "exp_avg_sq": moments["exp_avg_sq"][i].view_as(p).to(p)}
        for i, p in enumerate(params)
    }  # fmt: skip
    optimizer.load_state_dict(saved)


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
        self._carried_in: dict[str, Tensor] = {}  # the Adam state the next map starts from (carry_optimizer)
        self._carried_out: dict[str, Tensor] = {}  # the Adam state the last map left (carried_optimizer)

    def begin_round(self, lr: float) -> None:
        """Train the coming round with learning rate ``lr`` (the round's value of the run's schedule)."""
        self.lr = lr

    def carry_optimizer(self, state: dict[str, Tensor]) -> None:
        """Start the next :meth:`map`'s Adam from ``state`` (names :data:`CARRIED_OPTIMIZER`, as
        :meth:`carried_optimizer` gave them; empty: a fresh Adam) when ``optimizer_state = "kept"``."""
        self._carried_in, self._carried_out = dict(state), {}

    def carried_optimizer(self) -> dict[str, Tensor]:
        """The Adam state the last :meth:`map` left under ``optimizer_state = "kept"`` (else empty): what the
        client's state carries to its next round."""
        return dict(self._carried_out)

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

    @contextmanager
    def _training(self, generator: torch.Generator) -> Iterator[None]:
        """Train mode, with torch's global random stream seeded from the client's own and restored after.
        Dropout draws from the global stream, which a worker process shares among all the clients it runs:
        without this a model with dropout trained differently on 1 worker and on 2, and from run to run."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(generator.initial_seed())
            self.model.train()
            yield

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
        opt = make_optimizer(kind, params, self.lr, self.settings.weight_decay)
        keep = self.settings.optimizer_state == "kept" and kind == "adam"  # plain SGD holds no state
        carried, self._carried_in, self._carried_out = self._carried_in, {}, {}
        if keep and carried:
            _load_adam(opt, params, carried)
        scale = temperature / self.num_examples
        if penalty is not None:
            quadratic = penalty.quadratic.to(self.device, self.dtype)
            linear = penalty.linear.to(self.device, self.dtype)
        # The penalty's gradient, scale (A t - b), is added to each parameter's gradient directly: through
        # autograd (a flat copy of the parameters, its products and their backward) it cost as much as the
        # MLP's own step and made every penalised client (FedProx, FedLap, Laplace) twice as slow as FedAvg's.
        # A coordinate-wise penalty (diagonal, isotropic) is one product per parameter; any other (dense,
        # Kronecker) is one matrix-vector product of the family over the flat parameters.
        by_parameter = penalty is not None and penalty.family.coordinatewise
        coupled = penalty is not None and not by_parameter
        if coupled:
            sizes = [p.numel() for p in params]
        if by_parameter:
            sizes = [p.numel() for p in params]
            linears = [b.view_as(p) for b, p in zip(torch.split(linear, sizes), params)]
            quadratics = [quadratic] * len(params) if quadratic.ndim == 0 else [
                a.view_as(p) for a, p in zip(torch.split(quadratic, sizes), params)
            ]  # fmt: skip
        with self._training(generator):
            for xb, yb in self._batches(generator):
                opt.zero_grad()
                loss = self.loss_sum(xb, yb) / xb.shape[0]
                loss.backward()
                if coupled:
                    with torch.no_grad():
                        flat = torch.cat([p.reshape(-1) for p in params])
                        gradient = penalty.family.matvec(quadratic, flat).sub_(linear)
                        for param, piece in zip(params, torch.split(gradient, sizes)):
                            param.grad.add_(piece.view_as(param), alpha=scale)
                if by_parameter:
                    with torch.no_grad():
                        for param, a, b in zip(params, quadratics, linears):
                            param.grad.add_(torch.mul(a, param).sub_(b), alpha=scale)
                if self.settings.grad_clip > 0:  # the whole step's gradient, penalty included, as the papers' code
                    nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
                opt.step()
        if keep:
            self._carried_out = _flat_adam(opt, params)
        return self.get_flat()

    # -- curvature -----------------------------------------------------------------------
    def curvature(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Diagonal GGN of the summed loss at ``theta`` on this client's data.

        Regression (unit-variance Gaussian): ``sum_i J_i^2``. Classification:
        ``sum_i sum_c p_ic (grad log p_c(x_i))^2``, the exact diagonal Fisher,
        which equals the GGN for softmax cross-entropy. ``settings.curvature = "mc"``
        replaces the sum over classes by one label drawn from ``p_i`` (``generator``):
        an unbiased estimate at the cost of one backward pass.
        """
        linears = _linear_layers(self.model)
        if linears is not None:
            return self._linear_curvature(theta, linears, generator)
        self.set_flat(theta)
        return self._jacobian_curvature(self.model.eval(), generator)

    def _output_weights(self, out: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The rows ``g`` to backpropagate and their weights ``w``: the curvature is ``sum_r w_r (J^T g_r)^2``
        (``g``: (R, B, outputs), ``w``: (R, B)), from the outputs ``out`` (log-probabilities of a classifier)."""
        batch = out.shape[0]
        if self.task == "regression":  # one row per output, weight 1
            eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
            return eye[:, None, :].expand(-1, batch, -1), torch.ones(out.shape[1], batch, dtype=out.dtype)
        probs = out.detach().exp()
        if self.settings.curvature == "mc":
            labels = torch.multinomial(probs.cpu().to(torch.float64), 1, generator=generator).to(out.device)
            rows = torch.zeros_like(out).scatter_(1, labels, 1.0)
            return rows[None], torch.ones(1, batch, dtype=out.dtype, device=out.device)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        return eye[:, None, :].expand(-1, batch, -1), probs.T

    def _outputs(self, model: nn.Module, x: Tensor) -> Tensor:
        out = model(x)
        return out.reshape(out.shape[0], -1) if self.task == "regression" else torch.log_softmax(out, -1)

    def layer_gradients(
        self, theta: Tensor, layers: list[nn.Module], *, generator: torch.Generator | None
    ) -> Iterator[tuple[dict[nn.Module, Tensor], dict[nn.Module, Tensor], Tensor]]:
        """The pieces of the GGN of the summed loss at ``theta``, layer by layer, batch by batch of the
        client's data: each of ``layers``' input ``a`` (``(B, ...)``), the gradient at its output of every
        row of :meth:`_output_weights` (``(R, B, ...)``) and the rows' weights ``w`` (``(R, B)``), so that
        the GGN is ``sum_b sum_r w_rb (J_b^T g_rb)(J_b^T g_rb)^T`` and a layer's per-example gradient is
        built from its ``g`` and ``a`` alone (a linear layer's is ``g a^T``). One batched backward pass per
        batch, no per-example Jacobian: what the exact diagonal GGN of linear layers and the Kronecker
        factors of :mod:`fedvb.core.kronecker` are made of."""
        self.set_flat(theta)
        model = self.model.eval()
        inputs: dict[nn.Module, Tensor] = {}
        outputs: dict[nn.Module, Tensor] = {}

        def keep(module, args, output):
            inputs[module], outputs[module] = args[0].detach(), output

        hooks = [layer.register_forward_hook(keep) for layer in layers]
        batch = 16 * self.settings.curvature_batch  # no per-example Jacobian held: batches as large as training's
        try:
            with torch.enable_grad():
                for start in range(0, self.num_examples, batch):
                    out = self._outputs(model, self.x[start : start + batch])
                    rows, weights = self._output_weights(out, generator)
                    grads = torch.autograd.grad(
                        out, [outputs[layer] for layer in layers], grad_outputs=rows, is_grads_batched=True
                    )
                    yield dict(inputs), {layer: g.detach() for layer, g in zip(layers, grads)}, weights
                    inputs.clear()
                    outputs.clear()
        finally:
            for hook in hooks:
                hook.remove()

    def _linear_curvature(self, theta: Tensor, linears: list[nn.Linear], generator) -> Tensor:
        """For a model whose trainable parameters all sit in ``nn.Linear`` layers (the MLPs, softmax and
        linear regression): a row's per-example gradient for a layer is ``g_i a_i^T`` (``a_i`` the layer's
        input, ``g_i`` the gradient at its output), so ``sum_i w_i (g_i a_i^T)^2 = (w g^2)^T (a^2)``
        (:meth:`layer_gradients`)."""
        total = {id(p): torch.zeros_like(p) for layer in linears for p in layer.parameters() if p.requires_grad}
        for inputs, grads, weights in self.layer_gradients(theta, linears, generator=generator):
            for layer in linears:
                g = grads[layer]  # (R, B, out_features)
                squares = (weights.unsqueeze(-1) * g.square()).sum(0)  # (B, out): sum_r w_r g^2
                a = inputs[layer].reshape(-1, layer.in_features)
                squares = squares.reshape(-1, layer.out_features)
                if layer.weight.requires_grad:
                    total[id(layer.weight)] += squares.T @ a.square()
                if layer.bias is not None and layer.bias.requires_grad:
                    total[id(layer.bias)] += squares.sum(0)
        return torch.cat([total[id(p)].reshape(-1) for p in self._params()]).detach()

    def _jacobian_curvature(self, model: nn.Module, generator) -> Tensor:
        """Any other model: each example's Jacobian of the outputs (``vmap(jacrev)``), the rows weighted."""
        params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        buffers = dict(model.named_buffers())

        def outputs(p, x):
            return self._outputs(lambda xb: torch.func.functional_call(model, (p, buffers), (xb,)), x.unsqueeze(0))[0]

        jacobian = torch.func.vmap(torch.func.jacrev(outputs), in_dims=(None, 0))
        total = torch.zeros(sum(p.numel() for p in params.values()), device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for start in range(0, self.num_examples, self.settings.curvature_batch):
                xb = self.x[start : start + self.settings.curvature_batch]
                jac = jacobian(params, xb)  # name -> (B, outputs, *shape)
                flat = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)
                rows, weights = self._output_weights(self._outputs(model, xb), generator)
                per_row = torch.einsum("rbo,bop->rbp", rows, flat)  # each row's per-example gradient
                total += (weights.unsqueeze(-1) * per_row.square()).sum((0, 1))
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
        start: Tensor | None = None,
    ) -> tuple[Gaussian, dict[str, Tensor]]:
        """The BayesADMM client step by IVON (docs/algorithms.md §4): ``ess = N / rho``, the server as the
        prior and the start (``start``, where given, as the start's mean), the site divided by ``rho`` as duals.
        ``state`` carries IVON's momentum and step counter across rounds (they are not reset, as in the
        reference code)."""
        precision = server.family.diagonal(server.precision, server.dim)
        if precision is None:
            raise ValueError(f"ivon solver needs a diagonal or isotropic family, got {server.family.name}")
        params = self._params()
        s = self.settings
        batch_generator = generator
        if self.device.type != "cpu":  # weight noise is drawn where the weights live, from a stream seeded by ours
            seed = int(torch.randint(2**62, (1,), generator=generator))
            generator = torch.Generator(device=self.device).manual_seed(seed)
        opt = IVON(
            params, lr=self.lr, ess=self.num_examples / rho, temperature=temperature, hess_init=s.ivon_hess_init,
            beta2=s.ivon_beta2, clip_radius=s.ivon_clip, generator=generator, kernel=s.ivon_kernel,
        )  # fmt: skip
        device_dtype = dict(device=self.device, dtype=self.dtype)
        opt.set_prior(server.mean.to(**device_dtype), precision.to(**device_dtype))
        quadratic = server.family.diagonal(site.quadratic, server.dim)
        opt.set_dual(site.linear.to(**device_dtype) / rho, quadratic.to(**device_dtype) / rho)
        begin = server.mean if start is None else start
        opt.warm_start(Gaussian(begin.to(**device_dtype), precision.to(**device_dtype), DIAGONAL))
        if first_round:  # docs/algorithms.md §4: round 1 starts from h0, later rounds from the server (h = 0)
            opt.reset_hessian(s.ivon_hess_init)
        if state:
            opt.restore_momentum(state["ivon_momentum"].to(self.device), int(state["ivon_step"].item()))
        with self._training(batch_generator):
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
