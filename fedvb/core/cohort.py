"""Train a round's cohort at once: the clients' weights stacked, one vectorised step for all of them.

Every simulator trains its clients one after another, each its own module driven by its own optimizer; a
small client's step is then bound by dispatch, not arithmetic. The cohort engine keeps each algorithm's
client step as written (:meth:`~fedvb.core.algorithms.Algorithm.client_round`, one description of each
algorithm) and runs the cohort's client steps side by side, each in a thread of its own with a
:class:`CohortMember` for a trainer; when every client has reached its local training (``map`` or ``ivon``),
the engine trains them together:

- weights ``(C, P)``, one row per client; the forward and backward pass of all clients at once
  (``torch.func.vmap`` over ``torch.func.grad`` of the model's ``functional_call``);
- each client's own data, minibatch order and random stream: its generator draws its permutation at the
  start of each epoch and its IVON noise keys at each step, in the order the loop draws them, so the
  engine sees the same batches and the same weight noise; a short last batch is padded with weight zero and
  its mean taken over its real rows;
- clients with fewer steps (fewer examples) are not padded into wrong numbers: a client's result is taken at
  its last step (``T_c = epochs * ceil(N_c / batch)``) and whatever the engine computes for it afterwards
  is discarded;
- Adam (torch's fused kernel over the stacked buffer), SGD, a coordinate-wise quadratic penalty's gradient
  ``tau / N_c (A_c t - b_c)``; IVON with each client's own effective sample size, prior, duals, momentum and
  step count (on a CPU its native kernels row by row: the loop's noise and update to the bit; elsewhere
  torch's ops row by row).

The numbers are the loop's to float tolerance (batched matrix products and the fused Adam kernel over one
buffer round differently from their per-client counterparts; tests/test_cohort.py holds every vectorisable
algorithm to the loop at 1e-4 relative over several rounds).

What does not run vectorised runs client by client inside the engine, unchanged: a penalty that is not
coordinate-wise (dense, Kronecker), a model with dropout or batch-norm buffers, and every trainer method but
``map`` and ``ivon`` (a Laplace curvature, an exact solve, FedLap-Func's predictions). :func:`vectorisable`
says whether an algorithm's local training is all vectorised.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedvb.core import ivon_native
from fedvb.core.gaussian import DIAGONAL, Gaussian, NaturalParams
from fedvb.core.ivon import ivon_update_
from fedvb.core.trainers import TorchTrainer, make_optimizer

__all__ = ["CohortEngine", "CohortMember", "vectorisable"]

Arrays = dict[str, Tensor]

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def vectorisable(model: nn.Module) -> str | None:
    """Why ``model``'s clients cannot train vectorised (``None``: they can): a dropout draws its own noise,
    batch norm keeps running buffers."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return f"its {type(module).__name__} draws noise of its own"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"its {type(module).__name__} keeps running statistics"
    return None


@dataclass
class _Request:
    kind: str  # "map" or "ivon"
    kwargs: dict[str, Any]
    result: Any = None
    done: threading.Event = field(default_factory=threading.Event)  # each waiting client wakes on its own


class CohortMember:
    """A client's trainer as its algorithm sees it: ``map`` and ``ivon`` wait for the cohort's vectorised step;
    everything else is the client's own :class:`~fedvb.core.trainers.TorchTrainer`."""

    def __init__(self, trainer: TorchTrainer, engine: CohortEngine, index: int) -> None:
        self.trainer, self._engine, self._index = trainer, engine, index

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

    def map(self, start, penalty, *, temperature=1.0, generator, optimizer=None) -> Tensor:
        kwargs = dict(start=start, penalty=penalty, temperature=temperature, generator=generator, optimizer=optimizer)
        return self._engine._wait(self._index, "map", kwargs)

    def ivon(self, server, site, *, rho, temperature, generator, state, first_round=False, start=None):
        kwargs = dict(server=server, site=site, rho=rho, temperature=temperature, generator=generator,
                      state=state, first_round=first_round, start=start)  # fmt: skip
        return self._engine._wait(self._index, "ivon", kwargs)


@dataclass
class _Schedule:
    """Each client's minibatches, drawn from its own generator as the loop draws them (see the module)."""

    trainers: list[TorchTrainer]
    generators: list[torch.Generator]
    batch: int
    epochs: int
    orders: list[Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.per_epoch = [math.ceil(t.num_examples / self.batch) for t in self.trainers]
        self.last = [self.epochs * s for s in self.per_epoch]  # each client's number of steps
        self.orders = [None] * len(self.trainers)
        self.mask = torch.ones(len(self.trainers), self.batch)
        self.counts = torch.full((len(self.trainers), 1), float(self.batch))

    @property
    def steps(self) -> int:
        return max(self.last)

    def rows(self, step: int, device) -> tuple[list[Tensor], Tensor, Tensor]:
        """Step ``step``'s rows of each client's data (``B`` each, a short batch padded with its first row), their
        weights ``(C, B)`` (0 for padding) and counts ``(C, 1)``; a client past its last step repeats its last
        batch (its result is already taken)."""
        rows = []
        for c, trainer in enumerate(self.trainers):
            local = min(step, self.last[c] - 1)
            position = local % self.per_epoch[c]
            if step < self.last[c] and position == 0:  # an epoch starts: the loop draws its order here
                self.orders[c] = torch.randperm(trainer.num_examples, generator=self.generators[c]).to(trainer.device)
            chosen = self.orders[c][position * self.batch : (position + 1) * self.batch]
            if len(chosen) < self.batch:
                self.mask[c].zero_()[: len(chosen)] = 1.0
                self.counts[c] = len(chosen)
                chosen = torch.cat([chosen, chosen[:1].expand(self.batch - len(chosen))])
            elif self.counts[c] != self.batch:
                self.mask[c].fill_(1.0)
                self.counts[c] = self.batch
            rows.append(chosen)
        return rows, self.mask.to(device), self.counts.to(device)


class CohortEngine:
    """Runs a cohort's client steps side by side and their local training vectorised (the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._everyone_waits = threading.Event()  # every client waits for training or has finished
        self._pending: dict[int, _Request] = {}
        self._finished: set[int] = set()
        self._count = 0
        self.vectorised = 0  # local trainings the engine ran together with others
        self.alone: dict[str, int] = {}  # those it ran client by client, by reason

    # -- the rendezvous ---------------------------------------------------------------------------
    def run(self, tasks: Sequence[Callable[[CohortMember], Any]], trainers: Sequence[TorchTrainer]) -> list[Any]:
        """``tasks[c](member_c)`` for every client, each in its own thread, with its training done by the
        engine; returns each task's result, or the exception it raised, in order."""
        if not tasks:
            return []
        results: list[Any] = [None] * len(tasks)
        self._pending, self._finished, self._count = {}, set(), len(tasks)
        self._everyone_waits.clear()

        def work(index: int) -> None:
            try:
                results[index] = tasks[index](CohortMember(trainers[index], self, index))
            except BaseException as error:  # noqa: BLE001 (handed to the caller as the client's result)
                results[index] = error
            with self._lock:
                self._finished.add(index)
                self._check_everyone()

        running = [_threads(len(tasks)).submit(work, i) for i in range(len(tasks))]
        while True:
            self._everyone_waits.wait()
            with self._lock:
                self._everyone_waits.clear()
                if len(self._finished) == len(tasks):
                    break
                batch, self._pending = self._pending, {}
            answers = self._execute(batch, trainers)
            for index, answer in answers.items():
                batch[index].result = answer
                batch[index].done.set()
        for future in running:
            future.result()
        return results

    def _check_everyone(self) -> None:
        """Under the lock: wake the engine when no client is still on its way to training."""
        if len(self._pending) + len(self._finished) == self._count:
            self._everyone_waits.set()

    def _wait(self, index: int, kind: str, kwargs: dict[str, Any]) -> Any:
        request = _Request(kind, kwargs)
        with self._lock:
            self._pending[index] = request
            self._check_everyone()
        request.done.wait()
        if isinstance(request.result, BaseException):
            raise request.result
        return request.result

    def _execute(self, batch: dict[int, _Request], trainers: Sequence[TorchTrainer]) -> dict[int, Any]:
        """Every waiting request answered: vectorised where the engine can, else on the client's own trainer."""
        answers: dict[int, Any] = {}
        groups: dict[tuple, list[int]] = {}
        for index, request in sorted(batch.items()):
            key = _group_key(request, trainers[index])
            if isinstance(key, str):
                if key not in _WARNED:  # once per process and reason, not every round
                    _WARNED.add(key)
                    log.warning("engine = vectorised: a client's %s trains client by client: %s", request.kind, key)
                self.alone[key] = self.alone.get(key, 0) + 1
                answers[index] = _alone(request, trainers[index])
            else:
                groups.setdefault(key, []).append(index)
                self.vectorised += 1
        for key, members in groups.items():
            chosen = [trainers[i] for i in members]
            requests = [batch[i] for i in members]
            try:
                solved = (_map_cohort if key[0] == "map" else _ivon_cohort)(chosen, requests)
            except Exception as error:  # noqa: BLE001 (each client of the group answers with it)
                solved = [error] * len(members)
            answers.update(zip(members, solved))
        return answers


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _threads(count: int) -> ThreadPoolExecutor:
    """Threads for ``count`` clients at once, kept between rounds: starting 64 threads costs more than a
    small cohort's training (0.18 s against 3 ms to reuse them, measured), and every client of a chunk must
    be able to wait at the rendezvous at once (so never fewer threads than clients)."""
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < count:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=count, thread_name_prefix="fedvb-cohort"), count
    return _POOL


def _alone(request: _Request, trainer: TorchTrainer) -> Any:
    """A request the engine does not vectorise, on the client's own trainer."""
    try:
        return getattr(trainer, request.kind)(**request.kwargs)
    except Exception as error:  # noqa: BLE001
        return error


def _group_key(request: _Request, trainer: TorchTrainer) -> tuple | str:
    """Requests with one key train together; a string: this one trains alone, and why."""
    problem = vectorisable(trainer.model)
    if problem is not None:
        return f"the model cannot be vectorised ({problem})"
    shapes = tuple((name, tuple(p.shape)) for name, p in trainer.model.named_parameters() if p.requires_grad)
    common = (type(trainer.model), shapes, trainer.lr, trainer.settings.batch_size, trainer.settings.local_epochs,
              trainer.task, trainer.dtype, trainer.device)  # fmt: skip
    kwargs = request.kwargs
    if request.kind == "map":
        penalty = kwargs["penalty"]
        if penalty is not None and not penalty.family.coordinatewise:
            return f"its penalty is {penalty.family.name}, not coordinate-wise"
        if trainer.settings.weight_decay > 0 or trainer.settings.grad_clip > 0:
            return "its optimizer decays weights or clips gradients, which the engine does not vectorise"
        if trainer.settings.optimizer_state == "kept":
            return "its Adam state is carried across rounds, which the engine does not vectorise"
        optimizer = kwargs["optimizer"] or trainer.settings.optimizer
        return ("map", optimizer, float(kwargs["temperature"]), *common)
    s = trainer.settings
    return ("ivon", float(kwargs["temperature"]), float(kwargs["rho"]), s.ivon_hess_init, s.ivon_beta2,
            s.ivon_mc_samples, s.ivon_clip_radius, s.ivon_kernel, bool(kwargs["first_round"]), *common)  # fmt: skip


# -- the vectorised steps ------------------------------------------------------------------------------
class _Stack:
    """The cohort's data and a functional model: loss gradients of every client's weights at once."""

    def __init__(self, trainers: list[TorchTrainer]) -> None:
        first = trainers[0]
        self.model, self.task, self.device, self.dtype = first.model, first.task, first.device, first.dtype
        self.names = [name for name, p in self.model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for name, p in self.model.named_parameters() if p.requires_grad]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.frozen = {name: p.detach() for name, p in self.model.named_parameters() if not p.requires_grad}
        self.buffers = dict(self.model.named_buffers())
        self.data = [(t.x, t.y) for t in trainers]
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self.gradient = vmap(grad(self._loss))

    def _loss(self, flat: Tensor, x: Tensor, y: Tensor, mask: Tensor, count: Tensor) -> Tensor:
        params = dict(zip(self.names, (piece.view(shape) for piece, shape in
                                       zip(torch.split(flat, self.sizes), self.shapes))))  # fmt: skip
        out = functional_call(self.model, ({**params, **self.frozen}, self.buffers), (x,))
        if self.task == "regression":
            losses = 0.5 * (out.reshape(-1) - y) ** 2
        else:
            losses = nn.functional.cross_entropy(out, y, reduction="none")
        return (losses * mask).sum() / count.squeeze()  # the mean over the batch's real rows, as the loop takes it

    def grads(self, weights: Tensor, rows: list[Tensor], mask: Tensor, counts: Tensor) -> Tensor:
        """Each client's gradient of its batch's mean loss, ``(C, P)`` (``rows``: each client's batch)."""
        self.model.train()
        if self._x is None or self._x.shape[1] != len(rows[0]):  # the cohort's batch, reused from step to step
            first_x, first_y = self.data[0]
            self._x = first_x.new_empty((len(rows), len(rows[0]), *first_x.shape[1:]))
            self._y = first_y.new_empty((len(rows), len(rows[0]), *first_y.shape[1:]))
        for c, ((x, y), r) in enumerate(zip(self.data, rows)):  # into the batch buffer: no stacked copy
            torch.index_select(x, 0, r, out=self._x[c])
            torch.index_select(y, 0, r, out=self._y[c])
        return self.gradient(weights, self._x, self._y, mask, counts)


def _map_cohort(trainers: list[TorchTrainer], requests: list[_Request]) -> list[Tensor]:
    """:meth:`TorchTrainer.map` for every client at once (Adam or SGD, a coordinate-wise penalty)."""
    stack, first = _Stack(trainers), requests[0].kwargs
    kind = first["optimizer"] or trainers[0].settings.optimizer
    weights = nn.Parameter(torch.stack([r.kwargs["start"].to(stack.device, stack.dtype) for r in requests]))
    scale = torch.tensor([[first["temperature"] / t.num_examples] for t in trainers], dtype=stack.dtype,
                         device=stack.device)  # fmt: skip
    linear, quadratic = _penalties(requests, stack)
    # a fresh optimizer per round, as the loop builds one: Adam's state and step count start at zero
    optimizer = make_optimizer(kind, [weights], trainers[0].lr)
    schedule = _Schedule(trainers, [r.kwargs["generator"] for r in requests], trainers[0].settings.batch_size,
                         trainers[0].settings.local_epochs)  # fmt: skip
    results: list[Tensor | None] = [None] * len(trainers)
    for step in range(schedule.steps):
        index, mask, counts = schedule.rows(step, stack.device)
        with torch.no_grad():
            weights.grad = stack.grads(weights.detach(), index, mask, counts)
            if linear is not None:
                weights.grad.add_(torch.mul(quadratic, weights).sub_(linear).mul_(scale))
        optimizer.step()
        for c, last in enumerate(schedule.last):
            if step == last - 1:
                results[c] = weights.detach()[c].clone()
    return results


def _penalties(requests: list[_Request], stack: _Stack) -> tuple[Tensor | None, Tensor | None]:
    """The penalties' ``b`` stacked ``(C, P)`` and ``A`` stacked ``(C, P)`` (diagonal) or ``(C, 1)`` (isotropic:
    one number a client, broadcast), or ``None`` without penalties (a mix with and without does not arise: one
    algorithm per round)."""
    penalties: list[NaturalParams | None] = [r.kwargs["penalty"] for r in requests]
    if all(p is None for p in penalties):
        return None, None
    linear = torch.stack([p.linear.to(stack.device, stack.dtype) for p in penalties])
    quadratic = torch.stack([p.quadratic.to(stack.device, stack.dtype).reshape(-1) for p in penalties])
    return linear, quadratic


def _ivon_cohort(trainers: list[TorchTrainer], requests: list[_Request]) -> list[tuple[Gaussian, Arrays]]:
    """:meth:`TorchTrainer.ivon` for every client at once (docs/algorithms.md §4)."""
    stack, first = _Stack(trainers), requests[0].kwargs
    settings = trainers[0].settings
    rho, temperature = first["rho"], first["temperature"]
    like = dict(device=stack.device, dtype=stack.dtype)
    count = len(trainers)
    lam = [t.num_examples / rho / temperature for t in trainers]  # ess / temperature, per client
    servers: list[Gaussian] = [r.kwargs["server"] for r in requests]
    prior_precision = torch.stack([s.family.diagonal(s.precision, s.dim).to(**like) for s in servers])
    prior_mean = torch.stack([s.mean.to(**like) for s in servers])
    prior_natural = prior_mean * prior_precision  # S0 m0, as IVON.set_prior caches it
    dual_linear = torch.stack([r.kwargs["site"].linear.to(**like) / rho for r in requests])
    dual_quadratic = torch.stack([s.family.diagonal(r.kwargs["site"].quadratic, s.dim).to(**like) / rho
                                  for s, r in zip(servers, requests)])  # fmt: skip
    # the warm start: m = m_bar (or the request's start) and h = S_bar / lam - S_bar / lam = 0
    mean = torch.stack([(s.mean if r.kwargs["start"] is None else r.kwargs["start"]).to(**like)
                        for s, r in zip(servers, requests)])  # fmt: skip
    lam_column = torch.tensor(lam, **like).unsqueeze(1)
    hess = prior_precision / lam_column - prior_precision / lam_column
    if first["first_round"]:
        hess.fill_(settings.ivon_hess_init)
    momentum = torch.zeros_like(mean)
    steps = [0] * count
    for c, request in enumerate(requests):
        state = request.kwargs["state"]
        if state:
            momentum[c].copy_(state["ivon_momentum"].to(**like))
            steps[c] = int(state["ivon_step"].item())
    generators = [r.kwargs["generator"] for r in requests]
    if stack.device.type != "cpu":  # the loop draws a device generator's seed from the client's stream
        noise_generators = [torch.Generator(device=stack.device).manual_seed(int(torch.randint(2**62, (1,),
                            generator=g))) for g in generators]  # fmt: skip
    else:
        noise_generators = generators
    kernels = ivon_native.load() if settings.ivon_kernel != "torch" else None
    native = kernels is not None and ivon_native.NativeKernels.supports(mean)
    if settings.ivon_kernel == "native" and not native:
        raise RuntimeError("IVON: kernel='native' but the native kernels could not be built (see the log)")
    schedule = _Schedule(trainers, generators, settings.batch_size, settings.local_epochs)
    sqrt_precision = torch.empty_like(mean)
    for c in range(count):  # sqrt(lam h + S0), as IVON forms it before its first draw
        torch.add(prior_precision[c], hess[c], alpha=lam[c], out=sqrt_precision[c]).sqrt_()
    saved, noise = torch.empty_like(mean), torch.empty_like(mean)
    samples = settings.ivon_mc_samples
    results: list[Any] = [None] * count
    beta1, beta2 = 0.9, settings.ivon_beta2
    clip = settings.ivon_clip
    for step in range(schedule.steps):
        index, mask, counts = schedule.rows(step, stack.device)
        grad_sum, grad_noise = None, None
        for _ in range(samples):
            if native:  # each client's noise from its own stream, as the loop draws it
                keys = [int(torch.randint(0, 2**63 - 1, (), generator=g)) for g in noise_generators]
                kernels.sample_rows_(mean, saved, noise, sqrt_precision, keys)
            for c in range(count if not native else 0):
                noise[c].normal_(generator=noise_generators[c])
                saved[c].copy_(mean[c])
                mean[c].addcdiv_(noise[c], sqrt_precision[c])
            with torch.no_grad():
                gradient = stack.grads(mean, index, mask, counts)
            mean.copy_(saved)
            if samples > 1:  # the averages IVON takes over its Monte Carlo samples
                grad_sum = gradient.clone() if grad_sum is None else grad_sum.add_(gradient)
                grad_noise = gradient * noise if grad_noise is None else grad_noise.addcmul_(gradient, noise)
        if samples > 1:
            grad_sum.div_(samples)
            grad_noise.div_(samples)
        steps = [s + 1 for s in steps]
        bias = [lam[c] / (1.0 - beta1 ** steps[c]) for c in range(count)]
        g, gz = (grad_sum, grad_noise) if samples > 1 else (gradient, noise)
        if native:  # one call for the cohort, each row the client's own update (its lam and bias correction)
            kernels.update_rows_(mean, hess, momentum, g, gz, sqrt_precision, prior_precision, prior_natural,
                                 dual_linear, dual_quadratic, raw_noise=samples == 1, beta1=beta1, beta2=beta2,
                                 lam=torch.tensor(lam, dtype=torch.float32), c=torch.tensor(bias, dtype=torch.float32),
                                 lr=trainers[0].lr, clip=clip)  # fmt: skip
        for c in range(count):
            if not native:
                scalars = dict(beta1=beta1, beta2=beta2, lam=lam[c], c=bias[c], lr=trainers[c].lr, clip=clip)
                row_gz = gz[c].clone() if samples > 1 else gz[c] * g[c]  # the torch kernels take g * z
                ivon_update_(mean[c], hess[c], momentum[c], g[c], row_gz, sqrt_precision[c], prior_precision[c],
                             prior_natural[c], dual_linear[c], dual_quadratic[c], torch.empty_like(mean[c]),
                             **scalars)  # fmt: skip
            if step == schedule.last[c] - 1:
                precision = lam[c] * (hess[c] + prior_precision[c] / lam[c])
                posterior = Gaussian(mean[c].clone(), precision, DIAGONAL).to(servers[c].mean)
                state = {"ivon_momentum": momentum[c].clone().cpu(), "ivon_step": torch.tensor(float(steps[c]))}
                results[c] = (posterior, state)
    return results
